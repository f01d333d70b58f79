package main

// The tests of this package check what is shipped beside the binary: the
// manual page, the bash completion, make install and the systemd units of
// the README. They run tools of the machine (groff, man, bash, make,
// systemd-analyze; scripts/setup-host.sh installs them) and fail instead of
// skipping when one is missing in CI.

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/cli"
	"github.com/fi-backup/fi-backup/internal/testenv"
)

// repo is the repository's top directory, from this package's.
const repo = "../.."

// pendingOptions are documented ahead of their code: the other parts of
// issue 14 add them to the options table. Once an option is in the table,
// its entry here is ignored (the table wins) and can go.
var pendingOptions = []cli.OptionName{}

// documentedOptions is every option of the table, then the pending ones
// not in it yet.
func documentedOptions() []cli.OptionName {
	opts := cli.OptionNames()
	have := map[string]bool{}
	for _, o := range opts {
		have[o.Long] = true
	}
	for _, o := range pendingOptions {
		if !have[o.Long] {
			opts = append(opts, o)
		}
	}
	return opts
}

// setupPackages are the Debian packages scripts/setup-host.sh installs for
// the tools of these tests.
var setupPackages = map[string]string{"groff": "groff-base", "man": "man-db", "systemd-analyze": "systemd"}

// needTool returns the path of a program the test needs: a skip without
// it, a failure where skipping is not allowed (CI).
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		msg := name + " not found in PATH"
		if pkg, ok := setupPackages[name]; ok {
			msg += " (Debian package " + pkg + ", which scripts/setup-host.sh installs)"
		}
		testenv.SkipOrFail(t, msg)
	}
	return p
}

// run runs a command and returns its stdout and stderr; it fails the test
// when the command fails.
func run(t *testing.T, cmd *exec.Cmd) (stdout, stderr string) {
	t.Helper()
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	require.NoError(t, cmd.Run(), "%v\nstdout:\n%s\nstderr:\n%s", cmd.Args, so.String(), se.String())
	return so.String(), se.String()
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, []byte(content), mode))
}
