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
	{"--=x", "dom"},
	{"--list", "-b", "/d"},
	{"--li", "--verif", "dom"},
	{"--re=latest", "--ta", "/t", "dom"},
	{"--restore", "--format=json"},
	{"--fo", "json", "--ver"},
	{"--=", "dom"},
	{"--ra=1M", "dom"},
	{"--j", "1m", "dom"},
}

// TestGetoptMatchesUtilLinux compares the parser with the real getopt(1):
// the normalised output on success and the diagnostics on failure.
func TestGetoptMatchesUtilLinux(t *testing.T) {
	getopt, err := exec.LookPath("getopt")
	require.NoError(t, err, "util-linux getopt is part of every Debian system")
	defs := getoptDefs()
	var longs []string
	for _, d := range defs {
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

// TestOldPrefixesKeepTheirMeaning: every abbreviation that named a long
// option of the old script, or of fi-backup 3.0.0, names the same option
// today (new long options must never make one ambiguous or steal it).
func TestOldPrefixesKeepTheirMeaning(t *testing.T) {
	oldScript := []string{"backup_dir", "consolidate_only", "consolidate_and_snapshot", "method",
		"quiesce", "all_running", "dump_state_dir", "debug", "help", "version", "verbose"}
	v300 := append(append([]string(nil), oldScript...), "job_timeout")
	now := getoptDefs()
	for _, set := range [][]string{oldScript, v300} {
		var old []optDef
		for _, n := range set {
			old = append(old, optDef{long: n})
		}
		checked := 0
		for _, name := range set {
			for i := 1; i <= len(name); i++ {
				prefix := name[:i]
				was, _ := matchLong(old, prefix)
				if was == nil {
					continue // ambiguous back then: free to mean anything now
				}
				is, amb := matchLong(now, prefix)
				if assert.NotNil(t, is, "--%s became ambiguous (%d matches)", prefix, len(amb)) {
					assert.Equal(t, was.long, is.long, "--%s changed meaning", prefix)
				}
				checked++
			}
		}
		assert.Greater(t, checked, 70, "the loop saw the prefixes")
	}
	for prefix, want := range map[string]string{"b": "backup_dir", "h": "help", "m": "method", "q": "quiesce",
		"a": "all_running", "de": "debug", "du": "dump_state_dir", "verb": "verbose", "vers": "version", "j": "job_timeout"} {
		is, _ := matchLong(now, prefix)
		require.NotNil(t, is, prefix)
		assert.Equal(t, want, is.long, "--%s", prefix)
	}
}
