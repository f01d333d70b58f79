package backupdir

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// layers are what each file of the test chains writes: index 0 is the
// base, i the overlay vm.bimg-…0i (later layers win where they overlap).
var layers = []struct {
	pattern byte
	off     string
}{{0x10, "0"}, {0x21, "1M"}, {0x22, "1M"}, {0x23, "2M"}, {0x24, "3M"}, {0x25, "1M"}, {0x26, "4M"}, {0x27, "2M"}}

// hostChain makes the base and n overlays on the "host", base first.
func hostChain(t *testing.T, n int) []virt.Image {
	t.Helper()
	host := t.TempDir()
	imgs := []virt.Image{image(t, filepath.Join(host, "vm.qcow2"), "", layers[0].pattern, layers[0].off)}
	for i := 1; i <= n; i++ {
		imgs = append(imgs, image(t, filepath.Join(host, fmt.Sprintf("vm.bimg-20240101-00000%d", i)), imgs[i-1].Path, layers[i].pattern, layers[i].off))
	}
	return imgs
}

// topFirst is the chain a backup copies when overlay k is the active one:
// overlays k-1 … 1 and the base.
func topFirst(imgs []virt.Image, k int) []virt.Image {
	var out []virt.Image
	for i := k - 1; i >= 0; i-- {
		out = append(out, imgs[i])
	}
	return out
}

// moment k is the snapshot that made overlay k: its point holds layers
// 0 … k-1.
func moment(k int) string { return fmt.Sprintf("20240101-00000%d", k) }

func recordPoint(t *testing.T, d *Dir, imgs []virt.Image, k int) []File {
	t.Helper()
	files, err := d.CopyChain(context.Background(), "dom", topFirst(imgs, k), false)
	require.NoError(t, err)
	require.NoError(t, d.WriteManifest(&Manifest{Schema: ManifestSchema, Domain: "dom", Moment: moment(k), Method: MethodSnapshot,
		Disks: []Disk{{Target: "vda", Device: "disk", BackedUp: true, Name: "vm.qcow2", Chain: files}}}))
	return files
}

// assertHolds checks that the chain topped by top (in DIR, read through
// its headers) shows exactly layers 0 … k-1.
func assertHolds(t *testing.T, dir, top string, k int) {
	t.Helper()
	want := map[string]byte{"8M": 0, "5M": 0}
	for _, l := range []string{"0", "1M", "2M", "3M", "4M"} {
		want[l] = 0
	}
	for i := 0; i < k; i++ {
		want[layers[i].off] = layers[i].pattern
	}
	args := []string{"-r", "-f", "qcow2"}
	for off, pattern := range want {
		args = append(args, "-c", fmt.Sprintf("read -P 0x%02x %s 1M", pattern, off))
	}
	out, err := exec.Command("qemu-io", append(args, filepath.Join(dir, top))...).CombinedOutput()
	if err == nil && !bytes.Contains(out, []byte("Pattern verification failed")) {
		return
	}
	for off, pattern := range want { // name the offsets that differ
		assert.True(t, readsBack(t, filepath.Join(dir, top), pattern, off), "%s (point of moment %d) at %s: want 0x%02x", top, k, off, pattern)
	}
	t.Errorf("%s does not read back moment %d: %s", top, k, out)
}

