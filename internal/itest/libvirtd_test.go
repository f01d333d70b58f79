package itest

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// restartLibvirtd kills libvirtd and starts it again through the project's
// setup script (QEMU processes survive; libvirtd reconnects to them).
func restartLibvirtd(t *testing.T) {
	t.Helper()
	_ = exec.Command("pkill", "-x", "libvirtd").Run()
	require.True(t, eventually(20*time.Second, func() bool { return exec.Command("pgrep", "-x", "libvirtd").Run() != nil }))
	out, err := exec.Command("bash", "../../scripts/setup-host.sh").CombinedOutput()
	require.NoError(t, err, string(out))
}

// TestLibvirtdRestartDuringCommit: libvirtd goes away while fi-backup waits
// for a blockcommit. The tool reports it and exits non-zero instead of
// hanging; the guest runs on; the job's journal survives, so the next run
// aborts the orphaned job and consolidates.
func TestLibvirtdRestartDuringCommit(t *testing.T) {
	d := newDomain(t, "lvd-restart", domOpts{})
	orig := d.Disks[0]
	virsh(t, "blockresize", d.Name, "vda", "1G")
	consSnap(t, "-d", d.Name)
	d.consWriteMiB(t, 0, 0x4d, 0, 512, 64)
	cmd, out := consStart(t, "-d", "-c", "--job_timeout", "5m", d.Name)
	require.True(t, eventually(30*time.Second, func() bool { return strings.Contains(out.String(), "[DEB] Committing into") }),
		"the consolidation did not start:\n%s", out.String())
	restartLibvirtd(t)
	code := consWait(t, cmd, 90*time.Second)
	t.Logf("fi-backup -c across a libvirtd restart → %d\n%s", code, out.String())
	if code == 0 {
		t.Skip("the job finished before libvirtd went away")
	}
	assert.Equal(t, 1, code)
	assert.Contains(t, out.String(), "[ERR] Error consolidating block device")
	assert.Equal(t, "running", d.state(t))

	r := run(t, "-d", "-c", d.Name)
	require.Equal(t, 0, r.Code)
	assert.Equal(t, []string{orig}, d.liveChain(t, "vda"))
	d.consFlush(t, 0)
	consReads(t, orig, 0x4d, "0", "512M")
}

// TestDomainDestroyedDuringCommit: the domain is destroyed while its
// blockcommit runs: clear error, exit 1, no file deleted.
func TestDomainDestroyedDuringCommit(t *testing.T) {
	d := newDomain(t, "destroyed", domOpts{})
	virsh(t, "blockresize", d.Name, "vda", "1G")
	consSnap(t, "-d", d.Name)
	d.consWriteMiB(t, 0, 0x4e, 0, 512, 64)
	before := d.liveChain(t, "vda")
	cmd, out := consStart(t, "-d", "-c", d.Name)
	require.True(t, eventually(30*time.Second, func() bool { return strings.Contains(out.String(), "[DEB] Committing into") }),
		"the consolidation did not start:\n%s", out.String())
	virsh(t, "destroy", d.Name)
	code := consWait(t, cmd, 60*time.Second)
	t.Logf("→ %d\n%s", code, out.String())
	if code == 0 {
		t.Skip("the job finished before the domain was destroyed")
	}
	assert.Equal(t, 1, code)
	assert.Contains(t, out.String(), "[ERR] Error consolidating block device '"+before[0]+"'")
	for _, f := range before {
		assert.FileExists(t, f, "nothing deleted")
	}
	checkImages(t, before...)
	// The rerun finds a shut-off domain: offline backup works on its chain.
	bk := t.TempDir()
	r := run(t, "-b", bk, d.Name)
	assert.Equal(t, 0, r.Code)
	assert.Len(t, files(t, bk), len(before))
}

// TestDomainUndefinedDuringCopy: the domain's definition is removed while
// its backup copies (it keeps running as a transient domain): the backup
// completes, the next one works, the guest runs.
func TestDomainUndefinedDuringCopy(t *testing.T) {
	d := newDomain(t, "undefined", domOpts{})
	// libvirt 9.0 may write a persistent definition for the transient
	// domain when it is snapshotted: make sure nothing stays defined.
	t.Cleanup(func() {
		_ = exec.Command("virsh", "-c", uri, "destroy", d.Name).Run()
		_ = exec.Command("virsh", "-c", uri, "undefine", d.Name).Run()
	})
	virsh(t, "blockresize", d.Name, "vda", "1G")
	d.consWriteMiB(t, 0, 0x4f, 0, 768, 64)
	d.consFlush(t, 0)
	bk := t.TempDir()
	nextSecond()
	cmd, out := consStart(t, "-d", "-b", bk, d.Name)
	waitForTemp(t, bk, out)
	virsh(t, "undefine", d.Name)
	code := consWait(t, cmd, 120*time.Second)
	assert.Equal(t, 0, code, out.String())
	assert.Contains(t, files(t, bk), "disk1.qcow2")
	assert.Equal(t, "running", d.state(t))
	nextSecond()
	r := run(t, "-b", bk, d.Name)
	assert.Equal(t, 0, r.Code)
	checkImages(t, d.liveChain(t, "vda")...)
}
