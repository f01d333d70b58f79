package itest

import (
	"os/exec"
	"strings"
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
	virsh(t, "blockresize", d.Name, "vda", "1G")
	consSnap(t, "-d", d.Name)
	d.consWriteMiB(t, 0, 0x7a, 0, 512, 64)
	before := d.liveChain(t, "vda")
	require.Len(t, before, 2)

	cmd, out := consStart(t, "-d", "-c", d.Name)
	require.True(t, consWaitFor(30*time.Second, func() bool { return strings.Contains(out.String(), "[DEB] Committing into") }),
		"the consolidation did not start:\n%s", out.String())
	require.NoError(t, syscall.Kill(cmd.Process.Pid, syscall.SIGKILL))
	code := consWait(t, cmd, 30*time.Second)
	require.Equal(t, -1, code, "killed by the signal:\n%s", out.String())
	info, _ := exec.Command("virsh", "-c", uri, "blockjob", d.Name, "vda", "--info").CombinedOutput()
	t.Logf("left behind: %s", info)
	require.Contains(t, string(info), "Commit", "the killed run left its job running")
	assert.Equal(t, "running", d.state(t))

	bk := t.TempDir()
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

	r = run(t, "-d", "-c", d.Name)
	require.Equal(t, 0, r.Code)
	assert.NotContains(t, r.Stdout, "[WAR] Aborting", "the journal is gone")
	assert.Equal(t, []string{orig}, d.liveChain(t, "vda"))
	d.consFlush(t, 0)
	consReads(t, orig, 0x7a, "0", "512M")
}
