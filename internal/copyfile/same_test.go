package copyfile

import (
	"os"
	"path/filepath"
	"testing"

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
