package copyfile

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

const waitFlags = unix.SYNC_FILE_RANGE_WAIT_BEFORE | unix.SYNC_FILE_RANGE_WRITE | unix.SYNC_FILE_RANGE_WAIT_AFTER

// syncCall is one sync_file_range call of a copy.
type syncCall struct {
	off, end int64
	flags    int
}

// syncRecorder records a copy's sync_file_range calls, passes them on to
// the kernel, and can fail the call numbered failAt (from 1) with failErr.
type syncRecorder struct {
	mu      sync.Mutex
	calls   []syncCall
	failAt  int
	failErr error
}

func (r *syncRecorder) sync(fd int, off, n int64, flags int) error {
	r.mu.Lock()
	r.calls = append(r.calls, syncCall{off, off + n, flags})
	fail := len(r.calls) == r.failAt
	r.mu.Unlock()
	if fail {
		return r.failErr
	}
	return unix.SyncFileRange(fd, off, n, flags)
}

// TestWritebackPacing copies a dense 100 MiB file and checks the
// writeback calls: every chunk is started as soon as it is written, the
// chunk before it is waited for right after, so at most two chunks are
// ever dirty, and together the chunks cover the whole file in order.
func TestWritebackPacing(t *testing.T) {
	t.Parallel()
	const size = 100 * mib
	src := tempDirFile(t, "src")
	f, err := os.Create(src)
	require.NoError(t, err)
	stamped(t, f, 0, size)
	require.NoError(t, f.Close())

	both(t, func(t *testing.T, opt Options) {
		rec := &syncRecorder{}
		opt.syncRange = rec.sync
		dst := tempDirFile(t, "dst")
		_, err := Copy(context.Background(), src, dst, opt)
		require.NoError(t, err)
		assertSameContent(t, src, dst)

		var started []syncCall
		waited := int64(0) // everything below is on disk
		for i, c := range rec.calls {
			switch c.flags {
			case unix.SYNC_FILE_RANGE_WRITE:
				if len(started) > 0 {
					assert.Equal(t, started[len(started)-1].end, c.off, "call %d: chunks follow each other", i)
				} else {
					assert.Zero(t, c.off)
				}
				assert.LessOrEqual(t, c.end-waited, int64(2*writebackChunk), "call %d: more than two chunks dirty", i)
				started = append(started, c)
			case waitFlags:
				require.GreaterOrEqual(t, len(started), 2, "call %d waits before two chunks were started", i)
				assert.Equal(t, started[len(started)-2], syncCall{c.off, c.end, unix.SYNC_FILE_RANGE_WRITE},
					"call %d waits for the chunk before the last one started", i)
				waited = c.end
			default:
				t.Errorf("call %d: unexpected flags %#x", i, c.flags)
			}
		}
		require.NotEmpty(t, started)
		assert.Equal(t, int64(size), started[len(started)-1].end, "the last chunk is started too")
		for _, c := range started[:len(started)-1] {
			assert.Equal(t, int64(writebackChunk), c.end-c.off, "full chunks in a dense file")
		}
	})
}

// TestWritebackSparse: the chunks of a sparse copy count data only, lie
// within the data, and go forward.
func TestWritebackSparse(t *testing.T) {
	t.Parallel()
	src := tempDirFile(t, "src")
	writeFile(t, src, 256*mib, map[int64][]byte{
		mib:       randomBytes(10*mib, 40),
		100 * mib: randomBytes(10*mib, 41),
		200 * mib: randomBytes(10*mib+5, 42),
	})
	both(t, func(t *testing.T, opt Options) {
		rec := &syncRecorder{}
		opt.syncRange = rec.sync
		dst := tempDirFile(t, "dst")
		_, err := Copy(context.Background(), src, dst, opt)
		require.NoError(t, err)
		assertSameContent(t, src, dst)
		// Extents end on file system blocks.
		lastEnd := (210*mib + 5 + blockSize - 1) / blockSize * blockSize
		prevEnd := int64(0)
		for _, c := range rec.calls {
			if c.flags != unix.SYNC_FILE_RANGE_WRITE {
				continue
			}
			assert.GreaterOrEqual(t, c.off, prevEnd)
			assert.GreaterOrEqual(t, c.off, mib)
			assert.LessOrEqual(t, c.end, lastEnd)
			prevEnd = c.end
		}
		assert.Equal(t, lastEnd, prevEnd, "the last data is started too")
	})
}

// TestWritebackError: a writeback error (the kernel reports it once, so
// the final fsync would not) fails the copy like a write error: no temp
// file, the previous destination intact.
func TestWritebackError(t *testing.T) {
	t.Parallel()
	src := tempDirFile(t, "src")
	writeFile(t, src, 40*mib, map[int64][]byte{0: randomBytes(40*mib, 43)})
	both(t, func(t *testing.T, opt Options) {
		opt.syncRange = (&syncRecorder{failAt: 2, failErr: unix.EIO}).sync
		dir := t.TempDir()
		dst := filepath.Join(dir, "dst")
		require.NoError(t, os.WriteFile(dst, []byte("previous backup"), 0o644))
		_, err := Copy(context.Background(), src, dst, opt)
		assert.ErrorIs(t, err, unix.EIO)
		assert.ErrorContains(t, err, "writeback: input/output error")
		assert.Equal(t, []string{"dst"}, dirNames(t, dir))
		assertFile(t, dst, "previous backup")
	})
}

// TestWritebackUnsupported: where sync_file_range does not work, the copy
// goes on without it (the final fsync still makes it durable) and does
// not ask again.
func TestWritebackUnsupported(t *testing.T) {
	t.Parallel()
	src := tempDirFile(t, "src")
	writeFile(t, src, 40*mib, map[int64][]byte{0: randomBytes(40*mib, 44)})
	for _, errno := range []unix.Errno{unix.EINVAL, unix.ENOSYS, unix.ESPIPE, unix.EPERM} {
		rec := &syncRecorder{failAt: 1, failErr: errno}
		dst := tempDirFile(t, "dst")
		_, err := Copy(context.Background(), src, dst, Options{syncRange: rec.sync})
		require.NoError(t, err, "%v", errno)
		assertSameContent(t, src, dst)
		assert.Len(t, rec.calls, 1, "%v: asked again after it failed", errno)
	}
}
