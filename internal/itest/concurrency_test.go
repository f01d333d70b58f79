package itest

import (
	"os/exec"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestTwoRunsSameDomain: a second fi-backup on a domain whose backup is
// running fails at once with the old message and changes nothing; the
// first one finishes normally. The first run's copy is rate-limited to take
// at least 8 s, so the second one always meets it.
func TestTwoRunsSameDomain(t *testing.T) {
	d := newDomain(t, "two-runs", domOpts{})
	d.consWriteMiB(t, 0, 0x2b, 0, 32, 32)
	d.consFlush(t, 0)
	bk := t.TempDir()
	nextSecond()
	first, out := consStart(t, "--rate_limit=4M", "-b", bk, d.Name)
	// Once its copy is under way the first run holds the lock and has
	// taken its snapshot.
	waitForTemp(t, bk, out)
	require.Error(t, exec.Command("flock", "-n", "/var/lock/"+d.Name+".fi-backup.lock", "true").Run(), "the first run holds the lock")
	chain := d.liveChain(t, "vda")
	r := run(t, "-b", t.TempDir(), d.Name)
	code := consWait(t, first, 120*time.Second)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Another instance of "+binary(t)+" is already running on '"+d.Name+"'! Skipping backup of '"+d.Name+"'\n")
	assert.Equal(t, 0, code, out.String())
	assert.Equal(t, chain, d.liveChain(t, "vda"), "the second run added no overlay")
	assert.Equal(t, "running", d.state(t))
}
