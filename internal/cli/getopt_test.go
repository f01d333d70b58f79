package cli

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// getoptCases are argument lists whose parse must match util-linux
// getopt(1) called the way fi-backup.sh called it.
var getoptCases = [][]string{
	{"dom"},
	{"dom", "-d"},
	{"-dc", "dom"},
	{"-db/dir", "dom"},
	{"-b", "/dir", "dom"},
	{"--backup_dir=/dir", "dom"},
	{"--backup_dir", "/dir", "dom"},
	{"--back", "/dir", "--meth=blockpull", "dom"},
	{"--all"},
	{"--q", "--verb", "--vers", "--de", "dom"},
	{"--consolidate_o", "--consolidate_a", "dom"},
	{"--cons", "dom"},
	{"--consolidate", "dom"},
	{"--d", "x"},
	{"--ver"},
	{"-x", "dom"},
	{"--foo", "dom"},
	{"--foo=3", "dom"},
	{"-b"},
	{"--backup_dir"},
	{"--help=3"},
	{"--consolidate_only=x"},
	{"--consolidate_and_snaphot", "dom"},
	{"--consolidate_and_snapshot", "-d", "dom"},
	{"--", "-d", "dom"},
	{"-", "dom"},
	{"-dxb"},
	{"-m", "blockpull", "-s", "/tmp", "-q", "-r", "-h", "-v", "-V"},
	{"-b", "--debug", "dom"},
	{"--method", "--debug"},
	{"", "dom", ""},
	{"dom1 dom2", "-v"},
	{"-x", "--y", "--cons", "-b"},
}

// TestGetoptMatchesUtilLinux compares the parser with the real getopt(1):
// the normalised output on success and the diagnostics on failure.
func TestGetoptMatchesUtilLinux(t *testing.T) {
	getopt, err := exec.LookPath("getopt")
	require.NoError(t, err, "util-linux getopt is part of every Debian system")
	defs := getoptDefs(newFlagSet())
	var longs []string
	for _, d := range defs {
		if d.long == "job_timeout" {
			continue // our long-only addition
		}
		if d.hasArg {
			longs = append(longs, d.long+":")
		} else {
			longs = append(longs, d.long)
		}
	}
	for _, args := range getoptCases {
		t.Run(strings.Join(args, "_"), func(t *testing.T) {
			cmd := exec.Command(getopt, append([]string{"-n", "fi-backup", "-o", "b:cCm:s:qrdhvV",
				"--long", strings.Join(longs, ","), "--"}, args...)...)
			var so, se bytes.Buffer
			cmd.Stdout, cmd.Stderr = &so, &se
			runErr := cmd.Run()

			var ourErr bytes.Buffer
			opts, pos, ok := getoptScan("fi-backup", defs, args, false, &ourErr)
			assert.Equal(t, runErr == nil, ok, "success")
			assert.Equal(t, se.String(), ourErr.String(), "diagnostics")
			if ok {
				assert.Equal(t, strings.TrimSpace(so.String()), render(opts, pos))
			}
		})
	}
}

// render prints a parse the way getopt(1) normalises it.
func render(opts []scanned, pos []string) string {
	var parts []string
	for _, o := range opts {
		name := "--" + o.def.long
		if !o.long {
			name = "-" + string(o.def.short)
		}
		parts = append(parts, name)
		if o.def.hasArg {
			parts = append(parts, shellQuote(o.value))
		}
	}
	parts = append(parts, "--")
	for _, p := range pos {
		parts = append(parts, shellQuote(p))
	}
	return strings.Join(parts, " ")
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
