package main

import (
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/cli"
)

const manPage = "fi-backup.8"

// TestManPageRendersWithoutWarnings: groff's strictest warnings (-ww) stay
// silent, as in the page's own header comment.
func TestManPageRendersWithoutWarnings(t *testing.T) {
	t.Parallel()
	groff := needTool(t, "groff")
	out, stderr := run(t, exec.Command(groff, "-ww", "-man", "-Tutf8", manPage))
	assert.Empty(t, stderr)
	assert.NotEmpty(t, out)
}

// TestManPageShownByMan: man-db, which admins read it with, shows it.
func TestManPageShownByMan(t *testing.T) {
	t.Parallel()
	man := needTool(t, "man")
	cmd := exec.Command(man, "-l", manPage)
	cmd.Env = append(os.Environ(), "MANPAGER=cat", "PAGER=cat", "MANWIDTH=80", "LC_ALL=C.UTF-8")
	out, stderr := run(t, cmd)
	assert.Empty(t, stderr)
	assert.Contains(t, out, "fi-backup - online forward-incremental backups of libvirt/KVM domains")
}

// manSections renders the page as plain text and splits it into its
// sections. IN=1n puts every .TP tag on a line of its own, indented by one
// space, with the text below it.
func manSections(t *testing.T) (order []string, sections map[string][]string) {
	t.Helper()
	groff := needTool(t, "groff")
	out, _ := run(t, exec.Command(groff, "-man", "-Tutf8", "-P-cbou", "-rLL=200n", "-rIN=1n", manPage))
	sections = map[string][]string{}
	cur := ""
	heading := regexp.MustCompile(`^[A-Z][A-Z ]+$`)
	for _, line := range strings.Split(out, "\n") {
		if heading.MatchString(line) {
			cur = line
			order = append(order, cur)
			continue
		}
		sections[cur] = append(sections[cur], line)
	}
	return order, sections
}

// tags are the .TP tags of a section: lines indented by one space whose
// next line, the entry's text, is indented by two (a paragraph's lines are
// all indented by one).
func tags(lines []string) []string {
	indent := func(l string) int { return len(l) - len(strings.TrimLeft(l, " ")) }
	var tt []string
	for i := 0; i+1 < len(lines); i++ {
		if l := lines[i]; strings.TrimSpace(l) != "" && indent(l) == 1 && indent(lines[i+1]) == 2 {
			tt = append(tt, l[1:])
		}
	}
	return tt
}

func TestManPageSections(t *testing.T) {
	t.Parallel()
	order, _ := manSections(t)
	assert.Equal(t, []string{"NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "RESTORE POINTS", "RETENTION",
		"EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO"}, order)
}

// TestManPageDocumentsEveryOption: every option of the table (and those
// documented ahead of their code) has its entry under OPTIONS, with its
// short and long forms and an argument exactly when it takes one; and the
// page documents no other option.
func TestManPageDocumentsEveryOption(t *testing.T) {
	t.Parallel()
	_, sections := manSections(t)
	entry := regexp.MustCompile(`^(?:-([A-Za-z])( [a-z]+)?, )?--([a-z_]+)(=[a-z]+)?$`)
	found := map[string]cli.OptionName{}
	for _, tag := range tags(sections["OPTIONS"]) {
		m := entry.FindStringSubmatch(tag)
		if !assert.NotNil(t, m, "OPTIONS entry %q is not -x ARG, --long=ARG", tag) {
			continue
		}
		if m[1] != "" {
			assert.Equal(t, m[2] != "", m[4] != "", "%q: the short and long forms disagree on the argument", tag)
		}
		assert.NotContains(t, found, m[3], "--%s documented twice", m[3])
		found[m[3]] = cli.OptionName{Long: m[3], Short: m[1], Arg: m[4] != ""}
	}
	for _, o := range documentedOptions() {
		if assert.Contains(t, found, o.Long, "--%s is not documented under OPTIONS", o.Long) {
			assert.Equal(t, o, found[o.Long], "the OPTIONS entry of --%s", o.Long)
		}
		delete(found, o.Long)
	}
	assert.Empty(t, found, "OPTIONS documents options that do not exist")
}

func TestManPageExitStatusAndEnvironment(t *testing.T) {
	t.Parallel()
	_, sections := manSections(t)
	codes := strings.Join(tags(sections["EXIT STATUS"]), ", ")
	assert.Equal(t, fmt.Sprintf("%d, %d, %d, %d, %d, %d", cli.ExitOK, cli.ExitFailure, cli.ExitNoDomain,
		cli.ExitDependency, cli.ExitInterrupted, cli.ExitTerminated), codes)
	env := tags(sections["ENVIRONMENT"])
	for _, v := range []string{"FI_BACKUP_URI", "FI_BACKUP_QEMU_IMG", "FI_BACKUP_DUMP_TIMEOUT", "POSIXLY_CORRECT"} {
		assert.Contains(t, env, v)
	}
}

// TestManPageVersion: the page's footer names this version.
func TestManPageVersion(t *testing.T) {
	t.Parallel()
	th := regexp.MustCompile(`(?m)^\.TH FI-BACKUP 8 "[^"]+" "fi-backup ([^"]+)"`).FindStringSubmatch(readFile(t, manPage))
	require.NotNil(t, th, "no .TH line")
	assert.Equal(t, cli.Version, th[1], "update the version in the .TH line of %s", manPage)
}
