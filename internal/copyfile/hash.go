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
	sum, err := hashFD(context.Background(), fd, finished(size))
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

// progress tells how much of a file is final: everything before done, and
// all of it (done is then its size) once final. A copy advances it as it
// writes, so that its hash can follow it; a file at rest is final at once.
type progress struct {
	mu     sync.Mutex
	cond   sync.Cond
	done   int64
	final  bool
	failed bool
}

func newProgress() *progress {
	p := &progress{}
	p.cond.L = &p.mu
	return p
}

// finished is the progress of a file of size bytes that is complete.
func finished(size int64) *progress {
	p := newProgress()
	p.finish(size)
	return p
}

// advance records that everything before off is final. A nil progress
// (no hash follows the copy) ignores it; so do finish and fail.
func (p *progress) advance(off int64) {
	if p == nil {
		return
	}
	p.mu.Lock()
	if off > p.done {
		p.done = off
		p.cond.Broadcast()
	}
	p.mu.Unlock()
}

// finish records that the file is complete and size bytes long.
func (p *progress) finish(size int64) {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.done, p.final = size, true
	p.cond.Broadcast()
	p.mu.Unlock()
}

// fail records that the file will not be complete.
func (p *progress) fail() {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.failed = true
	p.cond.Broadcast()
	p.mu.Unlock()
}

// errIncomplete is what a hash that followed a failed copy returns.
var errIncomplete = errors.New("the file was not completed")

// wait blocks until more than off bytes are final, the file is complete,
// the copy failed or stop is closed (wake must be called after closing it)
// and returns how far the file is final and whether that is its end.
func (p *progress) wait(off int64, stop <-chan struct{}) (done int64, final bool, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for !p.failed && !p.final && p.done <= off {
		select {
		case <-stop:
			return 0, false, errIncomplete
		default:
		}
		p.cond.Wait()
	}
	if p.failed {
		return 0, false, errIncomplete
	}
	return p.done, p.final, nil
}

// wake lets a wait see that its stop channel was closed.
func (p *progress) wake() {
	p.mu.Lock()
	p.cond.Broadcast()
	p.mu.Unlock()
}

// piece is what the reader of a hash hands to the hashing: the bytes of
// buf, or a hole of zeros bytes, or the error that stopped the reading.
type piece struct {
	buf   []byte
	zeros int64
	err   error
}

// hashFD hashes fd as far as prog says it is final, until its end (holes as
// zeros), and checks ctx between pieces. A goroutine reads ahead into a few
// fixed buffers; it has ended when hashFD returns, so the caller may close
// fd right away.
func hashFD(ctx context.Context, fd int, prog *progress) (string, error) {
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
		readPieces(fd, prog, free, pieces, stop)
	}()
	defer wg.Wait()
	defer prog.wake()
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

// readPieces walks the data extents of fd as far as prog says it is final
// and sends holes and data, in order, until its end or until stop is
// closed. Below done, what SEEK_DATA/SEEK_HOLE call a hole reads as zeros:
// it is hashed as such without being read.
func readPieces(fd int, prog *progress, free <-chan []byte, pieces chan<- piece, stop <-chan struct{}) {
	send := func(p piece) bool {
		select {
		case pieces <- p:
			return true
		case <-stop:
			return false
		}
	}
	for off := int64(0); ; {
		done, final, err := prog.wait(off, stop)
		if err != nil {
			send(piece{err: err})
			return
		}
		if final && off >= done {
			return
		}
		start, end, err := nextExtent(fd, off, done)
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
// background while the copy goes on.
type pendingHash struct {
	cancel context.CancelFunc
	done   chan struct{}
	sum    string
	err    error
}

// startHash starts hashing the file open as fd, following prog. The reads
// do not touch the file's access time (cp -p sets it afterwards). fd must
// stay open until wait or abort has returned.
func startHash(ctx context.Context, fd int, prog *progress) (*pendingHash, error) {
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
		p.sum, p.err = hashFD(hctx, fd, prog)
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
