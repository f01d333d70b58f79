package itest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// TestDiskKinds: a cdrom with media and an empty one are neither
// snapshotted nor copied; a block device marked snapshot='no' is left
// alone while the file disks are backed up; without snapshot='no' libvirt
// refuses the whole (atomic) snapshot and nothing changes.
func TestDiskKinds(t *testing.T) {
	iso := filepath.Join(t.TempDir(), "media.iso")
	require.NoError(t, os.WriteFile(iso, make([]byte, 1<<20), 0o644))
	img := filepath.Join(t.TempDir(), "block.raw")
	sh(t, "truncate", "-s", "16M", img)
	loop := strings.TrimSpace(sh(t, "losetup", "-f", "--show", img))
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", loop).Run() })

	cdroms := "<disk type='file' device='cdrom'><source file='" + xmlEscape(iso) + "'/><target dev='hdc' bus='ide'/><readonly/></disk>" +
		"<disk type='file' device='cdrom'><target dev='hdd' bus='ide'/><readonly/></disk>"
	blockNo := "<disk type='block' device='disk' snapshot='no'><driver name='qemu' type='raw'/><source dev='" + loop + "'/><target dev='vdc' bus='virtio'/></disk>"
	d := newDomain(t, "kinds", domOpts{extra: cdroms + blockNo})
	bk := t.TempDir()
	r := run(t, "-d", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	assert.Equal(t, []string{"disk1.qcow2"}, files(t, bk), "only the file disk's chain is copied")
	assert.Len(t, overlays(t, d.Dir), 1)
	assert.Equal(t, loop, d.source(t, "vdc"), "the block device is untouched")
	assert.Equal(t, iso, d.source(t, "hdc"), "the cdrom keeps its media")

	block := "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='" + loop + "'/><target dev='vdc' bus='virtio'/></disk>"
	e := newDomain(t, "kinds-block", domOpts{extra: block})
	r = run(t, "-b", t.TempDir(), e.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Snapshot for '"+e.Name+"' failed! ")
	assert.Contains(t, r.Stdout, "'vdc'")
	assert.Contains(t, r.Stdout, "must carry snapshot='no' in the definition of '"+e.Name+"'")
	assert.Empty(t, overlays(t, e.Dir), "atomic: no overlay for any disk")
	assert.Equal(t, "running", e.state(t))
}

// TestRelativeBacking: a disk whose qcow2 backing reference is relative is
// followed and copied; the backup chain is self-contained.
func TestRelativeBacking(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "rel dir")
	require.NoError(t, os.Mkdir(dir, 0o755))
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(dir, "base.qcow2"), "32M")
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 1M", filepath.Join(dir, "base.qcow2"))
	cmd := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "top.qcow2")
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, string(out))
	xml := "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='" + xmlEscape(filepath.Join(dir, "top.qcow2")) + "'/><target dev='vdb' bus='virtio'/></disk>"
	d := newDomain(t, "relative", domOpts{extra: xml})
	bk := t.TempDir()
	r := run(t, "-d", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, files(t, bk), "base.qcow2")
	assert.Contains(t, files(t, bk), "top.qcow2")
	chain := assertSelfContained(t, filepath.Join(bk, "top.qcow2"))
	assert.Len(t, chain, 2)
	assert.True(t, readsBack(t, filepath.Join(bk, "top.qcow2"), 0x42, "0", "1M"))
}

