package statedump

import (
	"bufio"
	"compress/gzip"
	"errors"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// streamMagic is how every QEMU migration stream starts:
// QEMU_VM_FILE_MAGIC "QEVM" then QEMU_VM_FILE_VERSION 3 (big endian).
var streamMagic = []byte{'Q', 'E', 'V', 'M', 0, 0, 0, 3}

// pump reads the migration stream from QEMU's pipe and gzips it into the
// state file. When the file cannot be written it goes on draining the pipe
// (discarding), so QEMU never blocks on a full pipe while the migration is
// being cancelled; failed is closed at that moment.
type pump struct {
	done   chan struct{} // closed when the pump has stopped
	failed chan struct{} // closed on the first write error

	mu      sync.Mutex
	err     error // file write, compression or flush error
	readErr error // pipe error other than EOF (e.g. the pipe was closed by abort)
	eof     bool  // QEMU closed its end: the stream is complete as far as QEMU is concerned
	raw     int64 // stream bytes read
	head    []byte
}

func startPump(r io.Reader, f io.Writer, level int) (*pump, error) {
	bw := bufio.NewWriterSize(f, 128<<10)
	gz, err := gzip.NewWriterLevel(bw, level)
	if err != nil {
		return nil, err
	}
	p := &pump{done: make(chan struct{}), failed: make(chan struct{})}
	go p.run(r, gz, bw)
	return p, nil
}

func (p *pump) fail(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err == nil {
		p.err = err
		close(p.failed)
	}
}

func (p *pump) run(r io.Reader, gz *gzip.Writer, bw *bufio.Writer) {
	defer close(p.done)
	buf := make([]byte, 1<<20)
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			p.mu.Lock()
			p.raw += int64(n)
			if len(p.head) < len(streamMagic) {
				p.head = append(p.head, buf[:min(n, len(streamMagic)-len(p.head))]...)
			}
			ok := p.err == nil
			p.mu.Unlock()
			if ok {
				if _, err := gz.Write(buf[:n]); err != nil {
					p.fail(err)
				}
			}
		}
		if rerr == nil {
			continue
		}
		if errors.Is(rerr, io.EOF) {
			p.mu.Lock()
			p.eof = true
			ok := p.err == nil
			p.mu.Unlock()
			if ok {
				if err := gz.Close(); err != nil {
					p.fail(err)
				} else if err := bw.Flush(); err != nil {
					p.fail(err)
				}
			}
		} else {
			p.mu.Lock()
			p.readErr = rerr
			p.mu.Unlock()
		}
		return
	}
}

// Err is the first error writing the state file, or nil.
func (p *pump) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// result is what the pump saw; call it after done is closed.
func (p *pump) result() (raw int64, eof bool, head []byte, readErr error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.raw, p.eof, append([]byte(nil), p.head...), p.readErr
}

// growPipe asks for a 1 MiB pipe buffer (best effort; the default 64 KiB
// costs QEMU more wake-ups). SyscallConn keeps the descriptor in Go's
// poller, so closing r still interrupts a blocked Read.
func growPipe(r *os.File) {
	rc, err := r.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_, _ = unix.FcntlInt(fd, unix.F_SETPIPE_SZ, 1<<20)
	})
}
