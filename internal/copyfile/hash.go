package copyfile

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"sync"

	"golang.org/x/sys/unix"
)

const (
	// hashBuffers is how many bufSize buffers the reader of a hash fills
	// ahead of the hashing: while one is hashed, the next is read, so a
	// read from disk (or the copy out of the page cache) and the hashing
	// use two cores.
	hashBuffers = 3
	// zeroChunk is how much of a hole is hashed per call.
	zeroChunk = 64 << 10
)

// zeros is hashed in place of holes, which are never read.
var zeros [zeroChunk]byte

// HashFile returns the SHA-256 of the whole content of the file at path,
// in lowercase hex, holes read as zeros: what `sha256sum FILE` prints.
// Memory use is constant; holes (found with SEEK_DATA/SEEK_HOLE) are
// hashed as zeros without being read, and reading overlaps with hashing.
// The file is hashed up to the size it had when it was opened; a file that
// changes size meanwhile is an error, not a hash of something in between.
// Its access time is left alone where the kernel lets it (owner, root).
func HashFile(path string) (string, error) {
	sum, err := hashFile(path)
	if err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return sum, nil
}

func hashFile(path string) (string, error) {
	f, err := openNoatime(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fd := int(f.Fd())
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return "", err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return "", errors.New("not a regular file")
	}
	// Twice the default read-ahead: the file is read from start to end.
	_ = unix.Fadvise(fd, 0, 0, unix.FADV_SEQUENTIAL)
	size := st.Size
	sum, err := hashFD(context.Background(), fd, size)
	if err != nil {
		return "", err
	}
	if err := unix.Fstat(fd, &st); err != nil {
		return "", err
	}
	if st.Size != size {
		return "", errors.New("file changed size while it was hashed")
	}
	return sum, nil
}

// piece is what the reader of a hash hands to the hashing: n bytes of buf,
// or a hole of zeros bytes, or the error that stopped the reading.
type piece struct {
	buf   []byte
	zeros int64
	err   error
}

// hashFD hashes the first size bytes of fd (holes as zeros) and checks ctx
// between pieces. A goroutine reads ahead into a few fixed buffers; it has
// ended when hashFD returns, so the caller may close fd right away.
func hashFD(ctx context.Context, fd int, size int64) (string, error) {
	free := make(chan []byte, hashBuffers)
	for range hashBuffers {
		free <- make([]byte, bufSize)
	}
	pieces := make(chan piece, hashBuffers)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(pieces)
		readPieces(fd, size, free, pieces, stop)
	}()
	defer wg.Wait()
	defer close(stop)

	h := sha256.New()
	for p := range pieces {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		if p.err != nil {
			return "", p.err
		}
		if p.buf == nil {
			hashZeros(h, p.zeros)
			continue
		}
		h.Write(p.buf)
		free <- p.buf[:cap(p.buf)]
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// readPieces walks the data extents of the first size bytes of fd and
// sends holes and data, in order, until the end or until stop is closed.
func readPieces(fd int, size int64, free <-chan []byte, pieces chan<- piece, stop <-chan struct{}) {
	send := func(p piece) bool {
		select {
		case pieces <- p:
			return true
		case <-stop:
			return false
		}
	}
	for off := int64(0); off < size; {
		start, end, err := nextExtent(fd, off, size)
		if err != nil {
			send(piece{err: err})
			return
		}
		if start > off && !send(piece{zeros: start - off}) {
			return
		}
		for off = start; off < end; {
			var buf []byte
			select {
			case buf = <-free:
			case <-stop:
				return
			}
			buf = buf[:min(int64(len(buf)), end-off)]
			n, err := ignoringEINTR(func() (int, error) { return unix.Pread(fd, buf, off) })
			switch {
			case err != nil:
				send(piece{err: wrap("read", err)})
				return
			case n == 0:
				send(piece{err: errors.New("file shrank while it was hashed")})
				return
			}
			if !send(piece{buf: buf[:n]}) {
				return
			}
			off += int64(n)
		}
	}
}

// hashZeros feeds n zero bytes to h.
func hashZeros(h hash.Hash, n int64) {
	for n > 0 {
		k := min(n, zeroChunk)
		h.Write(zeros[:k])
		n -= k
	}
}

// pendingHash is the hash of a copy's temporary file, taken in the
// background while the copy finishes.
type pendingHash struct {
	cancel context.CancelFunc
	done   chan struct{}
	sum    string
	err    error
}

// startHash starts hashing the file open as fd, as long as it is now. The
// reads do not touch the file's access time (cp -p sets it afterwards).
// fd must stay open until wait or abort has returned.
func startHash(ctx context.Context, fd int) (*pendingHash, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, wrap("hash: stat", err)
	}
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err == nil {
		_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags|unix.O_NOATIME)
	}
	if err != nil {
		return nil, wrap("hash: set O_NOATIME", err)
	}
	hctx, cancel := context.WithCancel(ctx)
	p := &pendingHash{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		p.sum, p.err = hashFD(hctx, fd, st.Size)
	}()
	return p, nil
}

// wait returns the hash ("" for a nil pendingHash).
func (p *pendingHash) wait() (string, error) {
	if p == nil {
		return "", nil
	}
	<-p.done
	p.cancel()
	if p.err != nil {
		return "", wrap("hash", p.err)
	}
	return p.sum, nil
}

// abort stops the hash and waits until it no longer reads the file.
func (p *pendingHash) abort() {
	if p == nil {
		return
	}
	p.cancel()
	<-p.done
}
