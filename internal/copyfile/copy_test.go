package copyfile

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCopyContent(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		size int64
		data map[int64][]byte
	}{
		{"empty", 0, nil},
		{"small", 11, map[int64][]byte{0: []byte("hello world")}},
		{"3MiB and odd bytes", 3*mib + 1234, map[int64][]byte{0: randomBytes(3*mib+1234, 1)}},
		{"only a hole", 5 * mib, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			both(t, func(t *testing.T, opt Options) {
				src := tempDirFile(t, "src.qcow2")
				writeFile(t, src, tc.size, tc.data)
				dst := tempDirFile(t, "dst.qcow2")
				stats, err := Copy(context.Background(), src, dst, opt)
				require.NoError(t, err)
				assertSameContent(t, src, dst)
				assert.LessOrEqual(t, stats.Bytes, tc.size)
				assertNoTemps(t, filepath.Dir(dst))
			})
		})
	}
}

// TestCopySparse copies a 64 MiB file with data/hole/data/hole/data/hole
// and checks that the copy stayed sparse.
func TestCopySparse(t *testing.T) {
	t.Parallel()
	both(t, func(t *testing.T, opt Options) {
		const size = 64 * mib
		data := map[int64][]byte{
			0:        randomBytes(mib+123, 2),
			8 * mib:  randomBytes(mib+77, 3),
			40 * mib: randomBytes(2*mib+1, 4),
		}
		src := tempDirFile(t, "src.qcow2")
		writeFile(t, src, size, data)
		dst := tempDirFile(t, "dst.qcow2")

		stats, err := Copy(context.Background(), src, dst, opt)
		require.NoError(t, err)
		assertSameContent(t, src, dst)

		sst, dstSt := statOf(t, src), statOf(t, dst)
		assert.Equal(t, int64(size), dstSt.Size)
		assert.LessOrEqual(t, dstSt.Blocks, sst.Blocks+int64(len(data))*extentSlack,
			"copy allocates more than the source")
		assert.Less(t, dstSt.Blocks*sector, int64(size)/8, "copy is not sparse")
		if !stats.Reflinked {
			assert.Less(t, stats.Bytes, int64(size)/8, "holes were copied as data")
		}
	})
}

// TestCopyZeroBlock checks that an explicitly written all-zero megabyte is
// copied correctly by both paths and becomes a hole with read/write.
func TestCopyZeroBlock(t *testing.T) {
	t.Parallel()
	src := tempDirFile(t, "src.qcow2")
	writeFile(t, src, 3*mib, map[int64][]byte{
		0:       randomBytes(mib, 5),
		mib:     make([]byte, mib),
		2 * mib: randomBytes(mib, 6),
	})
	sst := statOf(t, src)
	require.GreaterOrEqual(t, sst.Blocks*sector, 3*mib, "the zero megabyte must be allocated in the source")

	both(t, func(t *testing.T, opt Options) {
		dst := tempDirFile(t, "dst.qcow2")
		stats, err := Copy(context.Background(), src, dst, opt)
		require.NoError(t, err)
		assertSameContent(t, src, dst)
		if opt.readWriteOnly {
			assert.Equal(t, 2*mib, stats.Bytes, "zero block was written")
			assert.LessOrEqual(t, statOf(t, dst).Blocks, sst.Blocks-mib/sector+extentSlack,
				"zero block did not become a hole")
		}
	})
}

func TestCopyModeWithoutPreserve(t *testing.T) {
	// Changes the process umask: must not run in parallel.
	old := syscall.Umask(0o022)
	t.Cleanup(func() { syscall.Umask(old) })
	for _, tc := range []struct {
		src, want os.FileMode
	}{{0o640, 0o640}, {0o666, 0o644}, {0o777, 0o755}, {0o400, 0o400}} {
		t.Run(tc.src.String(), func(t *testing.T) {
			src := tempDirFile(t, "src")
			writeFile(t, src, 10, map[int64][]byte{0: []byte("0123456789")})
			require.NoError(t, os.Chmod(src, tc.src))
			old := time.Unix(1000000000, 5)
			require.NoError(t, os.Chtimes(src, old, old))
			chownIfRoot(t, src, 1234, 1234)

			dst := tempDirFile(t, "dst")
			before := time.Now()
			_, err := Copy(context.Background(), src, dst, Options{})
			require.NoError(t, err)

			fi, err := os.Stat(dst)
			require.NoError(t, err)
			assert.Equal(t, tc.want, fi.Mode())
			assert.False(t, fi.ModTime().Before(before.Add(-time.Second)), "mtime must be the time of copying")
			st := statOf(t, dst)
			assert.Equal(t, uint32(os.Getuid()), st.Uid)
			assert.Equal(t, uint32(os.Getgid()), st.Gid)
		})
	}
}