// TestMissingChainFile: a backing file deleted on the host while QEMU keeps
// it open cannot be copied: the domain fails with a clear error, the guest
// runs on, nothing partial is left, and the other files are not claimed as
// a complete backup.
func TestMissingChainFile(t *testing.T) {
	d := newDomain(t, "missing", domOpts{})
	run(t, d.Name) // base becomes read-only
	nextSecond()
	run(t, d.Name) // and one overlay
	chain := d.liveChain(t, "vda")
	require.Len(t, chain, 3)
	require.NoError(t, os.Remove(chain[1])) // the middle file
	bk := t.TempDir()
	nextSecond()
	r := run(t, "-b", bk, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Unable to copy '"+chain[1]+"': ")
	for _, f := range files(t, bk) {
		assert.NotContains(t, f, ".fi-backup-tmp-")
	}
	assert.Equal(t, "running", d.state(t))
}

// TestBackupDirRemovedMidRun: the backup directory disappears while a
// copy (rate-limited to last at least 8 s) runs: the domain fails clearly,
// the guest runs, the chain is intact.
func TestBackupDirRemovedMidRun(t *testing.T) {
	d := newDomain(t, "dir-gone", domOpts{})
	d.consWriteMiB(t, 0, 0x3e, 0, 32, 32)
	d.consFlush(t, 0)
	bk := filepath.Join(t.TempDir(), "bk")
	require.NoError(t, os.Mkdir(bk, 0o755))
	nextSecond()
	cmd, out := consStart(t, "--rate_limit=4M", "-b", bk, d.Name)
	waitForTemp(t, bk, out)
	require.NoError(t, os.RemoveAll(bk))
	code := consWait(t, cmd, 60e9)
	t.Logf("exit %d:\n%s", code, out.String())
	assert.Equal(t, 1, code)
	assert.Contains(t, out.String(), "[ERR] Unable to copy '"+d.Disks[0]+"'")
	assert.Equal(t, "running", d.state(t))
	checkImages(t, d.liveChain(t, "vda")...)
}

// TestSharedBackupDirConcurrent: two fi-backup runs on different domains
// copy large files into one backup directory at the same time; neither
// removes the other's temporary copy, both succeed.
func TestSharedBackupDirConcurrent(t *testing.T) {
	a := newDomain(t, "share-a", domOpts{disks: []string{"a.qcow2"}})
	b := newDomain(t, "share-b", domOpts{disks: []string{"b.qcow2"}})
	for _, d := range []*Domain{a, b} {
		virsh(t, "blockresize", d.Name, "vda", "1G")
		d.consWriteMiB(t, 0, 0x21, 0, 512, 64)
		d.consFlush(t, 0)
	}
	bk := t.TempDir()
	nextSecond()
	ca, oa := consStart(t, "-d", "-b", bk, a.Name)
	cb, ob := consStart(t, "-d", "-b", bk, b.Name)
	assert.Equal(t, 0, consWait(t, ca, 120e9), oa.String())
	assert.Equal(t, 0, consWait(t, cb, 120e9), ob.String())
	for _, f := range []string{"a.qcow2", "b.qcow2"} {
		out, err := exec.Command("qemu-img", "compare", "-U", filepath.Join(map[string]string{"a.qcow2": a.Dir, "b.qcow2": b.Dir}[f], f), filepath.Join(bk, f)).CombinedOutput()
		assert.NoError(t, err, "%s: %s", f, out)
	}
}

// TestB12NameClash: two different sources that would land on one name in
// the flat backup directory fail the domain instead of overwriting, within
// one run and across runs (the copy records its source in an xattr) — and
// this is found before the snapshot, so no overlay is left behind.
func TestB12NameClash(t *testing.T) {
	other := filepath.Join(t.TempDir(), "other dir")
	require.NoError(t, os.Mkdir(other, 0o755))
	clash := filepath.Join(other, "disk1.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", clash, "16M")
	xml := "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='" + xmlEscape(clash) + "'/><target dev='vdb' bus='virtio'/></disk>"
	d := newDomain(t, "b12", domOpts{extra: xml})
	bk := t.TempDir()
	r := run(t, "-b", bk, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "would both be backed up as '"+filepath.Join(bk, "disk1.qcow2")+"': refusing to overwrite one with the other")
	assert.Equal(t, "running", d.state(t))
	assert.Empty(t, overlays(t, d.Dir), "refused before the snapshot")
	assert.Empty(t, files(t, bk))

	// Across runs: another domain's disk1.qcow2 already lives in the directory.
	e := newDomain(t, "b12-other", domOpts{})
	bk2 := t.TempDir()
	require.Equal(t, 0, run(t, "-b", bk2, e.Name).Code)
	sum := consSHA256(t, filepath.Join(bk2, "disk1.qcow2"))
	f := newDomain(t, "b12-third", domOpts{})
	r = run(t, "-b", bk2, f.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "already holds a copy of '"+e.Disks[0]+"': refusing to overwrite it with '"+f.Disks[0]+"'")
	assert.Empty(t, overlays(t, f.Dir), "refused before the snapshot")
	assert.Equal(t, sum, consSHA256(t, filepath.Join(bk2, "disk1.qcow2")), "the first domain's copy is untouched")
}

// TestSignalDuringCopy: SIGTERM and SIGINT while a file is copied (the copy
// is rate-limited to last at least 8 s, so the signal always lands in it):
// exit 143/130, no temporary file left, the older restore point intact,
// lock released, guest running.
func TestSignalDuringCopy(t *testing.T) {
	d := newDomain(t, "sig-copy", domOpts{})
	bk := t.TempDir()
	rp := restorePoint(t, d, bk, 0x6a, "60M")
	d.consWriteMiB(t, 0, 0x6b, 0, 32, 32) // the next run copies this layer
	d.consFlush(t, 0)
	before := files(t, bk)
	for _, tc := range []struct {
		sig  syscall.Signal
		code int
	}{{syscall.SIGTERM, 143}, {syscall.SIGINT, 130}} {
		nextSecond()
		cmd, out := consStart(t, "-d", "--rate_limit=4M", "-b", bk, d.Name)
		waitForTemp(t, bk, out)
		require.NoError(t, syscall.Kill(cmd.Process.Pid, tc.sig))
		code := consWait(t, cmd, 60e9)
		t.Logf("%s → %d\n%s", tc.sig, code, out.String())
		assert.Equal(t, tc.code, code)
		assert.Contains(t, out.String(), "[ERR] Interrupted by "+unix.SignalName(tc.sig)+": stopped after cleaning up")
		assert.ElementsMatch(t, before, files(t, bk), "no partial or temporary file")
		rp()
		assert.Equal(t, "running", d.state(t))
		checkImages(t, d.liveChain(t, "vda")...)
		require.NoError(t, exec.Command("flock", "-n", "/var/lock/"+d.Name+".fi-backup.lock", "true").Run(), "lock released")
	}
}

// TestB9NoConsolidationAfterFailedCopy: with -C, a domain whose copy
// failed in the same run is not consolidated: its chain, the only complete
// history while the backup is incomplete, stays.
func TestB9NoConsolidationAfterFailedCopy(t *testing.T) {
	d := newDomain(t, "b9", domOpts{})
	d.write(t, 0, 0x19, "0", "8M")
	run(t, d.Name)
	// The copy fails after the snapshot: the file system fills up during it.
	big := t.TempDir()
	sh(t, "mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", big)
	t.Cleanup(func() { _ = exec.Command("umount", big).Run() })
	nextSecond()
	cmd, out := consStart(t, "-d", "-C", "--rate_limit=2M", "-b", big, d.Name)
	waitForTemp(t, big, out)
	_ = exec.Command("dd", "if=/dev/zero", "of="+filepath.Join(big, "filler"), "bs=1M").Run() // until ENOSPC
	assert.Equal(t, 1, consWait(t, cmd, 60*time.Second), out.String())
	assert.Contains(t, out.String(), "no space left on device")
	assert.NotContains(t, out.String(), "Consolidation of block devices for")
	assert.Len(t, d.liveChain(t, "vda"), 3, "base and both overlays are still there")
	assert.Equal(t, "running", d.state(t))
}
