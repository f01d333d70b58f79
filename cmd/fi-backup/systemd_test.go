package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var unitDir = filepath.Join(repo, "scripts/systemd")

var units = []string{"fi-backup.service", "fi-backup.timer"}

// installedBinary is where ExecStart expects fi-backup: make install's
// default PREFIX.
const installedBinary = "/usr/local/bin/fi-backup"

// TestSystemdUnitsVerify runs `systemd-analyze verify` on the units, which
// needs no running systemd: it loads them as the manager would and reports
// unknown or malformed settings, a timer without a trigger or a unit, an
// ExecStart program that is not executable, and a Documentation= man page
// that man cannot find. The units are copied with ExecStart pointing at a
// stand-in for fi-backup (this machine has no /usr/local/bin/fi-backup),
// and MANPATH points at the repository's man page. Any output is a failure:
// systemd-analyze exits 0 on some warnings (an unknown key, for one).
func TestSystemdUnitsVerify(t *testing.T) {
	t.Parallel()
	analyze := needTool(t, "systemd-analyze")
	needTool(t, "man")
	dir := t.TempDir()
	stub := filepath.Join(dir, "fi-backup")
	writeFile(t, stub, "#!/bin/sh\n", 0o755)
	writeFile(t, filepath.Join(dir, "man/man8/fi-backup.8"), readFile(t, manPage), 0o644)
	var paths []string
	for _, u := range units {
		text := readFile(t, filepath.Join(unitDir, u))
		if strings.HasSuffix(u, ".service") {
			require.Contains(t, text, "\nExecStart="+installedBinary+" ")
			text = strings.ReplaceAll(text, "ExecStart="+installedBinary+" ", "ExecStart="+stub+" ")
		}
		p := filepath.Join(dir, u)
		writeFile(t, p, text, 0o644)
		paths = append(paths, p)
	}
	cmd := exec.Command(analyze, append([]string{"verify", "--generators=no"}, paths...)...)
	cmd.Env = append(os.Environ(), "MANPATH="+filepath.Join(dir, "man"), "SYSTEMD_LOG_COLOR=0", "SYSTEMD_PAGER=")
	out, err := cmd.CombinedOutput()
	assert.NoError(t, err, "%s", out)
	assert.Empty(t, string(out))
}

// TestReadmeShowsTheUnits: the README's copies of the units are the files,
// byte for byte; each follows a "<!-- scripts/systemd/NAME -->" marker.
func TestReadmeShowsTheUnits(t *testing.T) {
	t.Parallel()
	readme := readFile(t, filepath.Join(repo, "README.md"))
	for _, u := range units {
		block := regexp.MustCompile("(?s)<!-- scripts/systemd/" + regexp.QuoteMeta(u) + " -->\n```ini\n(.*?)```\n").FindStringSubmatch(readme)
		if assert.NotNil(t, block, "no block for %s in the README", u) {
			assert.Equal(t, readFile(t, filepath.Join(unitDir, u)), block[1], "the README's %s", u)
		}
	}
	files, err := filepath.Glob(filepath.Join(unitDir, "*"))
	require.NoError(t, err)
	assert.Len(t, files, len(units), "a unit the tests do not know: %v", files)
}

// TestCronLineMatchesService: the README's cron line runs the command of
// the service's ExecStart.
func TestCronLineMatchesService(t *testing.T) {
	t.Parallel()
	readme := readFile(t, filepath.Join(repo, "README.md"))
	service := readFile(t, filepath.Join(unitDir, "fi-backup.service"))
	start := regexp.MustCompile(`(?m)^ExecStart=(.*)$`).FindStringSubmatch(service)
	require.NotNil(t, start)
	assert.Contains(t, readme, "\n30 2 * * * root "+start[1]+" >>/var/log/fi-backup/fi-backup.log 2>&1\n")
}