func TestCopyPreserve(t *testing.T) {
	// Changes the process umask: must not run in parallel. A strict umask
	// shows that -p modes ignore it.
	old := syscall.Umask(0o077)
	t.Cleanup(func() { syscall.Umask(old) })
	both(t, func(t *testing.T, opt Options) {
		opt.Preserve = true
		src := tempDirFile(t, "src")
		writeFile(t, src, 8*mib, map[int64][]byte{mib: randomBytes(mib, 8)})
		mode := os.FileMode(0o754)
		if os.Geteuid() == 0 {
			chownIfRoot(t, src, 1234, 1234)
			mode |= os.ModeSetgid // chown clears it, so set it after
		}
		require.NoError(t, os.Chmod(src, mode))
		atime, mtime := time.Unix(1600000000, 123456789), time.Unix(1650000000, 987654321)
		require.NoError(t, os.Chtimes(src, atime, mtime))

		dst := tempDirFile(t, "dst")
		_, err := Copy(context.Background(), src, dst, opt)
		require.NoError(t, err)

		// Stat before reading the copy: reading it may update its atime.
		fi, err := os.Stat(dst)
		require.NoError(t, err)
		assert.Equal(t, mode, fi.Mode())
		assert.Equal(t, mtime.UnixNano(), fi.ModTime().UnixNano())
		st := statOf(t, dst)
		assert.Equal(t, atime.UnixNano(), st.Atim.Nano())
		if os.Geteuid() == 0 {
			assert.Equal(t, uint32(1234), st.Uid)
			assert.Equal(t, uint32(1234), st.Gid)
		}
		assertSameContent(t, src, dst)
	})
}

// chownIfRoot gives path to uid:gid, which only root may do; other users
// cannot run the ownership checks and skip them.
func chownIfRoot(t *testing.T, path string, uid, gid int) {
	t.Helper()
	if os.Geteuid() != 0 {
		return
	}
	require.NoError(t, os.Chown(path, uid, gid))
}

func TestCopyOverwrite(t *testing.T) {
	t.Parallel()
	both(t, func(t *testing.T, opt Options) {
		dir := t.TempDir()
		src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
		writeFile(t, src, 2*mib, map[int64][]byte{0: randomBytes(2*mib, 9)})
		require.NoError(t, os.WriteFile(dst, []byte(strings.Repeat("old ", 10000)), 0o600))
		oldIno := statOf(t, dst).Ino

		_, err := Copy(context.Background(), src, dst, opt)
		require.NoError(t, err)
		assertSameContent(t, src, dst)
		assert.NotEqual(t, oldIno, statOf(t, dst).Ino, "dst must be replaced by rename, not rewritten in place")
		assert.ElementsMatch(t, []string{"src", "dst"}, dirNames(t, dir))
	})
}

