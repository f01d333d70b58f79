package itest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestHostileNames: a domain name with a space, quotes, $, a backslash and
// a *, disk file names with quotes, a backslash and a *, a backup directory reached
// through a symlink, and a non-English locale: everything is passed to
// libvirt and the filesystem verbatim (no shell, no globbing, no echo -e,
// no translated state words).
func TestHostileNames(t *testing.T) {
	d := newDomain(t, `h a'q"d $HOME \b*`, domOpts{disks: []string{"d'1 \"x\".qcow2", `back\\slash *.qcow2`}})
	real := filepath.Join(t.TempDir(), "real backup $dir")
	require.NoError(t, os.Mkdir(real, 0o700))
	link := filepath.Join(t.TempDir(), "link")
	require.NoError(t, os.Symlink(real, link))
	t.Setenv("LANG", "de_DE.UTF-8")
	t.Setenv("LC_ALL", "de_DE.UTF-8")
	// Prove the locale is real: virsh now prints a translated state word,
	// which the old script compared with "running" (B17).
	cmd := exec.Command("virsh", "-q", "-c", uri, "domstate", d.Name)
	cmd.Env = os.Environ() // not run()'s LC_ALL=C
	word, err := cmd.Output()
	require.NoError(t, err)
	t.Logf("virsh domstate under de_DE.UTF-8: %q", strings.TrimSpace(string(word)))
	require.NotEqual(t, "running", strings.TrimSpace(string(word)), "setup-host.sh installs locales and libvirt-l10n")

	r := run(t, "-v", "-b", link, "--", d.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[VER] Snapshot for block devices of '"+d.Name+"' successful\n")
	assert.ElementsMatch(t, []string{"d'1 \"x\".qcow2", `back\\slash *.qcow2`}, files(t, real))
	nextSecond()
	r = run(t, "-v", "-b", link, d.Name) // the whole argument is one existing domain
	require.Equal(t, 0, r.Code)
	for _, ov := range overlays(t, real) {
		assertSelfContained(t, filepath.Join(real, ov))
	}
	assert.Len(t, overlays(t, real), 2)
	_, err = os.Stat("/var/lock/" + d.Name + ".fi-backup.lock")
	assert.NoError(t, err, "lock file named after the domain, verbatim")
	assert.Equal(t, "running", d.state(t))
}
