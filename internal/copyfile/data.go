package copyfile

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

const (
	// cfrChunk bounds one copy_file_range call so ctx is checked at least
	// every 16 MiB, and the writeback pacing sees the data in pieces no
	// larger than its chunks.
	cfrChunk = writebackChunk
	// bufSize is the read/write fallback's buffer: memory use is constant
	// whatever the file size.
	bufSize = 1 << 20
	// blockSize is the granularity at which the fallback looks for all-zero
	// blocks to leave as holes (the common file system block size).
	blockSize = 4096
)

var zeroBlock [blockSize]byte

// errShrank reports a source that got shorter while being copied: the copy
// would not be a consistent image, so it is an error rather than a short copy.
var errShrank = errors.New("source shrank during copy")

// writeData copies the content of in (size bytes) into the empty file out:
// a whole-file reflink when the file system can, else extent by extent.
// prog, if not nil, learns how far out is complete. atHead, if not nil, is
// called once the first opt.PrepareHead bytes are copied and before any
// byte past them is (not at all for a reflink, or a file no longer than
// that: the caller sees it was not called).
func writeData(ctx context.Context, in, out int, size int64, opt Options, prog *progress, atHead func() error) (Stats, error) {
	if size > 0 && !opt.readWriteOnly {
		// Fails with EOPNOTSUPP, EXDEV, EINVAL... where reflinks are not
		// possible (ext4, tmpfs, across file systems); out is still empty
		// then, and the extent copy below does the work.
		if unix.IoctlFileClone(out, in) == nil {
			prog.finish(size)
			if opt.Progress != nil {
				opt.Progress(size)
			}
			return Stats{Bytes: size, Reflinked: true}, nil
		}
	}
	c := copier{ctx: ctx, in: in, out: out, useCFR: !opt.readWriteOnly, limit: opt.Limit,
		wb: newWriteback(out, opt.syncRange), prog: prog, report: opt.Progress}
	from := int64(0)
	if atHead != nil && size > opt.PrepareHead {
		if err := c.copyExtents(0, opt.PrepareHead); err != nil {
			return Stats{Bytes: c.bytes}, err
		}
		c.prog.advance(opt.PrepareHead) // a hole at its end, if any
		if err := atHead(); err != nil {
			return Stats{Bytes: c.bytes}, err
		}
		from = opt.PrepareHead
	}
	if err := c.copyExtents(from, size); err != nil {
		return Stats{Bytes: c.bytes}, err
	}
	if err := c.wb.finish(); err != nil {
		return Stats{Bytes: c.bytes}, err
	}
	// Only data extents were written: extending to the source size creates
	// the trailing hole, if any.
	if err := unix.Ftruncate(out, size); err != nil {
		return Stats{Bytes: c.bytes}, wrap("truncate", err)
	}
	prog.finish(size)
	return Stats{Bytes: c.bytes}, nil
}

// copier copies byte ranges between two descriptors at explicit offsets.
type copier struct {
	ctx     context.Context
	in, out int
	useCFR  bool   // still trying copy_file_range
	buf     []byte // read/write fallback buffer, allocated on first use
	bytes   int64
	limit   *rate.Limiter // nil: as fast as the disks go
	wb      *writeback    // moves the data to disk while copying
	prog    *progress     // how far out is complete, for a hash that follows
	report  func(int64)   // Options.Progress
	done    int64         // source data bytes handled, for report
}

// copyExtents copies every data extent of in between from and to,
// leaving the holes between them unwritten.
func (c *copier) copyExtents(from, to int64) error {
	for off := from; off < to; {
		start, end, err := nextExtent(c.in, off, to)
		if err != nil {
			return err
		}
		c.prog.advance(start) // a hole before the extent, if any
		if err := c.copyRange(start, end); err != nil {
			return err
		}
		off = end
	}
	return nil
}

// nextExtent returns the first data extent [start, end) at or after off,
// clipped to size; start == end == size when only a hole remains.
func nextExtent(fd int, off, size int64) (start, end int64, err error) {
	start, err = unix.Seek(fd, off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		return size, size, nil // nothing but a hole up to EOF
	case errors.Is(err, unix.EINVAL):
		return off, size, nil // SEEK_DATA unsupported: the rest is one extent
	case err != nil:
		return 0, 0, wrap("seek data", err)
	case start >= size:
		return size, size, nil
	}
	end, err = unix.Seek(fd, start, unix.SEEK_HOLE)
	switch {
	case errors.Is(err, unix.EINVAL):
		end = size
	case err != nil:
		return 0, 0, wrap("seek hole", err)
	}
	return start, min(end, size), nil
}

// copyRange copies [off, end) chunk by chunk, checking ctx between chunks.
func (c *copier) copyRange(off, end int64) error {
	for off < end {
		if err := c.ctx.Err(); err != nil {
			return err
		}
		n, err := c.step(off, end)
		if err != nil {
			return err
		}
		off += n
		c.prog.advance(off)
		if c.report != nil {
			c.done += n
			c.report(c.done)
		}
	}
	return nil
}

