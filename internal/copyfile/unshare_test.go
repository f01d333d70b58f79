package copyfile

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestUnshareSeparatesHardLinks: after Unshare, writing through the name
// leaves the other hard link's bytes alone, and the name keeps its content,
// mode and (with Preserve) times.
func TestUnshareSeparatesHardLinks(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path, link := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "gen.qcow2")
	writeFile(t, path, 2*mib, map[int64][]byte{0: randomBytes(mib, 7)})
	require.NoError(t, os.Chmod(path, 0o640))
	old := time.Date(2020, 1, 2, 3, 4, 5, 6, time.UTC)
	require.NoError(t, os.Chtimes(path, old, old))
	require.NoError(t, os.Link(path, link))

	_, err := Unshare(context.Background(), path, Options{Preserve: true})
	require.NoError(t, err)

	assertSameContent(t, link, path)
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), uint64(st.Sys().(*syscall.Stat_t).Nlink), "the name has a file of its own")
	assert.Equal(t, os.FileMode(0o640), st.Mode().Perm())
	assert.True(t, st.ModTime().Equal(old), "mtime kept: %v", st.ModTime())

	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte("changed"), 0)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	b, err := os.ReadFile(link)
	require.NoError(t, err)
	assert.NotEqual(t, "changed", string(b[:7]), "the other link kept the old bytes")
	assertNoTemps(t, dir)
}
