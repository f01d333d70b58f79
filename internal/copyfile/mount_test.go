package copyfile

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/fi-backup/fi-backup/internal/testenv"
)

// mountTmpfs mounts a tmpfs with the given flags and options on a fresh
// directory, unmounted when the test ends (the test needs root).
func mountTmpfs(t *testing.T, flags uintptr, data string) string {
	t.Helper()
	testenv.RequireRoot(t)
	dir := t.TempDir()
	require.NoError(t, unix.Mount("tmpfs", dir, "tmpfs", flags, data))
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

// mountImage makes a small file system image with mkfs (args after the
// image path are mkfs's own) and loop-mounts it on a fresh directory.
func mountImage(t *testing.T, mkfs string, args ...string) string {
	t.Helper()
	testenv.RequireRoot(t)
	img := filepath.Join(t.TempDir(), "fs.img")
	require.NoError(t, os.WriteFile(img, nil, 0o600))
	require.NoError(t, os.Truncate(img, 64<<20))
	out, err := exec.Command(mkfs, append(args, img)...).CombinedOutput()
	require.NoError(t, err, "%s: %s", mkfs, out)
	dir := t.TempDir()
	out, err = exec.Command("mount", "-o", "loop", img, dir).CombinedOutput()
	require.NoError(t, err, "mount: %s", out)
	t.Cleanup(func() {
		out, err := exec.Command("umount", dir).CombinedOutput()
		assert.NoError(t, err, "umount: %s", out)
	})
	return dir
}

// TestTimeResolutionOfRealFileSystems probes real file systems: ext4 with
// 128-byte inodes keeps whole seconds, tmpfs nanoseconds; and a cp -p copy
// onto them is up to date on the next run. (FAT's even seconds are covered
// by TestResolutionFrom and TestNeedCopyCoarseDestination: the kernels of
// the project machines have no vfat.)
func TestTimeResolutionOfRealFileSystems(t *testing.T) {
	for _, tc := range []struct {
		name string
		dir  func(t *testing.T) string
		want time.Duration
	}{
		{"ext4 -I 128", func(t *testing.T) string { return mountImage(t, "mkfs.ext4", "-q", "-F", "-I", "128") }, time.Second},
		{"tmpfs", func(t *testing.T) string { return mountTmpfs(t, 0, "size=1m") }, time.Nanosecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := tc.dir(t)
			res, err := TimeResolution(dir)
			require.NoError(t, err)
			assert.Equal(t, tc.want, res)
			for _, n := range dirNames(t, dir) {
				assert.NotContains(t, n, "probe", "the probe file is removed")
			}

			src := filepath.Join(t.TempDir(), "src")
			require.NoError(t, os.WriteFile(src, []byte("image"), 0o644))
			odd := time.Date(2024, 5, 1, 12, 0, 1, 987654321, time.UTC)
			require.NoError(t, os.Chtimes(src, odd, odd))
			dst := filepath.Join(dir, "dst")
			_, err = Copy(context.Background(), src, dst, Options{Preserve: true})
			require.NoError(t, err)
			si, err := os.Stat(src)
			require.NoError(t, err)
			di, err := os.Stat(dst)
			require.NoError(t, err)
			need, _, err := NeedCopy(si, di, res)
			require.NoError(t, err)
			assert.False(t, need, "the cp -p copy (mtime %s) is up to date for a source of %s", di.ModTime(), si.ModTime())
		})
	}
}
