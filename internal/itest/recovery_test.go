package itest

import (
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRecoverKilledBlockcommit: fi-backup SIGKILLed during a blockcommit
// leaves the job running in libvirt (an active commit waits for a pivot
// forever). A plain rerun finds its journal, aborts the job, leaves the
// disk on a valid chain and backs up; a later -c consolidates normally.
func TestRecoverKilledBlockcommit(t *testing.T) {
	d := newDomain(t, "recover-commit", domOpts{})
	orig := d.Disks[0]
	bk := t.TempDir()
	rp := restorePoint(t, d, bk, 0x79, "60M")
	d.consWriteMiB(t, 0, 0x7a, 0, 32, 32)
	before := d.liveChain(t, "vda")
	require.Len(t, before, 2)

	// rate-limited: the job runs for at least 8 s
	cmd, out := consStart(t, "-d", "--rate_limit=4M", "-c", d.Name)
	waitForJob(t, d, "vda", out)
	require.NoError(t, syscall.Kill(cmd.Process.Pid, syscall.SIGKILL))
	code := consWait(t, cmd, 30*time.Second)
	require.Equal(t, -1, code, "killed by the signal:\n%s", out.String())
	info, _ := exec.Command("virsh", "-c", uri, "blockjob", d.Name, "vda", "--info").CombinedOutput()
	t.Logf("left behind: %s", info)
	require.Contains(t, string(info), "Commit", "the killed run left its job running")
	assert.Equal(t, "running", d.state(t))

	rp()
	nextSecond()
	r := run(t, "-d", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[WAR] Aborting the blockcommit job on disk 'vda' of '"+d.Name+"' left by an interrupted fi-backup run")
	d.consNoBlockJob(t, "vda")
	chain := d.liveChain(t, "vda")
	require.Len(t, chain, 3, "the previous chain plus the new overlay")
	assert.Equal(t, before, chain[1:])
	checkImages(t, chain...)
	assert.Contains(t, files(t, bk), "disk1.qcow2")
	rp()

	r = run(t, "-d", "-c", d.Name)
	require.Equal(t, 0, r.Code)
	assert.NotContains(t, r.Stdout, "[WAR] Aborting", "the journal is gone")
	assert.Equal(t, []string{orig}, d.liveChain(t, "vda"))
	d.consFlush(t, 0)
	consReads(t, orig, 0x7a, "0", "32M")
	rp()
}

// TestRecoverKilledCopy: SIGKILL in the middle of a copy (rate-limited to
// last at least 8 s) leaves only a temporary file, which no later run takes
// for a copy; the rerun removes it at once (it was locked by the dead
// process only) and copies the file completely.
func TestRecoverKilledCopy(t *testing.T) {
	d := newDomain(t, "recover-copy", domOpts{})
	bk := t.TempDir()
	rp := restorePoint(t, d, bk, 0x5b, "60M")
	big := d.source(t, "vda") // the layer the next run copies
	d.consWriteMiB(t, 0, 0x5c, 0, 32, 32)
	d.consFlush(t, 0)
	nextSecond()
	cmd, out := consStart(t, "-d", "--rate_limit=4M", "-b", bk, d.Name)
	temp := waitForTemp(t, bk, out)
	require.NoError(t, syscall.Kill(cmd.Process.Pid, syscall.SIGKILL))
	consWait(t, cmd, 30*time.Second)
	left := files(t, bk)
	assert.NotContains(t, left, filepath.Base(big), "killed before the rename")
	assert.Contains(t, left, temp)
	rp()
	assert.Equal(t, "running", d.state(t))

	nextSecond()
	r := run(t, "-d", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[DEB] Removed '"+bk+"/"+temp+"' left by an interrupted copy")
	for _, f := range files(t, bk) {
		assert.NotContains(t, f, ".fi-backup-tmp-")
	}
	out2, err := exec.Command("qemu-img", "compare", "-U", big, filepath.Join(bk, filepath.Base(big))).CombinedOutput()
	assert.NoError(t, err, "the rerun's copy equals the source: %s", out2)
	checkImages(t, assertSelfContained(t, filepath.Join(bk, filepath.Base(big)))...)
	rp()
}

// TestRecoverKilledDump: fi-backup SIGKILLed while its -s dump holds the
// guest paused (QEMU's pause-before-switchover keeps it there) leaves the
// guest paused. A plain rerun sees the journal, cancels the migration,
// resumes the guest and backs it up online.
func TestRecoverKilledDump(t *testing.T) {
	d := newDomain(t, "recover-dump", domOpts{})
	sd := sdStateDir(t)
	p := sdStartHeldPaused(t, d, sd)
	require.NoError(t, syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL))
	<-p.done
	require.Equal(t, "paused", d.state(t), "the killed run left the guest paused")
	for _, f := range files(t, sd) {
		assert.NotRegexp(t, `\.statefile-[0-9-]+\.gz$`, f, "no state file under its final name")
	}
	virsh(t, "qemu-monitor-command", d.Name, `{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"pause-before-switchover","state":false}]}}`)

	bk := t.TempDir()
	nextSecond()
	r := run(t, "-d", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[WAR] Resumed domain '"+d.Name+"', left paused by an interrupted fi-backup -s run")
	assert.Equal(t, "running", d.state(t))
	assert.Contains(t, r.Stdout, "[DEB] Domains RUNNING to backup:  "+d.Name+"\n", "resumed before the domains were listed")
	assert.Contains(t, r.Stdout, "[VER] Snapshot for block devices of '"+d.Name+"' successful", "then backed up online")
	assert.Contains(t, files(t, bk), "disk1.qcow2")
	assert.NotEqual(t, "active", sdMigrationStatus(t, d.Name), "no migration left running")
}
