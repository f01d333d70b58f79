package backupdir

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/testenv"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// newDir is a fresh backup directory using the real qemu-img; its output
// is returned too.
func newDir(t *testing.T) (*Dir, *bytes.Buffer) {
	t.Helper()
	q, err := exec.LookPath("qemu-img")
	require.NoError(t, err)
	var out bytes.Buffer
	return &Dir{Path: t.TempDir(), P: logging.New(&out, true, true), Tool: qcow2.Tool{Path: q}}, &out
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
}

// image creates a qcow2 file (on backing, when given) with pattern written
// at off (1 MiB; no write when pattern is 0).
func image(t *testing.T, path, backing string, pattern byte, off string) virt.Image {
	t.Helper()
	if backing == "" {
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
	} else {
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, path)
	}
	if pattern != 0 {
		run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x%02x %s 1M", pattern, off), path)
	}
	return virt.Image{Path: path, Format: "qcow2"}
}

// mustCopy copies a chain for domain "dom" and returns what it records.
func mustCopy(t *testing.T, d *Dir, chain []virt.Image, preserve bool) []File {
	t.Helper()
	files, err := d.CopyChain(context.Background(), "dom", chain, preserve)
	require.NoError(t, err)
	require.Len(t, files, len(chain))
	return files
}

func readsBack(t *testing.T, image string, pattern byte, off string) bool {
	t.Helper()
	out, err := exec.Command("qemu-io", "-r", "-f", "qcow2", "-c", fmt.Sprintf("read -P 0x%02x %s 1M", pattern, off), image).CombinedOutput()
	return err == nil && !bytes.Contains(out, []byte("Pattern verification failed"))
}

func gens(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "*.gen-*"))
	require.NoError(t, err)
	return m
}

func touch(t *testing.T, path string, d time.Duration) {
	t.Helper()
	later := time.Now().Add(d)
	require.NoError(t, os.Chtimes(path, later, later))
}

// TestCopyChainRelativeAndSelfContained: copies reference their parent
// copy by relative name; the directory's chain reads back every layer.
func TestCopyChainRelativeAndSelfContained(t *testing.T) {
	d, _ := newDir(t)
	host := t.TempDir()
	base := image(t, filepath.Join(host, "vm.qcow2"), "", 0x11, "0")
	top := image(t, filepath.Join(host, "vm.bimg-20240101-000001"), base.Path, 0x22, "1M")
	mustCopy(t, d, []virt.Image{top, base}, false)
	b, err := qcow2.BackingFile(filepath.Join(d.Path, "vm.bimg-20240101-000001"))
	require.NoError(t, err)
	assert.Equal(t, "vm.qcow2", b)
	assert.True(t, readsBack(t, filepath.Join(d.Path, "vm.bimg-20240101-000001"), 0x11, "0"))
	assert.True(t, readsBack(t, filepath.Join(d.Path, "vm.bimg-20240101-000001"), 0x22, "1M"))
	assert.Equal(t, base.Path, getSource(filepath.Join(d.Path, "vm.qcow2")), "the copy records its source")
}

// TestGenerations: a changed source keeps its previous copy as a
// generation, onto which every copy that depended on it is rebased, so an
// older restore point still reads back its moment (B10). A source whose
// time moved but whose bytes did not is copied again without a generation.
func TestGenerations(t *testing.T) {
	d, _ := newDir(t)
	host := t.TempDir()
	base := image(t, filepath.Join(host, "vm.qcow2"), "", 0x11, "0")
	ov := image(t, filepath.Join(host, "vm.bimg-20240101-000001"), base.Path, 0x22, "1M")
	mustCopy(t, d, []virt.Image{ov, base}, false)

	touch(t, base.Path, time.Minute) // touched, not changed
	mustCopy(t, d, []virt.Image{base}, false)
	assert.Empty(t, gens(t, d.Path), "no generation for identical content")

	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x33 2M 1M", base.Path) // a commit into the base
	touch(t, base.Path, 2*time.Minute)
	mustCopy(t, d, []virt.Image{base}, false)
	g := gens(t, d.Path)
	require.Len(t, g, 1, "changed content: the previous copy is kept")
	rp := filepath.Join(d.Path, "vm.bimg-20240101-000001")
	b, err := qcow2.BackingFile(rp)
	require.NoError(t, err)
	assert.Equal(t, filepath.Base(g[0]), b, "the dependant now reads the generation")
	assert.True(t, readsBack(t, rp, 0x00, "2M"), "the older restore point does not see the later commit")
	assert.True(t, readsBack(t, filepath.Join(d.Path, "vm.qcow2"), 0x33, "2M"), "the new copy does")
}

// TestOfflineCascade: offline, a replaced parent makes the child's copy be
// kept as a generation and copied again, even when the child did not
// change, so both the old and the new restore point stay whole.
func TestOfflineCascade(t *testing.T) {
	d, _ := newDir(t)
	host := t.TempDir()
	base := image(t, filepath.Join(host, "base.qcow2"), "", 0x11, "0")
	top := image(t, filepath.Join(host, "top.qcow2"), base.Path, 0x22, "1M")
	chain := []virt.Image{top, base}
	mustCopy(t, d, chain, true)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x44 3M 1M", base.Path)
	touch(t, base.Path, time.Minute)
	mustCopy(t, d, chain, true)
	g := gens(t, d.Path)
	require.Len(t, g, 2, "both the base's and the top's previous copies: %v", g)
	var oldTop string
	for _, p := range g {
		if filepath.Base(p)[:3] == "top" {
			oldTop = p
		}
	}
	require.NotEmpty(t, oldTop)
	assert.True(t, readsBack(t, oldTop, 0x00, "3M"), "the old restore point")
	assert.True(t, readsBack(t, filepath.Join(d.Path, "top.qcow2"), 0x44, "3M"), "the new one")
}

