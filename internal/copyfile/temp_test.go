package copyfile

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestIsTemp(t *testing.T) {
	t.Parallel()
	for name, want := range map[string]bool{
		".disk.qcow2.fi-backup-tmp-0123456789abcdef":           true,
		"..hidden.fi-backup-tmp-ffffffffffffffff":              true,
		tempName(strings.Repeat("x", 300), "0123456789abcdef"): true,
		"disk.qcow2.fi-backup-tmp-0123456789abcdef":            false, // no leading dot
		"..fi-backup-tmp-0123456789abcdef":                     false, // no destination name
		".fi-backup-tmp-0123456789abcdef":                      false, // no destination name
		".disk.qcow2.fi-backup-tmp-0123456789ABCDEF":           false, // upper case
		".disk.qcow2.fi-backup-tmp-0123456789abcde":            false, // short
		".disk.qcow2.fi-backup-tmp-0123456789abcdef0":          false, // long
		".disk.qcow2.fi-backup-tmp-0123456789abcdeg":           false, // not hex
		"disk.qcow2": false,
		"":           false,
	} {
		assert.Equal(t, want, IsTemp(name), "IsTemp(%q)", name)
	}
	assert.LessOrEqual(t, len(tempName(strings.Repeat("x", 300), "0123456789abcdef")), maxNameLen)
}

func TestTempNameFromCopyIsTemp(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	fd, name, err := createTemp(filepath.Join(dir, "disk.qcow2"), randomSuffix)
	require.NoError(t, err)
	require.NoError(t, unix.Close(fd))
	assert.True(t, IsTemp(filepath.Base(name)), name)
	assert.True(t, strings.HasPrefix(filepath.Base(name), ".disk.qcow2.fi-backup-tmp-"), name)
	fi, err := os.Lstat(name)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600&^processUmask()), fi.Mode(), "temp data must not be readable by others")
}

// plant puts a symlink to a victim file and a regular file at the names
// that the first two suffixes will produce, and returns the victim.
func plant(t *testing.T, dst string, suffixes ...string) (victim string) {
	t.Helper()
	victim = filepath.Join(t.TempDir(), "victim")
	require.NoError(t, os.WriteFile(victim, []byte("victim"), 0o644))
	base := filepath.Base(dst)
	require.NoError(t, os.Symlink(victim, filepath.Join(filepath.Dir(dst), tempName(base, suffixes[0]))))
	require.NoError(t, os.WriteFile(filepath.Join(filepath.Dir(dst), tempName(base, suffixes[1])), []byte("planted"), 0o644))
	return victim
}

// TestCreateTempDoesNotFollowPlantedFiles forces the first names tried to
// be a planted symlink and a planted file: createTemp must skip both
// (O_EXCL) and leave them and the symlink's target untouched.
func TestCreateTempDoesNotFollowPlantedFiles(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	dst := filepath.Join(dir, "disk.qcow2")
	suffixes := []string{"0000000000000000", "1111111111111111", "2222222222222222"}
	victim := plant(t, dst, suffixes...)
	next := 0
	fd, name, err := createTemp(dst, func() (string, error) { next++; return suffixes[next-1], nil })
	require.NoError(t, err)
	require.NoError(t, unix.Close(fd))

	assert.Equal(t, filepath.Join(dir, tempName("disk.qcow2", suffixes[2])), name)
	assertFile(t, victim, "victim")
	assertFile(t, filepath.Join(dir, tempName("disk.qcow2", suffixes[1])), "planted")
	target, err := os.Readlink(filepath.Join(dir, tempName("disk.qcow2", suffixes[0])))
	require.NoError(t, err)
	assert.Equal(t, victim, target)

	_, _, err = createTemp(dst, func() (string, error) { return suffixes[0], nil })
	assert.ErrorIs(t, err, unix.EEXIST, "gives up when every name is taken")
}

// TestCopyAndCleanTempsLeavePlantedFilesAlone: a symlink and a directory
// named like temp files are neither followed by Copy nor removed by
// CleanTemps, which removes only regular files with the exact temp pattern.
func TestCopyAndCleanTempsLeavePlantedFilesAlone(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	src := filepath.Join(t.TempDir(), "src")
	require.NoError(t, os.WriteFile(src, []byte("source data"), 0o644))
	dst := filepath.Join(dir, "disk.qcow2")
	victim := plant(t, dst, "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb")
	plantedLink := filepath.Join(dir, tempName("disk.qcow2", "aaaaaaaaaaaaaaaa"))
	leftover := filepath.Join(dir, tempName("disk.qcow2", "bbbbbbbbbbbbbbbb"))
	planted := map[string]string{
		tempName("disk.qcow2", "cccccccccccccccc"): "dir",
		"disk.qcow2.fi-backup-tmp-nothex!":         "not a temp name",
		"notes.txt":                                "not a temp name",
	}
	for name, what := range planted {
		if what == "dir" {
			require.NoError(t, os.Mkdir(filepath.Join(dir, name), 0o755))
			continue
		}
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(what), 0o644))
	}

	_, err := Copy(context.Background(), src, dst, Options{})
	require.NoError(t, err)
	assertFile(t, dst, "source data")
	assertFile(t, victim, "victim")

	removed, err := CleanTemps(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{leftover}, removed, "only the regular temp-pattern file goes")
	fi, err := os.Lstat(plantedLink)
	require.NoError(t, err)
	assert.Equal(t, os.ModeSymlink, fi.Mode().Type())
	assertFile(t, victim, "victim")
	for name := range planted {
		_, err := os.Lstat(filepath.Join(dir, name))
		assert.NoError(t, err, "%s must stay", name)
	}
	_, err = CleanTemps(filepath.Join(dir, "missing"))
	assert.Error(t, err)
}

func assertFile(t *testing.T, path, want string) {
	t.Helper()
	got, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, want, string(got), path)
}

// TestCleanTempsSkipsLiveAndFresh: a temp file a running Copy holds (its
// flock) survives CleanTemps from another run sharing the directory; a
// dead writer's file goes at once (it was locked before it had a name);
// with a grace period (file systems without O_TMPFILE) a young one stays.
func TestCleanTempsSkipsLiveAndFresh(t *testing.T) {
	dir := t.TempDir()
	require.Zero(t, graceFor(dir), "the test directory's file system has O_TMPFILE")
	fd, name, err := createTemp(filepath.Join(dir, "disk.qcow2"), randomSuffix)
	require.NoError(t, err)
	removed, err := CleanTemps(dir)
	require.NoError(t, err)
	assert.Empty(t, removed, "a live copy's temp file is kept")
	assert.FileExists(t, name)
	require.NoError(t, unix.Close(fd)) // the writer is gone
	removed, err = CleanTemps(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{name}, removed, "no grace needed: removed at once")

	fd, name, err = createTemp(filepath.Join(dir, "disk.qcow2"), randomSuffix)
	require.NoError(t, err)
	require.NoError(t, unix.Close(fd))
	removed, err = cleanTemps(dir, time.Hour)
	require.NoError(t, err)
	assert.Empty(t, removed, "a file younger than the grace period is kept")
	assert.FileExists(t, name)
}
