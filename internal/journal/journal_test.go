package journal

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/testenv"
)

// TestWrittenSafely: a record is a fresh 0600 file; a link planted at its
// name is replaced, never written through.
func TestWrittenSafely(t *testing.T) {
	s := Store{Dir: t.TempDir()}
	victim := filepath.Join(t.TempDir(), "victim")
	require.NoError(t, os.WriteFile(victim, []byte("precious"), 0o644))
	require.NoError(t, os.Symlink(victim, s.Path("dom")))

	require.NoError(t, s.Write(Record{Domain: "dom", Disk: "vda", Kind: "blockcommit", Top: "/t", Base: "/b"}))
	b, err := os.ReadFile(victim)
	require.NoError(t, err)
	assert.Equal(t, "precious", string(b), "not written through the link")
	st, err := os.Lstat(s.Path("dom"))
	require.NoError(t, err)
	assert.True(t, st.Mode().IsRegular())
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	r, err := s.Read("dom")
	require.NoError(t, err)
	assert.Equal(t, Record{Domain: "dom", Disk: "vda", Kind: "blockcommit", Top: "/t", Base: "/b", PID: os.Getpid()}, *r)
	entries, err := os.ReadDir(s.Dir)
	require.NoError(t, err)
	assert.Len(t, entries, 1, "no temporary file left")
	assert.Equal(t, []string{"dom"}, s.Domains())
	require.NoError(t, s.Clear("dom"))
	r, err = s.Read("dom")
	assert.NoError(t, err)
	assert.Nil(t, r)
	assert.NoError(t, s.Clear("dom"), "clearing no record is fine")
}

// TestNotTrusted: a journal file this tool did not write (a link, a file of
// another user, one others may write, a directory, garbage, another
// domain's) is refused with ErrUntrusted.
func TestNotTrusted(t *testing.T) {
	valid := []byte(`{"domain":"dom","disk":"vda","kind":"blockcommit","pid":1}`)
	cases := []struct {
		name  string
		plant func(t *testing.T, p string)
	}{
		{"symlink", func(t *testing.T, p string) {
			target := filepath.Join(t.TempDir(), "j")
			require.NoError(t, os.WriteFile(target, valid, 0o600))
			require.NoError(t, os.Symlink(target, p))
		}},
		{"other owner", func(t *testing.T, p string) {
			testenv.RequireRoot(t)
			require.NoError(t, os.WriteFile(p, valid, 0o600))
			require.NoError(t, os.Chown(p, 65534, 65534))
		}},
		{"writable by others", func(t *testing.T, p string) {
			require.NoError(t, os.WriteFile(p, valid, 0o600))
			require.NoError(t, os.Chmod(p, 0o666))
		}},
		{"directory", func(t *testing.T, p string) { require.NoError(t, os.Mkdir(p, 0o700)) }},
		{"not JSON", func(t *testing.T, p string) { require.NoError(t, os.WriteFile(p, []byte("rm -rf"), 0o600)) }},
		{"another domain", func(t *testing.T, p string) {
			require.NoError(t, os.WriteFile(p, []byte(`{"domain":"other","kind":"dump"}`), 0o600))
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := Store{Dir: t.TempDir()}
			tc.plant(t, s.Path("dom"))
			r, err := s.Read("dom")
			assert.ErrorIs(t, err, ErrUntrusted)
			assert.Nil(t, r)
		})
	}
}

// TestClearFailureIsAnError: a journal that cannot be removed is reported
// to the caller (who warns: the next run will look at the domain again).
func TestClearFailureIsAnError(t *testing.T) {
	s := Store{Dir: t.TempDir()}
	require.NoError(t, os.Mkdir(s.Path("dom"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(s.Path("dom"), "x"), nil, 0o600))
	assert.Error(t, s.Clear("dom"))
}
