package itest

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestTwoRunsSameDomain: a second fi-backup on a domain whose backup is
// running fails at once with the old message and changes nothing; the
// first one finishes normally.
func TestTwoRunsSameDomain(t *testing.T) {
	d := newDomain(t, "two-runs", domOpts{})
	virsh(t, "blockresize", d.Name, "vda", "1G")
	d.consWriteMiB(t, 0, 0x2b, 0, 768, 64)
	d.consFlush(t, 0)
	bk := t.TempDir()
	nextSecond()
	first, out := consStart(t, "-b", bk, d.Name)
	// Once its copy is under way the first run holds the lock and has
	// taken its snapshot.
	waitForTemp(t, bk, out)
	require.Error(t, exec.Command("flock", "-n", "/var/lock/"+d.Name+".fi-backup.lock", "true").Run(), "the first run holds the lock")
	chain := d.liveChain(t, "vda")
	r := run(t, "-b", t.TempDir(), d.Name)
	code := consWait(t, first, 120*time.Second)
	if !strings.Contains(r.Stdout, "Another instance") {
		t.Skipf("the first run finished before the second started (exit %d)", code)
	}
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Another instance of "+binary(t)+" is already running on '"+d.Name+"'! Skipping backup of '"+d.Name+"'\n")
	assert.Equal(t, 0, code, out.String())
	assert.Equal(t, chain, d.liveChain(t, "vda"), "the second run added no overlay")
	assert.Equal(t, "running", d.state(t))
}