func TestCopyCancelled(t *testing.T) {
	t.Parallel()
	src := tempDirFile(t, "src")
	writeFile(t, src, 64*mib, map[int64][]byte{
		0:        randomBytes(3*mib, 10),
		20 * mib: randomBytes(3*mib, 11),
		50 * mib: randomBytes(3*mib, 12),
	})
	cases := []struct {
		name string
		ctx  func() context.Context
	}{
		{"before", func() context.Context {
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			return ctx
		}},
		// Copy checks ctx once at the start and once per chunk: the third
		// check fails after the first chunk was copied.
		{"while copying", func() context.Context { return newCountdownCtx(2) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			both(t, func(t *testing.T, opt Options) {
				dir := t.TempDir()
				dst := filepath.Join(dir, "dst")
				require.NoError(t, os.WriteFile(dst, []byte("previous backup"), 0o644))

				stats, err := Copy(tc.ctx(), src, dst, opt)
				require.Error(t, err)
				assert.ErrorIs(t, err, context.Canceled)
				assert.Contains(t, err.Error(), "copy "+src+" to "+dst+": ")
				if tc.name == "while copying" {
					assert.Positive(t, stats.Bytes, "cancel should hit in mid-copy")
				}
				assert.Equal(t, []string{"dst"}, dirNames(t, dir))
				got, err := os.ReadFile(dst)
				require.NoError(t, err)
				assert.Equal(t, "previous backup", string(got))
			})
		})
	}
}

func TestCopyErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	require.NoError(t, os.WriteFile(src, []byte("data"), 0o644))
	ctx := context.Background()

	t.Run("destination directory missing", func(t *testing.T) {
		dst := filepath.Join(dir, "nope", "dst")
		_, err := Copy(ctx, src, dst, Options{})
		require.Error(t, err)
		assert.ErrorIs(t, err, os.ErrNotExist)
		assert.Equal(t, "copy "+src+" to "+dst+": create temp: no such file or directory", err.Error())
	})
	t.Run("source missing", func(t *testing.T) {
		_, err := Copy(ctx, filepath.Join(dir, "missing"), filepath.Join(dir, "x"), Options{})
		assert.ErrorIs(t, err, os.ErrNotExist)
		assert.Contains(t, err.Error(), "open source")
		assert.NoFileExists(t, filepath.Join(dir, "x"))
	})
	t.Run("source is a directory", func(t *testing.T) {
		_, err := Copy(ctx, dir, filepath.Join(t.TempDir(), "x"), Options{})
		assert.ErrorContains(t, err, "not a regular file")
	})
	t.Run("destination is a directory", func(t *testing.T) {
		d := t.TempDir()
		_, err := Copy(ctx, src, d, Options{})
		assert.ErrorContains(t, err, "destination is a directory")
		assertNoTemps(t, filepath.Dir(d))
	})
	t.Run("same file", func(t *testing.T) {
		link := filepath.Join(t.TempDir(), "hardlink")
		require.NoError(t, os.Link(src, link))
		_, err := Copy(ctx, src, link, Options{})
		assert.ErrorContains(t, err, "same file")
		_, err = Copy(ctx, src, src, Options{})
		assert.ErrorContains(t, err, "same file")
		got, err := os.ReadFile(src)
		require.NoError(t, err)
		assert.Equal(t, "data", string(got))
	})
}

// TestCopyRateLimited: with a limit, a dense copy never goes faster than
// the limit (holes are free), and the copy is still exact.
func TestCopyRateLimited(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i%251 + 1)
	}
	require.NoError(t, os.WriteFile(src, data, 0o644))
	require.NoError(t, os.Truncate(src, 64<<20)) // a 61 MiB hole after the data
	dst := filepath.Join(dir, "dst")
	start := time.Now()
	st, err := Copy(context.Background(), src, dst, Options{Limit: NewLimiter(2 << 20), readWriteOnly: true})
	require.NoError(t, err)
	took := time.Since(start)
	assert.GreaterOrEqual(t, took, 1400*time.Millisecond, "3 MiB at 2 MiB/s: 1.5 s at least")
	assert.Equal(t, int64(3<<20), st.Bytes, "holes are not copied, so not paid for")
	got, err := os.ReadFile(dst)
	require.NoError(t, err)
	assert.Equal(t, data, got[:len(data)])
	assert.Len(t, got, 64<<20)
}

// TestCopyRateLimitedCancelled: a copy waiting for its rate is interrupted
// by its context like any other.
func TestCopyRateLimitedCancelled(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	require.NoError(t, os.WriteFile(src, bytes.Repeat([]byte{7}, 4<<20), 0o644))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := Copy(ctx, src, filepath.Join(dir, "dst"), Options{Limit: NewLimiter(1 << 20)})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.NoFileExists(t, filepath.Join(dir, "dst"))
}
