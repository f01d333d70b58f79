package qcow2

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeQemuImg writes an executable at path that prints version v and
// appends a line to calls each time it runs. It is written under another
// name and renamed into place, as an upgrade installs a binary.
func fakeQemuImg(t *testing.T, path, calls, v string) {
	t.Helper()
	script := "#!/bin/sh\necho run >> '" + calls + "'\necho 'qemu-img version " + v + "'\n"
	tmp := path + ".new"
	require.NoError(t, os.WriteFile(tmp, []byte(script), 0o755))
	require.NoError(t, os.Rename(tmp, path))
}

func runs(t *testing.T, calls string) int {
	t.Helper()
	b, err := os.ReadFile(calls)
	if os.IsNotExist(err) {
		return 0
	}
	require.NoError(t, err)
	return strings.Count(string(b), "run\n")
}

// TestVersionCached: the version of a binary that has not changed is
// read from the cache without running it; an upgraded binary (a new file
// under the name), a symbolic link to another binary, a binary changed too
// recently to be told apart from its previous content, and an unreadable
// cache all run qemu-img again and give its version.
func TestVersionCached(t *testing.T) {
	dir := t.TempDir()
	bin, calls := filepath.Join(dir, "qemu-img"), filepath.Join(dir, "calls")
	cache := filepath.Join(dir, "cache", "qemu-img-version.json")
	later := time.Now().Add(time.Hour) // the binary has settled by then
	// version asks for the version of path and checks it is want.
	version := func(path, cache string, now time.Time, want string, msg ...any) {
		t.Helper()
		v, err := versionCached(path, cache, now)
		require.NoError(t, err)
		assert.Equal(t, want, v, msg...)
	}

	fakeQemuImg(t, bin, calls, "7.2.0")
	version(bin, cache, later, "7.2.0")
	assert.Equal(t, 1, runs(t, calls))
	version(bin, cache, later, "7.2.0", "from the cache")
	assert.Equal(t, 1, runs(t, calls), "a cached version does not start qemu-img")

	// An upgrade: same size, new file.
	fakeQemuImg(t, bin, calls, "8.1.0")
	version(bin, cache, later, "8.1.0")
	assert.Equal(t, 2, runs(t, calls))

	// Another binary reached through a symbolic link of the same name.
	other := filepath.Join(dir, "other-qemu-img")
	fakeQemuImg(t, other, calls, "9.0.0")
	link := filepath.Join(dir, "link", "qemu-img")
	require.NoError(t, os.MkdirAll(filepath.Dir(link), 0o755))
	require.NoError(t, os.Symlink(other, link))
	version(link, cache, later, "9.0.0")
	assert.Equal(t, 3, runs(t, calls))
	version(bin, cache, later, "8.1.0", "the entry is the other binary's now")
	assert.Equal(t, 4, runs(t, calls))

	// Changed just now: its version is given but not remembered.
	fakeQemuImg(t, bin, calls, "8.2.0")
	version(bin, cache, time.Now(), "8.2.0")
	version(bin, cache, time.Now(), "8.2.0")
	assert.Equal(t, 6, runs(t, calls), "a binary changed within the last ticks runs every time")

	// A damaged cache file is ignored and replaced.
	require.NoError(t, os.WriteFile(cache, []byte("{not json"), 0o644))
	version(bin, cache, later, "8.2.0")
	version(bin, cache, later, "8.2.0")
	assert.Equal(t, 7, runs(t, calls))

	// No cache file: qemu-img runs every time.
	version(bin, "", later, "8.2.0")
	version(bin, "", later, "8.2.0")
	assert.Equal(t, 9, runs(t, calls))
}

// TestVersionCachedFailure: a binary that fails is reported as failing
// and nothing is remembered for it.
func TestVersionCachedFailure(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "qemu-img")
	cache := filepath.Join(dir, "cache.json")
	require.NoError(t, os.WriteFile(bin, []byte("#!/bin/sh\nexit 3\n"), 0o755))
	_, err := versionCached(bin, cache, time.Now().Add(time.Hour))
	require.Error(t, err)
	assert.NoFileExists(t, cache)
	_, err = versionCached(filepath.Join(dir, "missing"), cache, time.Now().Add(time.Hour))
	require.Error(t, err)
	assert.NoFileExists(t, cache)
}
