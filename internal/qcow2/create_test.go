package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestCreateMatchesQemuImg: Create writes the very file qemu-img create
// writes (the content; qemu-img allocates the L1 table's zeros, Create
// leaves them a hole), over sizes that need one and several L1 clusters,
// sizes that are not multiples of 512, and backing references that are
// relative, odd, or absent; qemu-img check finds the images clean.
func TestCreateMatchesQemuImg(t *testing.T) {
	dir := t.TempDir()
	sizes := []int64{1, 1000, 64 << 20, 4 << 30, 4<<30 + 512, 5 << 40}
	backings := []string{"", "base.qcow2", "../odd dir/x.cbt-20261202-170000", "a:b"}
	for _, size := range sizes {
		for i, backing := range backings {
			name := strconv.FormatInt(size, 10) + "-" + strconv.Itoa(i)
			want, got := filepath.Join(dir, name+".want"), filepath.Join(dir, name+".got")
			args := []string{"create", "-q", "-f", "qcow2"}
			if backing != "" {
				args = append(args, "-b", backing, "-F", "qcow2", "-u")
			}
			mustQemuImg(t, append(args, want, strconv.FormatInt(size, 10))...)
			require.NoError(t, os.WriteFile(got, []byte("an older file, longer than the header cluster"+string(make([]byte, 300000))), 0o600))
			require.NoError(t, Create(got, size, backing, "qcow2"), name)
			w, err := os.ReadFile(want)
			require.NoError(t, err)
			g, err := os.ReadFile(got)
			require.NoError(t, err)
			if !assert.True(t, bytes.Equal(w, g), "%s: %d bytes written by qemu-img, %d by Create", name, len(w), len(g)) {
				continue
			}
			out, err := qemuImg(t, "check", ImageOpts("qcow2", got, nil))
			assert.NoError(t, err, "%s: %s", name, out)
			b, err := BackingFile(got)
			require.NoError(t, err)
			assert.Equal(t, backing, b)
		}
	}
}

// TestCreateRefuses: what qemu-img create refuses is refused.
func TestCreateRefuses(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "x.qcow2")
	require.Error(t, Create(p, 0, "", ""), "no size")
	require.Error(t, Create(p, 1<<20, "base", ""), "a backing file without a format")
	require.Error(t, Create(p, 1<<20, "base", "no such format"))
	require.Error(t, Create(p, 1<<20, "a\x00b", "qcow2"))
	require.Error(t, Create(filepath.Join(dir, "missing", "x.qcow2"), 1<<20, "", ""))
}
