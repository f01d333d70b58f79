package qcow2

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// qemuImg runs the real qemu-img (in the C locale) and returns its output
// and error; the tests compare this package with it.
func qemuImg(t testing.TB, args ...string) ([]byte, error) {
	t.Helper()
	cmd := exec.Command("qemu-img", args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	return cmd.CombinedOutput()
}

// mustQemuImg runs qemu-img and fails the test when it fails.
func mustQemuImg(t testing.TB, args ...string) {
	t.Helper()
	out, err := qemuImg(t, args...)
	require.NoError(t, err, "qemu-img %q: %s", args, out)
}

// create makes a qcow2 image of 16 MiB with qemu-img; opts are -o options
// ("" for none), backing and format an optional backing reference.
func create(t testing.TB, path, opts, backing, format string) string {
	t.Helper()
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	if backing != "" {
		args = append(args, "-b", backing, "-F", format, "-u")
	}
	mustQemuImg(t, append(args, path, "16M")...)
	return path
}

// copyFile copies src to dst (small test images).
func copyFile(t testing.TB, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(dst, b, 0o644))
}

// editHeader rewrites the first cluster of the image at path through edit.
func editHeader(t testing.TB, path string, edit func(c []byte)) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	c, err := readCluster(f)
	require.NoError(t, err)
	edit(c)
	_, err = f.WriteAt(c, 0)
	require.NoError(t, err)
}

// testExt is a header extension for writeExts.
type testExt struct {
	magic uint32
	data  []byte
}

// writeExts replaces a version 3 image's extensions (from header_length on)
// and removes its backing reference.
func writeExts(c []byte, exts ...testExt) {
	be := binary.BigEndian
	off := int(be.Uint32(c[100:104]))
	clear(c[off:])
	be.PutUint64(c[8:], 0)
	be.PutUint32(c[16:], 0)
	for _, e := range append(exts, testExt{}) {
		be.PutUint32(c[off:], e.magic)
		be.PutUint32(c[off+4:], uint32(len(e.data)))
		copy(c[off+8:], e.data)
		off += 8 + (len(e.data)+7)&^7
	}
}

// scratch returns a path named name in a fresh directory.
func scratch(t testing.TB, name string) string {
	return filepath.Join(t.TempDir(), name)
}
