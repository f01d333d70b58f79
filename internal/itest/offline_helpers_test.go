package itest

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Helpers of the offline backup tests (offline_test.go).

// offMeta is what cp -p keeps (mode, owner, group, mtime), plus what shows
// that a file was left alone (inode, ctime).
type offMeta struct {
	Mode     os.FileMode
	UID, GID uint32
	Mtime    int64 // ns
	Ctime    int64 // ns
	Ino      uint64
}

func offMetaOf(t *testing.T, p string) offMeta {
	t.Helper()
	fi, err := os.Lstat(p)
	require.NoError(t, err)
	st := fi.Sys().(*syscall.Stat_t)
	return offMeta{
		Mode: fi.Mode(), UID: st.Uid, GID: st.Gid,
		Mtime: st.Mtim.Nano(), Ctime: st.Ctim.Nano(), Ino: st.Ino,
	}
}

// offAssertPreserved checks cp -p semantics: the copy has the source's mode,
// owner, group and mtime (to the nanosecond).
func offAssertPreserved(t *testing.T, src, dst string) {
	t.Helper()
	s, d := offMetaOf(t, src), offMetaOf(t, dst)
	assert.Equal(t, s.Mode, d.Mode, "mode of %s vs its source %s", dst, src)
	assert.Equal(t, s.UID, d.UID, "owner of %s vs its source %s", dst, src)
	assert.Equal(t, s.GID, d.GID, "group of %s vs its source %s", dst, src)
	assert.Equal(t, s.Mtime, d.Mtime, "mtime (ns) of %s vs its source %s", dst, src)
}

// offImage creates a 64M qcow2 image with qemu-img; backing, when set, is
// an absolute path to a qcow2 parent.
func offImage(t *testing.T, path, backing string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	if backing == "" {
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", path, "64M")
		return
	}
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, path)
}

// offWrite writes pattern at off..off+n into an image nobody has open
// (a shut-off domain's disk), through its qcow2 layer; its mtime moves on.
func offWrite(t *testing.T, image string, pattern byte, off, n string) {
	t.Helper()
	out := sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x"+hexByte(pattern)+" "+off+" "+n, image)
	require.NotContains(t, out, "rror", "qemu-io write into %s: %s", image, out)
}

func hexByte(b byte) string {
	const digits = "0123456789abcdef"
	return string([]byte{digits[b>>4], digits[b&15]})
}

type offImgInfo struct {
	Filename        string `json:"filename"`
	Format          string `json:"format"`
	BackingFilename string `json:"backing-filename"`
	BackingFormat   string `json:"backing-filename-format"`
}

// offInfo is qemu-img info of one image (no chain walk).
func offInfo(t *testing.T, image string) offImgInfo {
	t.Helper()
	out := sh(t, "qemu-img", "info", "-U", "--output=json", image)
	var i offImgInfo
	require.NoError(t, json.Unmarshal([]byte(out), &i), out)
	return i
}

// offPattern is one expected region of an image's guest-visible content.
type offPattern struct {
	P      byte
	Off, N string
}

// offAssertReads checks every region of image (read with its backing chain).
func offAssertReads(t *testing.T, image string, what string, want ...offPattern) {
	t.Helper()
	for _, w := range want {
		assert.True(t, readsBack(t, image, w.P, w.Off, w.N),
			"%s: %s should read 0x%s at %s+%s", what, image, hexByte(w.P), w.Off, w.N)
	}
}

// offTemps lists leftover temporary copies (".<name>.fi-backup-tmp-…") in dir.
func offTemps(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	for _, f := range files(t, dir) {
		if strings.Contains(f, ".fi-backup-tmp-") {
			out = append(out, f)
		}
	}
	return out
}

// offByInode returns the names in dir that are the inode ino.
func offByInode(t *testing.T, dir string, ino uint64) []string {
	t.Helper()
	var out []string
	for _, f := range files(t, dir) {
		if offMetaOf(t, filepath.Join(dir, f)).Ino == ino {
			out = append(out, f)
		}
	}
	return out
}

// offShutOff asserts the domain is still shut off (an offline backup never
// starts a domain).
func offShutOff(t *testing.T, d *Domain) {
	t.Helper()
	assert.Equal(t, "shut off", d.state(t), "%s must stay shut off", d.Name)
}
