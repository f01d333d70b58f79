package copyfile

import (
	"errors"

	"golang.org/x/sys/unix"
)

// writebackChunk is the unit in which a copy's writeback is started and
// waited for: at most two of them (the one being written to disk and the
// one being copied into the page cache) are dirty at any time.
const writebackChunk = 16 << 20

// syncRangeFunc is sync_file_range(2); tests replace it to watch the calls
// or make them fail.
type syncRangeFunc func(fd int, off, n int64, flags int) error

// writeback starts the writeback of a copy's data while the copy runs,
// instead of leaving all of it to the final fsync: as soon as a chunk of
// writebackChunk bytes has been written into the temporary file, its
// writeback is started (SYNC_FILE_RANGE_WRITE), and the copy waits until
// the chunk before it is on disk (WAIT_BEFORE|WRITE|WAIT_AFTER, which is
// data-integrity writeback of that range). The disk then writes while the
// copy reads, dirty pages stay bounded (a large copy does not flood the
// page cache and stall the guests' own writes), and the final fsync finds
// at most two chunks left. It is no substitute for that fsync: it neither
// commits metadata nor flushes the disk's cache.
//
// Writes arrive in increasing offset order (Copy walks the extents
// forward); a chunk is the byte range from the first to the end of the
// last write since the previous one, holes between extents included
// (sync_file_range skips pages that are not dirty).
type writeback struct {
	fd   int
	sync syncRangeFunc // nil: not used (reflink, unsupported)

	start, end int64 // the chunk being filled: [start, end)
	pending    int64 // bytes written into it
	prevStart  int64 // the chunk being written back: [prevStart, prevEnd)
	prevEnd    int64
}

func newWriteback(fd int, sync syncRangeFunc) *writeback {
	if sync == nil {
		sync = unix.SyncFileRange
	}
	return &writeback{fd: fd, sync: sync}
}

// wrote records that n bytes were written at off, and moves the writeback
// along when a chunk is full.
func (w *writeback) wrote(off, n int64) error {
	if w.sync == nil || n <= 0 {
		return nil
	}
	if w.pending == 0 {
		w.start = off
	}
	w.end = max(w.end, off+n)
	w.pending += n
	if w.pending < writebackChunk {
		return nil
	}
	if err := w.call(w.start, w.end, unix.SYNC_FILE_RANGE_WRITE); err != nil {
		return err
	}
	if w.prevEnd > w.prevStart {
		if err := w.call(w.prevStart, w.prevEnd, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER); err != nil {
			return err
		}
	}
	w.prevStart, w.prevEnd = w.start, w.end
	w.pending = 0
	return nil
}

// finish starts the writeback of the last, partly filled chunk, without
// waiting: the final fsync waits for it.
func (w *writeback) finish() error {
	if w.sync == nil || w.pending == 0 {
		return nil
	}
	w.pending = 0
	return w.call(w.start, w.end, unix.SYNC_FILE_RANGE_WRITE)
}

// call runs sync_file_range on [start, end). A file system or kernel that
// cannot do it (or a seccomp filter that forbids it) turns the pacing off:
// the copy is as durable without it, the final fsync just waits longer.
// Any other error (EIO, ENOSPC...) fails the copy: the kernel reports a
// writeback error once per open file, so fsync would not see it again.
func (w *writeback) call(start, end int64, flags int) error {
	_, err := ignoringEINTR(func() (int, error) { return 0, w.sync(w.fd, start, end-start, flags) })
	switch {
	case err == nil:
		return nil
	case writebackUnsupported(err):
		w.sync = nil
		return nil
	}
	return wrap("writeback", err)
}

func writebackUnsupported(err error) bool {
	for _, e := range []error{unix.ENOSYS, unix.EOPNOTSUPP, unix.EINVAL, unix.ESPIPE, unix.EPERM} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