// TestAdmit refuses, before anything is written, copies that would land on
// a disk file in use or on another source's copy (B12), within a run and
// across runs.
func TestAdmit(t *testing.T) {
	d, out := newDir(t)
	host := t.TempDir()
	a := image(t, filepath.Join(host, "disk.qcow2"), "", 0, "")
	other := filepath.Join(t.TempDir(), "disk.qcow2")
	image(t, other, "", 0, "")
	none := func() Holder { return holder{} }

	require.NoError(t, d.Admit("dom", []string{a.Path}, none))
	assert.ErrorIs(t, d.Admit("dom2", []string{other}, none), ErrFailed)
	assert.Contains(t, out.String(), "would both be backed up as '"+filepath.Join(d.Path, "disk.qcow2")+"'")
	mustCopy(t, d, []virt.Image{a}, false)

	// Across runs: the copy records its source.
	d2 := &Dir{Path: d.Path, P: d.P, Tool: d.Tool}
	assert.ErrorIs(t, d2.Admit("dom2", []string{other}, none), ErrFailed)
	assert.Contains(t, out.String(), "already holds a copy of '"+a.Path+"': refusing to overwrite it with '"+other+"'")

	// The disks' own directory: the copy would be the file itself.
	own := &Dir{Path: host, P: d.P, Tool: d.Tool}
	assert.ErrorIs(t, own.Admit("dom", []string{a.Path}, func() Holder { return holder{a.Path: "dom"} }), ErrFailed)
	assert.Contains(t, out.String(), "[ERR] Backup directory '"+host+"' holds disk files in use: copying '"+a.Path+"' there would overwrite '"+a.Path+"' of domain 'dom'")
}

// holder maps paths to the domains holding them.
type holder map[string]string

func (h holder) Holding(st os.FileInfo) string {
	for p, dom := range h {
		if s, err := os.Stat(p); err == nil && os.SameFile(s, st) {
			return dom
		}
	}
	return ""
}

func TestGenerationName(t *testing.T) {
	dir := t.TempDir()
	dst := filepath.Join(dir, "vm.qcow2")
	require.NoError(t, os.WriteFile(dst, []byte("old"), 0o600))
	mt := time.Date(2024, 5, 6, 7, 8, 9, 0, time.Local)
	require.NoError(t, os.Chtimes(dst, mt, mt))
	st, err := os.Stat(dst)
	require.NoError(t, err)
	name, err := generationName(dst, st)
	require.NoError(t, err)
	assert.Equal(t, dst+".gen-20240506-070809", name)

	// A different file already holds that name: count on.
	require.NoError(t, os.WriteFile(name, []byte("other"), 0o600))
	name2, err := generationName(dst, st)
	require.NoError(t, err)
	assert.Equal(t, dst+".gen-20240506-070809.1", name2)

	// The same file (a hard link made by an interrupted run): reused.
	require.NoError(t, os.Remove(name))
	require.NoError(t, os.Link(dst, name))
	name3, err := generationName(dst, st)
	require.NoError(t, err)
	assert.Equal(t, name, name3)
}

// TestNarrowModeFailureIsReported: when an up-to-date copy cannot be made
// as unreadable as its narrowed source (here: an immutable file), the run
// says so.
func TestNarrowModeFailureIsReported(t *testing.T) {
	testenv.RequireRoot(t)
	d, out := newDir(t)
	src := image(t, filepath.Join(t.TempDir(), "disk.qcow2"), "", 0, "")
	require.NoError(t, os.Chmod(src.Path, 0o644))
	mustCopy(t, d, []virt.Image{src}, true)
	dst := filepath.Join(d.Path, "disk.qcow2")
	require.NoError(t, os.Chmod(src.Path, 0o600))
	run(t, "chattr", "+i", dst)
	t.Cleanup(func() { _ = exec.Command("chattr", "-i", dst).Run() })
	mustCopy(t, d, []virt.Image{src}, true)
	assert.Contains(t, out.String(), "[WAR] Could not narrow the mode of '"+dst+"' to its source's (0600): ")
}

// TestUnreadableBackingReferenceIsReported: an up-to-date copy whose header
// cannot be read (a backing name pointing past the end of the file) is
// reported instead of silently left as it is.
func TestUnreadableBackingReferenceIsReported(t *testing.T) {
	d, out := newDir(t)
	host := t.TempDir()
	base := image(t, filepath.Join(host, "base.qcow2"), "", 0, "")
	top := image(t, filepath.Join(host, "top.qcow2"), base.Path, 0, "")
	chain := []virt.Image{top, base}
	mustCopy(t, d, chain, true)
	dst := filepath.Join(d.Path, "top.qcow2")
	f, err := os.OpenFile(dst, os.O_RDWR, 0)
	require.NoError(t, err)
	var off [8]byte
	binary.BigEndian.PutUint64(off[:], 1<<40) // backing_file_offset far past EOF
	_, err = f.WriteAt(off[:], 8)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	st, err := os.Stat(top.Path)
	require.NoError(t, err)
	require.NoError(t, os.Chtimes(dst, st.ModTime(), st.ModTime()))
	mustCopy(t, d, chain, true)
	assert.Contains(t, out.String(), "[WAR] Cannot read the backing reference of '"+dst+"': ")
}
