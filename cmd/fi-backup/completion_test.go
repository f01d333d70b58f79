package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const completion = "fi-backup.bash"

func TestCompletionSyntax(t *testing.T) {
	t.Parallel()
	bash := needTool(t, "bash")
	_, stderr := run(t, exec.Command(bash, "-n", completion))
	assert.Empty(t, stderr)
}

// completer runs the completion in a bash without startup files, as bash
// does on <TAB>: it sources the script, takes the function that `complete
// -p fi-backup` names, and calls it with COMP_WORDS set to the words.
type completer struct {
	bash, script, dir, virshLog string
	env                         []string
}

// driver is the bash program of one completion; "$@" are the words, the
// last one being completed.
const driver = `
source "$COMPLETION" || exit 1
spec=$(complete -p fi-backup) || exit 1
fn=${spec#*-F }
fn=${fn%% *}
COMP_WORDS=("$@")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_LINE="${COMP_WORDS[*]}"
COMP_POINT=${#COMP_LINE}
COMPREPLY=()
"$fn" fi-backup "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}" || exit 1
printf '%s\n' "${COMPREPLY[@]}"
`

// newCompleter prepares a working directory with a directory and a file
// to complete, and a virsh stand-in (the real one is never run) that lists
// two domains and logs its arguments.
func newCompleter(t *testing.T) *completer {
	t.Helper()
	c := &completer{bash: needTool(t, "bash"), dir: t.TempDir()}
	script, err := filepath.Abs(completion)
	require.NoError(t, err)
	c.script = script
	bin := t.TempDir()
	c.virshLog = filepath.Join(bin, "virsh.log")
	writeFile(t, filepath.Join(bin, "virsh"), "#!/bin/sh\necho \"$*\" >>"+c.virshLog+"\nprintf 'web1\\ndb 2\\nweb2\\n'\n", 0o755)
	require.NoError(t, os.Mkdir(filepath.Join(c.dir, "backups"), 0o755))
	writeFile(t, filepath.Join(c.dir, "notes.txt"), "", 0o644)
	c.env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"), "COMPLETION="+script, "FI_BACKUP_URI=")
	return c
}

// complete returns the candidates for the last word of fi-backup's words.
func (c *completer) complete(t *testing.T, words ...string) []string {
	t.Helper()
	cmd := exec.Command(c.bash, append([]string{"--norc", "--noprofile", "-c", driver, "bash", "fi-backup"}, words...)...)
	cmd.Dir, cmd.Env = c.dir, c.env
	out, stderr := run(t, cmd)
	assert.Empty(t, stderr, "completing %q", words)
	var got []string
	for _, l := range strings.Split(out, "\n") {
		if l != "" {
			got = append(got, l)
		}
	}
	sort.Strings(got)
	return got
}

// TestCompletionOptions: "--" offers every long option, "-" every short
// and every long one; nothing else.
func TestCompletionOptions(t *testing.T) {
	t.Parallel()
	c := newCompleter(t)
	var longs, all []string
	for _, o := range documentedOptions() {
		longs = append(longs, "--"+o.Long)
		if o.Short != "" {
			all = append(all, "-"+o.Short)
		}
	}
	all = append(all, longs...)
	sort.Strings(longs)
	sort.Strings(all)
	assert.Equal(t, longs, c.complete(t, "--"))
	assert.Equal(t, all, c.complete(t, "-"))
	assert.Equal(t, []string{"--backup_dir"}, c.complete(t, "--back"))
	assert.Equal(t, []string{"-d"}, c.complete(t, "-d"))
	assert.Empty(t, c.complete(t, "-dc"), "a bundle is complete")
	assert.Equal(t, []string{"--report", "--restore"}, c.complete(t, "-C", "--re"))
}

func TestCompletionValues(t *testing.T) {
	t.Parallel()
	c := newCompleter(t)
	methods := []string{"blockcommit", "blockpull"}
	for _, words := range [][]string{
		{"--method", ""}, {"-m", ""}, {"-dm", ""}, {"--meth", ""}, {"-C", "--method", "b"},
		{"--method", "=", ""}, // bash splits --method= at '=' (COMP_WORDBREAKS)
		{"--method", "=", "block"},
	} {
		assert.Equal(t, methods, c.complete(t, words...), "%q", words)
	}
	assert.Equal(t, []string{"--method=blockcommit", "--method=blockpull"}, c.complete(t, "--method="), "without '=' in COMP_WORDBREAKS")
	assert.Equal(t, []string{"blockpull"}, c.complete(t, "-m", "blockp"))
	assert.Equal(t, []string{"json", "text"}, c.complete(t, "--list", "--format", ""))
	assert.Equal(t, []string{"latest"}, c.complete(t, "--restore", ""))

	dirs := []string{"backups"}
	for _, opt := range []string{"-b", "-s", "--backup_dir", "--dump_state_dir", "--target_dir", "--textfile_dir", "-db"} {
		assert.Equal(t, dirs, c.complete(t, opt, ""), "%s takes a directory", opt)
	}
	assert.Equal(t, []string{"--backup_dir=backups"}, c.complete(t, "--backup_dir="))
	assert.Equal(t, []string{"backups", "notes.txt"}, c.complete(t, "--report", ""))
	for _, opt := range []string{"--keep", "--job_timeout", "--rate_limit", "--parallel"} {
		assert.Empty(t, c.complete(t, opt, ""), "%s takes a number", opt)
	}
	_, err := os.Stat(c.virshLog)
	assert.True(t, os.IsNotExist(err), "virsh run for an option's value")
}

// TestCompletionDomains: a word that is not an option is a domain: all,
// or a name virsh lists; after "--", every word is.
func TestCompletionDomains(t *testing.T) {
	t.Parallel()
	c := newCompleter(t)
	assert.Equal(t, []string{"all", `db\ 2`, "web1", "web2"}, c.complete(t, "-C", "-b", "/srv", ""))
	assert.Equal(t, []string{"web1", "web2"}, c.complete(t, "w"))
	assert.Equal(t, []string{"all"}, c.complete(t, "--keep", "3", "a"))
	assert.Equal(t, []string{"web1", "web2"}, c.complete(t, "--", "-b", "we"))
	assert.Equal(t, "-q list --all --name\n-q list --all --name\n-q list --all --name\n-q list --all --name\n",
		readFile(t, c.virshLog))

	c.env = append(c.env, "FI_BACKUP_URI=test:///default")
	require.NoError(t, os.Remove(c.virshLog))
	assert.Equal(t, []string{"web1", "web2"}, c.complete(t, "w"))
	assert.Equal(t, "-c test:///default -q list --all --name\n", readFile(t, c.virshLog))
}