// step copies one chunk starting at off with copy_file_range, or with
// read/write once copy_file_range turned out not to work for these files.
func (c *copier) step(off, end int64) (int64, error) {
	n := end - off
	if c.limit != nil {
		// Ask for the bytes before moving them: a chunk is at most the
		// limiter's burst, so the average rate never exceeds the limit.
		n = min(n, int64(c.limit.Burst()))
		if err := waitRate(c.ctx, c.limit, int(n)); err != nil {
			return 0, err
		}
	}
	if c.useCFR {
		n, err := c.copyFileRange(off, min(n, cfrChunk))
		if !cfrUnsupported(err) {
			return n, err
		}
		c.useCFR = false
	}
	return c.readWrite(off, min(n, bufSize))
}

// copyFileRange lets the kernel copy n bytes at off (no trip through user
// space; a reflink or server-side copy where the file system offers one).
func (c *copier) copyFileRange(off, n int64) (int64, error) {
	roff, woff := off, off
	m, err := ignoringEINTR(func() (int, error) {
		return unix.CopyFileRange(c.in, &roff, c.out, &woff, int(n), 0)
	})
	if err != nil {
		return 0, wrap("copy_file_range", err)
	}
	if m == 0 {
		return 0, errShrank
	}
	c.bytes += int64(m)
	return int64(m), c.wb.wrote(off, int64(m))
}

// cfrUnsupported reports whether copy_file_range failed because it cannot
// copy between these files (other file system, old kernel, file system
// without support; EPERM from seccomp filters in some containers) rather than
// because of a real I/O error. A real error, if any, shows up again in the
// read/write fallback.
func cfrUnsupported(err error) bool {
	for _, e := range []error{unix.EXDEV, unix.ENOSYS, unix.EOPNOTSUPP, unix.EINVAL, unix.EPERM} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// readWrite copies up to n (<= bufSize) bytes at off through the buffer.
func (c *copier) readWrite(off, n int64) (int64, error) {
	if c.buf == nil {
		c.buf = make([]byte, bufSize)
	}
	buf := c.buf[:n]
	m, err := ignoringEINTR(func() (int, error) { return unix.Pread(c.in, buf, off) })
	if err != nil {
		return 0, wrap("read", err)
	}
	if m == 0 {
		return 0, errShrank
	}
	return int64(m), c.writeSparse(buf[:m], off)
}

// writeSparse writes buf at off but skips all-zero blocks, which stay holes
// in the (fresh, hole-filled) temporary file, like cp --sparse=auto.
func (c *copier) writeSparse(buf []byte, off int64) error {
	for len(buf) > 0 {
		z := blockRun(buf, true)
		buf, off = buf[z:], off+int64(z)
		d := blockRun(buf, false)
		if err := c.pwriteAll(buf[:d], off); err != nil {
			return err
		}
		buf, off = buf[d:], off+int64(d)
	}
	return nil
}

// blockRun returns the length of the leading run of blocks of buf that are
// all-zero (zero == true) or not all-zero (zero == false).
func blockRun(buf []byte, zero bool) int {
	n := 0
	for n < len(buf) {
		blk := buf[n:min(n+blockSize, len(buf))]
		if bytes.Equal(blk, zeroBlock[:len(blk)]) != zero {
			break
		}
		n += len(blk)
	}
	return n
}

// pwriteAll writes all of b at off, continuing after short writes.
func (c *copier) pwriteAll(b []byte, off int64) error {
	for len(b) > 0 {
		n, err := ignoringEINTR(func() (int, error) { return unix.Pwrite(c.out, b, off) })
		if err != nil {
			return wrap("write", err)
		}
		if n == 0 {
			return wrap("write", io.ErrShortWrite)
		}
		c.bytes += int64(n)
		if err := c.wb.wrote(off, int64(n)); err != nil {
			return err
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// ignoringEINTR retries fn while it is interrupted by a signal before doing
// anything (Go installs its handlers with SA_RESTART, but not every path
// restarts).
func ignoringEINTR(fn func() (int, error)) (int, error) {
	for {
		n, err := fn()
		if !errors.Is(err, unix.EINTR) {
			return n, err
		}
	}
}

// waitRate waits until the limiter lets n bytes through, or ctx ends (its
// error is returned as it is, so cancellation reads the same everywhere).
func waitRate(ctx context.Context, l *rate.Limiter, n int) error {
	r := l.ReserveN(time.Now(), n)
	if !r.OK() {
		return fmt.Errorf("rate limit: %d bytes exceed the burst of %d", n, l.Burst())
	}
	d := r.Delay()
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		r.Cancel()
		return ctx.Err()
	}
}
