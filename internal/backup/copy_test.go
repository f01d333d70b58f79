package backup

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/virt"
	"github.com/fi-backup/fi-backup/internal/virt/virttest"
)

// qemuImg creates a qcow2 image with qemu-img (real files, as on a host).
func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	require.NoError(t, err, "qemu-img %v: %s", args, out)
}

// copyRunner is a Runner that copies into a fresh backup directory with
// the real qemu-img; its output is returned too.
func copyRunner(t *testing.T) (*Runner, *bytes.Buffer) {
	t.Helper()
	r, out := testRunner(t, virttest.New(nil))
	q, err := exec.LookPath("qemu-img")
	require.NoError(t, err)
	r.QemuImg = q
	r.BackupDir = t.TempDir()
	return r, out
}

func gens(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "*.gen-*"))
	require.NoError(t, err)
	return m
}

// TestGenerationOnlyWhenContentDiffers: a source whose time moved but
// whose bytes did not is copied again without keeping a generation; one
// whose content changed keeps the previous copy as a generation (B10).
func TestGenerationOnlyWhenContentDiffers(t *testing.T) {
	r, _ := copyRunner(t)
	bk := r.BackupDir
	src := filepath.Join(t.TempDir(), "disk.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", src, "16M")
	chain := []virt.Image{{Path: src, Format: "qcow2"}}
	require.NoError(t, r.copyChain(context.Background(), "dom", chain, true))

	later := time.Now().Add(time.Minute)
	require.NoError(t, os.Chtimes(src, later, later)) // touched, not changed
	require.NoError(t, r.copyChain(context.Background(), "dom", chain, true))
	assert.Empty(t, gens(t, bk), "no generation for identical content")
	st, err := os.Stat(filepath.Join(bk, "disk.qcow2"))
	require.NoError(t, err)
	assert.True(t, st.ModTime().Equal(later), "the copy carries the new time (cp -p)")

	out2, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", src).CombinedOutput()
	require.NoError(t, err, string(out2))
	even := later.Add(time.Minute)
	require.NoError(t, os.Chtimes(src, even, even))
	require.NoError(t, r.copyChain(context.Background(), "dom", chain, true))
	assert.Len(t, gens(t, bk), 1, "changed content: the previous copy is kept")
}

// TestNarrowModeFailureIsReported: when an up-to-date copy cannot be made
// as unreadable as its narrowed source (here: an immutable file), the run
// says so.
func TestNarrowModeFailureIsReported(t *testing.T) {
	requireRoot(t)
	r, buf := copyRunner(t)
	src := filepath.Join(t.TempDir(), "disk.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", src, "16M")
	require.NoError(t, os.Chmod(src, 0o644))
	chain := []virt.Image{{Path: src, Format: "qcow2"}}
	require.NoError(t, r.copyChain(context.Background(), "dom", chain, true))
	dst := filepath.Join(r.BackupDir, "disk.qcow2")
	require.NoError(t, os.Chmod(src, 0o600))
	chattr := exec.Command("chattr", "+i", dst)
	if b, err := chattr.CombinedOutput(); err != nil {
		t.Fatalf("chattr +i: %v %s", err, b)
	}
	t.Cleanup(func() { _ = exec.Command("chattr", "-i", dst).Run() })
	require.NoError(t, r.copyChain(context.Background(), "dom", chain, true))
	assert.Contains(t, buf.String(), "[WAR] Could not narrow the mode of '"+dst+"' to its source's (0600): ")
}

// TestUnreadableBackingReferenceIsReported: an up-to-date copy whose header
// cannot be read (a backing name pointing past the end of the file) is
// reported instead of silently left as it is.
func TestUnreadableBackingReferenceIsReported(t *testing.T) {
	r, buf := copyRunner(t)
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", base, "16M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
	chain := []virt.Image{{Path: top, Format: "qcow2"}, {Path: base, Format: "qcow2"}}
	require.NoError(t, r.copyChain(context.Background(), "dom", chain, true))
	dst := filepath.Join(r.BackupDir, "top.qcow2")
	f, err := os.OpenFile(dst, os.O_RDWR, 0)
	require.NoError(t, err)
	var off [8]byte
	binary.BigEndian.PutUint64(off[:], 1<<40) // backing_file_offset far past EOF
	_, err = f.WriteAt(off[:], 8)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	st, err := os.Stat(top)
	require.NoError(t, err)
	require.NoError(t, os.Chtimes(dst, st.ModTime(), st.ModTime()))
	require.NoError(t, r.copyChain(context.Background(), "dom", chain, true))
	assert.Contains(t, buf.String(), "[WAR] Cannot read the backing reference of '"+dst+"': ")
}