// assertPoints checks the listed moments, that each point reads back its
// moment through the chain its manifest names, and that verify is clean.
func assertPoints(t *testing.T, d *Dir, ks ...int) {
	t.Helper()
	pts := d.Points([]string{"dom"}, nil, nil)
	var got, want []string
	for _, p := range pts {
		got = append(got, p.Moment)
	}
	for _, k := range ks {
		want = append(want, moment(k))
	}
	require.Equal(t, want, got)
	c := d.Checker(context.Background())
	for i, p := range pts {
		assert.Empty(t, c.Verify(&p), "point %s verifies", p.Moment)
		assertHolds(t, d.Path, p.Disks[0].Chain[0], ks[i])
		assert.Equal(t, "vm.qcow2", p.Disks[0].Chain[len(p.Disks[0].Chain)-1], "every chain ends on the base copy")
	}
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func sum(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// sixPoints is a directory with restore points of moments 1 … 6.
func sixPoints(t *testing.T) (*Dir, []virt.Image, *bytes.Buffer) {
	d, out := newDir(t)
	imgs := hostChain(t, 7)
	for k := 1; k <= 6; k++ {
		recordPoint(t, d, imgs, k)
	}
	assertPoints(t, d, 1, 2, 3, 4, 5, 6)
	return d, imgs, out
}

// TestPruneKeepsTheNewestExact: --keep=3 over six points leaves the three
// newest, each reading back its own moment; the layers below the oldest
// kept one are merged into the base, whose mtime (cp -u's reference) stays.
func TestPruneKeepsTheNewestExact(t *testing.T) {
	t.Parallel()
	d, _, _ := sixPoints(t)
	base := filepath.Join(d.Path, "vm.qcow2")
	st0, err := os.Stat(base)
	require.NoError(t, err)
	before := d.usage()

	_, freed, err := d.Prune(context.Background(), "dom", 3, nil)
	require.NoError(t, err)
	assertPoints(t, d, 4, 5, 6)
	assert.False(t, exists(filepath.Join(d.Path, "vm.bimg-20240101-000001")), "merged away")
	assert.False(t, exists(filepath.Join(d.Path, "vm.bimg-20240101-000002")), "merged away")
	b, err := qcow2.BackingFile(filepath.Join(d.Path, "vm.bimg-20240101-000003"))
	require.NoError(t, err)
	assert.Equal(t, "vm.qcow2", b, "the oldest kept layer now sits on the base")
	st1, err := os.Stat(base)
	require.NoError(t, err)
	assert.True(t, st1.ModTime().Equal(st0.ModTime()), "the base's mtime is kept")
	assert.Positive(t, freed, "layers 1 and 2 overlap: merging them frees space")
	assert.Equal(t, before-freed, d.usage())
	assert.False(t, exists(d.pendingPath("dom")))
	d.Manifests("dom", func(p string, err error) { t.Errorf("after a prune, '%s' is not a manifest: %v", p, err) })

	// Nothing to prune: nothing changes.
	_, freed, err = d.Prune(context.Background(), "dom", 3, nil)
	require.NoError(t, err)
	assert.Zero(t, freed)
	assertPoints(t, d, 4, 5, 6)

	// keep 1: only the newest.
	_, _, err = d.Prune(context.Background(), "dom", 1, nil)
	require.NoError(t, err)
	assertPoints(t, d, 6)
	left, err := filepath.Glob(filepath.Join(d.Path, "vm.*"))
	require.NoError(t, err)
	assert.Len(t, left, 2, "the base and the top of the last point: %v", left)
}

// TestPruneThenBackupCopiesOnlyTheNew: after a prune, the next backup
// does not copy the merged host overlays again (they are unchanged), its
// chain skips them, and the point after it reads back right; a host file
// that changed after all is copied again and every point stays exact.
func TestPruneThenBackupCopiesOnlyTheNew(t *testing.T) {
	t.Parallel()
	d, imgs, _ := sixPoints(t)
	_, _, err := d.Prune(context.Background(), "dom", 3, nil)
	require.NoError(t, err)

	files := recordPoint(t, d, imgs, 7)
	var names []string
	for _, f := range files {
		names = append(names, f.Name)
	}
	assert.Equal(t, []string{"vm.bimg-20240101-000006", "vm.bimg-20240101-000005", "vm.bimg-20240101-000004", "vm.bimg-20240101-000003", "vm.qcow2"}, names)
	assert.False(t, exists(filepath.Join(d.Path, "vm.bimg-20240101-000001")), "not copied again")
	assertPoints(t, d, 4, 5, 6, 7)

	_, _, err = d.Prune(context.Background(), "dom", 3, nil)
	require.NoError(t, err)
	assertPoints(t, d, 5, 6, 7)

	// The host overlay 2 changes after all (it never does in a real chain,
	// but the copy must not trust a stale record): it is copied again, and
	// the copies above it that skipped it are copied again on it.
	touch(t, imgs[2].Path, time.Minute)
	recordPoint(t, d, imgs, 8)
	assertPoints(t, d, 5, 6, 7, 8)
}

// TestPruneAcrossGenerations: after a consolidation the host base changes;
// the previous base copy becomes a generation, and pruning merges into
// that generation, leaving the new base alone.
func TestPruneAcrossGenerations(t *testing.T) {
	t.Parallel()
	d, imgs, _ := sixPoints(t)
	_, _, err := d.Prune(context.Background(), "dom", 3, nil)
	require.NoError(t, err)
	// -C: everything committed into the host base.
	run(t, "qemu-img", "commit", "-q", "-b", imgs[0].Path, imgs[6].Path)
	touch(t, imgs[0].Path, time.Minute)
	files, err := d.CopyChain(context.Background(), "dom", []virt.Image{imgs[0]}, false)
	require.NoError(t, err)
	require.NoError(t, d.WriteManifest(&Manifest{Schema: ManifestSchema, Domain: "dom", Moment: "20240101-000009", Method: MethodSnapshot,
		Disks: []Disk{{Target: "vda", Device: "disk", BackedUp: true, Name: "vm.qcow2", Chain: files}}}))
	g := gens(t, d.Path)
	require.Len(t, g, 1)
	pts := d.Points([]string{"dom"}, nil, nil)
	require.Len(t, pts, 4)
	assertHolds(t, d.Path, "vm.qcow2", 7)

	_, _, err = d.Prune(context.Background(), "dom", 2, nil)
	require.NoError(t, err)
	pts = d.Points([]string{"dom"}, nil, nil)
	require.Len(t, pts, 2)
	assert.Equal(t, "20240101-000006", pts[0].Moment)
	assert.Equal(t, []string{"vm.bimg-20240101-000005", filepath.Base(g[0])}, pts[0].Disks[0].Chain)
	assertHolds(t, d.Path, "vm.bimg-20240101-000005", 6)
	assertHolds(t, d.Path, "vm.qcow2", 7)
	c := d.Checker(context.Background())
	for _, p := range pts {
		assert.Empty(t, c.Verify(&p))
	}
}

// TestPruneSurvivesAKillAtEveryStep: the prune is stopped after each of
// its steps in turn, as a kill would; at that moment every kept point
// already reads back exact, and the next run finishes the prune to the
// same result.
func TestPruneSurvivesAKillAtEveryStep(t *testing.T) {
	t.Parallel()
	ref, _, _ := sixPoints(t)
	crashes := 0
	for n := 1; ; n++ {
		d, out := newDir(t)
		copyDir(t, ref.Path, d.Path)
		calls := 0
		var stoppedAt string
		d.StepHook = func(step string) error {
			calls++
			if calls == n {
				stoppedAt = step
				return errors.New("killed")
			}
			return nil
		}
		_, _, err := d.Prune(context.Background(), "dom", 3, nil)
		if err == nil {
			break // fewer steps than n: every step was tried
		}
		crashes++
		t.Logf("stopped after step %d (%s)", n, stoppedAt)
		for k, top := range map[int]string{4: "vm.bimg-20240101-000003", 5: "vm.bimg-20240101-000004", 6: "vm.bimg-20240101-000005"} {
			assertHolds(t, d.Path, top, k)
		}
		require.True(t, exists(d.pendingPath("dom")), "the redo record is there")

		next := &Dir{Path: d.Path, P: d.P, Tool: d.Tool}
		require.NoError(t, next.FinishPending("dom"))
		assert.Contains(t, out.String(), "Finishing the change of the backup files of 'dom'")
		assertPoints(t, next, 4, 5, 6)
		assert.False(t, exists(filepath.Join(d.Path, "vm.bimg-20240101-000001")))
	}
	assert.Greater(t, crashes, 6, "drop, merge, rebase, manifests, deletes, records: each was interrupted")

	// Killed in the middle of the commit: the base holds part of the
	// merged layers.
	d, _ := newDir(t)
	copyDir(t, ref.Path, d.Path)
	pts := d.Points([]string{"dom"}, nil, nil)
	p, err := d.plan("dom", pts[:3], pts[3:])
	require.NoError(t, err)
	require.NoError(t, d.writePending("dom", p))
	for _, m := range p.Drop {
		require.NoError(t, d.dropMeta("dom", m))
	}
	run(t, "qemu-img", "commit", "-q", "-d", filepath.Join(d.Path, "vm.bimg-20240101-000001")) // the lower layer only
	for k, top := range map[int]string{4: "vm.bimg-20240101-000003", 5: "vm.bimg-20240101-000004", 6: "vm.bimg-20240101-000005"} {
		assertHolds(t, d.Path, top, k)
	}
	require.NoError(t, (&Dir{Path: d.Path, P: d.P, Tool: d.Tool}).FinishPending("dom"))
	assertPoints(t, d, 4, 5, 6)
}

// failingCommit is a qemu-img that fails to commit (a full disk, a bad
// layer) and does everything else.
func failingCommit(t *testing.T, d *Dir) {
	script := filepath.Join(t.TempDir(), "qemu-img")
	require.NoError(t, os.WriteFile(script, []byte(fmt.Sprintf("#!/bin/sh\n[ \"$1\" = commit ] && { echo 'qemu-img: No space left on device' >&2; exit 1; }\nexec %s \"$@\"\n", d.Tool.Path)), 0o755))
	d.Tool.Path = script
}

// TestPruneWhoseMergeFails: a merge that fails leaves the kept points
// exact and their layers in place, gives up the points it was asked to,
// and says so; nothing is left to redo.
func TestPruneWhoseMergeFails(t *testing.T) {
	t.Parallel()
	d, _, out := sixPoints(t)
	failingCommit(t, d)
	_, _, err := d.Prune(context.Background(), "dom", 3, nil)
	require.NoError(t, err)
	assert.Contains(t, out.String(), "[WAR] Could not merge the oldest restore points of 'dom' (")
	assert.Contains(t, out.String(), "No space left on device")
	assertPoints(t, d, 4, 5, 6)
	assert.True(t, exists(filepath.Join(d.Path, "vm.bimg-20240101-000001")), "still needed by the kept points")
	assert.False(t, exists(d.pendingPath("dom")))
}

// TestPruneLeavesOtherHardLinksAlone: a base copy with a second name (an
// admin's cp -al snapshot of the directory) is copied before the merge
// changes it: the other name keeps its bytes.
func TestPruneLeavesOtherHardLinksAlone(t *testing.T) {
	t.Parallel()
	d, _, _ := sixPoints(t)
	other := filepath.Join(t.TempDir(), "snapshot-of-base")
	if err := os.Link(filepath.Join(d.Path, "vm.qcow2"), other); err != nil {
		other = filepath.Join(filepath.Dir(d.Path), "snapshot-of-base") // same file system
		require.NoError(t, os.Link(filepath.Join(d.Path, "vm.qcow2"), other))
	}
	before := sum(t, other)
	_, _, err := d.Prune(context.Background(), "dom", 3, nil)
	require.NoError(t, err)
	assertPoints(t, d, 4, 5, 6)
	assert.Equal(t, before, sum(t, other), "the other name was not written through")
	assert.NotEqual(t, before, sum(t, filepath.Join(d.Path, "vm.qcow2")))
}

// TestPruneSharedTemplate: two disks on one template: each disk's
// increments are merged into its own image's copy, as a consolidation
// would, never into the template's copy, which both disks read.
func TestPruneSharedTemplate(t *testing.T) {
	t.Parallel()
	d, out := newDir(t)
	defer func() { t.Log(out.String()) }()
	host := t.TempDir()
	tpl := image(t, filepath.Join(host, "tpl.qcow2"), "", 0x10, "0")
	var a, b []virt.Image
	a = append(a, image(t, filepath.Join(host, "a.qcow2"), tpl.Path, 0x21, "1M"))
	b = append(b, image(t, filepath.Join(host, "b.qcow2"), tpl.Path, 0x31, "1M"))
	for i := 1; i <= 4; i++ {
		a = append(a, image(t, filepath.Join(host, fmt.Sprintf("a.bimg-20240101-00000%d", i)), a[i-1].Path, byte(0x21+i), "2M"))
		b = append(b, image(t, filepath.Join(host, fmt.Sprintf("b.bimg-20240101-00000%d", i)), b[i-1].Path, byte(0x31+i), "2M"))
	}
	chain := func(imgs []virt.Image, k int) []virt.Image {
		out := []virt.Image{}
		for i := k; i >= 0; i-- {
			out = append(out, imgs[i])
		}
		return append(out, tpl)
	}
	for k := 0; k < 4; k++ {
		fa, err := d.CopyChain(context.Background(), "dom", chain(a, k), false)
		require.NoError(t, err)
		fb, err := d.CopyChain(context.Background(), "dom", chain(b, k), false)
		require.NoError(t, err)
		require.NoError(t, d.WriteManifest(&Manifest{Schema: ManifestSchema, Domain: "dom", Moment: moment(k + 1), Method: MethodSnapshot,
			Disks: []Disk{{Target: "vda", BackedUp: true, Name: "a.qcow2", Chain: fa}, {Target: "vdb", BackedUp: true, Name: "b.qcow2", Chain: fb}}}))
	}
	tplSum := sum(t, filepath.Join(d.Path, "tpl.qcow2"))
	_, _, err := d.Prune(context.Background(), "dom", 2, nil)
	require.NoError(t, err)
	pts := d.Points([]string{"dom"}, nil, nil)
	require.Len(t, pts, 2)
	assert.Equal(t, tplSum, sum(t, filepath.Join(d.Path, "tpl.qcow2")), "the shared template copy is not written")
	assert.False(t, exists(filepath.Join(d.Path, "a.bimg-20240101-000001")), "merged into a.qcow2")
	assert.False(t, exists(filepath.Join(d.Path, "b.bimg-20240101-000001")), "merged into b.qcow2")
	assert.Equal(t, []string{"a.bimg-20240101-000002", "a.qcow2", "tpl.qcow2"}, pts[0].Disks[0].Chain)
	assert.True(t, readsBack(t, filepath.Join(d.Path, "a.bimg-20240101-000002"), 0x23, "2M"))
	assert.True(t, readsBack(t, filepath.Join(d.Path, "b.bimg-20240101-000002"), 0x10, "0"))
	for _, p := range pts {
		assert.Empty(t, d.Checker(context.Background()).Verify(&p))
	}
}

// TestPruneOldToolDirectory: a directory of the old tool (no manifests,
// host paths in the headers) is pruned the same way; the base it keeps is
// not listed as a restore point of its own afterwards.
func TestPruneOldToolDirectory(t *testing.T) {
	t.Parallel()
	d, _ := newDir(t)
	imgs := hostChain(t, 4)
	for _, src := range imgs {
		copyFile(t, src.Path, filepath.Join(d.Path, filepath.Base(src.Path)))
	}
	owner := func(name, _ string) Origin { return Origin{Domain: "dom", Target: "vda"} }
	require.Len(t, d.Points(nil, owner, nil), 5)
	_, _, err := d.Prune(context.Background(), "dom", 2, owner)
	require.NoError(t, err)
	pts := d.Points(nil, owner, nil)
	require.Len(t, pts, 2)
	assert.Equal(t, []string{"vm.bimg-20240101-000003", "vm.qcow2"}, pts[0].Disks[0].Chain)
	assertHolds(t, d.Path, "vm.bimg-20240101-000003", 4)
	assertHolds(t, d.Path, "vm.bimg-20240101-000004", 5)
	for _, p := range pts {
		assert.Empty(t, d.Checker(context.Background()).Verify(&p))
	}
}

// TestPruneOldToolDirectoryOnTemplate: the old tool's copies name their
// parents by host path, the disk's image on a template: the merge goes
// into the image's copy (its header now naming the template's copy in DIR),
// reads no host file, and leaves the template's copy alone.
func TestPruneOldToolDirectoryOnTemplate(t *testing.T) {
	t.Parallel()
	d, _ := newDir(t)
	host := t.TempDir()
	tpl := image(t, filepath.Join(host, "tpl.qcow2"), "", 0x10, "6M")
	imgs := []virt.Image{image(t, filepath.Join(host, "vm.qcow2"), tpl.Path, layers[0].pattern, layers[0].off)}
	for i := 1; i <= 4; i++ {
		imgs = append(imgs, image(t, filepath.Join(host, fmt.Sprintf("vm.bimg-20240101-00000%d", i)), imgs[i-1].Path, layers[i].pattern, layers[i].off))
	}
	for _, src := range append(imgs, tpl) {
		copyFile(t, src.Path, filepath.Join(d.Path, filepath.Base(src.Path)))
	}
	owner := func(name, _ string) Origin { return Origin{Domain: "dom", Target: "vda"} }
	tplSum := sum(t, filepath.Join(d.Path, "tpl.qcow2"))
	// The host files change: a merge that read them would show it.
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 8M", imgs[0].Path)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x66 6M 1M", tpl.Path)
	_, _, err := d.Prune(context.Background(), "dom", 2, owner)
	require.NoError(t, err)
	pts := d.Points(nil, owner, nil)
	require.Len(t, pts, 2)
	assert.Equal(t, []string{"vm.bimg-20240101-000003", "vm.qcow2", "tpl.qcow2"}, pts[0].Disks[0].Chain)
	assertHolds(t, d.Path, "vm.bimg-20240101-000003", 4)
	assert.True(t, readsBack(t, filepath.Join(d.Path, "vm.bimg-20240101-000003"), 0x10, "6M"))
	assert.Equal(t, tplSum, sum(t, filepath.Join(d.Path, "tpl.qcow2")), "the template's copy is not written")
	b, err := qcow2.BackingFile(filepath.Join(d.Path, "vm.qcow2"))
	require.NoError(t, err)
	assert.Equal(t, "tpl.qcow2", b)
}
