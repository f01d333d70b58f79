package copyfile

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// mountTmpfs mounts a tmpfs with the given flags and options on a fresh
// directory, unmounted when the test ends. It skips the test when this
// process may not mount (not root, or a container without CAP_SYS_ADMIN).
func mountTmpfs(t *testing.T, flags uintptr, data string) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", flags, data); err != nil {
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
			t.Skipf("cannot mount a tmpfs here (%v): the test needs root with CAP_SYS_ADMIN", err)
		}
		require.NoError(t, err)
	}
	// Registered after TempDir's cleanup, so it runs before the removal.
	t.Cleanup(func() { assert.NoError(t, unix.Unmount(dir, 0)) })
	return dir
}

// TestCopyNoSpace fills a 1 MiB tmpfs: the copy must fail with ENOSPC,
// leave no temp file and leave the previous destination as it was. The
// source is on another file system (copy_file_range: EXDEV, so read/write)
// or on the same tmpfs (copy_file_range itself fails).
func TestCopyNoSpace(t *testing.T) {
	t.Parallel()
	data := randomBytes(4*mib, 13)
	cases := []struct {
		name    string
		srcDir  func(t *testing.T, tmpfs string) string
		tmpfsSz string
	}{
		{"other file system", func(t *testing.T, _ string) string { return t.TempDir() }, "size=1m"},
		{"same file system", func(_ *testing.T, tmpfs string) string { return tmpfs }, "size=6m"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			both(t, func(t *testing.T, opt Options) {
				dir := mountTmpfs(t, 0, tc.tmpfsSz)
				src := filepath.Join(tc.srcDir(t, dir), "src")
				writeFile(t, src, int64(len(data)), map[int64][]byte{0: data})
				dst := filepath.Join(dir, "dst")
				require.NoError(t, os.WriteFile(dst, []byte("previous backup"), 0o644))
				before := dirNames(t, dir)

				_, err := Copy(context.Background(), src, dst, opt)
				require.Error(t, err)
				assert.ErrorIs(t, err, unix.ENOSPC)
				assert.Contains(t, err.Error(), "no space left")
				t.Log(err)
				assert.Equal(t, before, dirNames(t, dir), "temp file left behind")
				assertFile(t, dst, "previous backup")
			})
		})
	}
}

// TestCopyReadOnlyDir uses a read-only mount: permission bits do not stop
// root, but EROFS does.
func TestCopyReadOnlyDir(t *testing.T) {
	t.Parallel()
	dir := mountTmpfs(t, unix.MS_RDONLY, "size=1m")
	src := filepath.Join(t.TempDir(), "src")
	require.NoError(t, os.WriteFile(src, []byte("data"), 0o644))
	_, err := Copy(context.Background(), src, filepath.Join(dir, "dst"), Options{})
	assert.ErrorIs(t, err, unix.EROFS)
	assert.Empty(t, dirNames(t, dir))
}
