package copyfile

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSameContent(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, data, 0o644))
		return p
	}
	big := randomBytes(3*bufSize+17, 5)
	other := append([]byte(nil), big...)
	other[2*bufSize+3] ^= 1
	a := write("a", big)
	for _, tc := range []struct {
		name string
		b    []byte
		same bool
	}{
		{"identical", big, true},
		{"one byte differs late", other, false},
		{"shorter", big[:len(big)-1], false},
		{"empty", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			same, err := SameContent(a, write(tc.name, tc.b))
			require.NoError(t, err)
			assert.Equal(t, tc.same, same)
		})
	}
	same, err := SameContent(write("e1", nil), write("e2", nil))
	require.NoError(t, err)
	assert.True(t, same, "two empty files")
	_, err = SameContent(a, filepath.Join(dir, "missing"))
	assert.Error(t, err)
}

// TestSameContentKeepsAtime: comparing a cp -p copy with the previous one
// (fi-backup does it right before the rename) leaves the access time cp -p
// gave it, although relatime would move it (atime before ctime).
func TestSameContentKeepsAtime(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	require.NoError(t, os.WriteFile(a, []byte("same"), 0o644))
	require.NoError(t, os.WriteFile(b, []byte("same"), 0o644))
	old := time.Unix(1600000000, 0)
	require.NoError(t, os.Chtimes(a, old, old))
	same, err := SameContent(a, b)
	require.NoError(t, err)
	assert.True(t, same)
	assert.Equal(t, old.UnixNano(), statOf(t, a).Atim.Nano())
}

// TestHashFileKeepsAtime: --verify reads backup files without moving
// their access times.
func TestHashFileKeepsAtime(t *testing.T) {
	t.Parallel()
	p := filepath.Join(t.TempDir(), "f")
	require.NoError(t, os.WriteFile(p, []byte("backup"), 0o644))
	old := time.Unix(1600000000, 0)
	require.NoError(t, os.Chtimes(p, old, old))
	_, err := HashFile(p)
	require.NoError(t, err)
	assert.Equal(t, old.UnixNano(), statOf(t, p).Atim.Nano())
}
