package cli

import (
	"errors"
	"strings"
	"unicode"

	"github.com/fi-backup/fi-backup/internal/virt"
)

type selection struct {
	running, offline []selected
	gone             []string // named domains that no longer exist, to prune only
	missing          []string // named domains that do not exist
	failed           bool     // a named domain could not be used
	allKeyword       bool
}

type selected struct {
	name  string
	state virt.State
}

// selectDomains turns the positional arguments into the running and
// not-running lists, from libvirt's state enums, in libvirt's order for
// all/-r and in the order given for names. prunable, when set, says whether
// a named domain that does not exist has restore points to prune (--keep).
func (a *app) selectDomains(hyp virt.Hypervisor, args []string, allRunning bool, prunable func(string) bool) selection {
	var sel selection
	var names []string
	for _, arg := range args {
		if arg == "all" {
			sel.allKeyword = true
			continue
		}
		// "dom1 dom2" in one argument names two domains, as before; but a
		// domain whose own name has a space is taken whole when it exists.
		if strings.ContainsFunc(arg, unicode.IsSpace) && domainExists(hyp, arg) {
			names = append(names, arg)
			continue
		}
		names = append(names, strings.Fields(arg)...)
	}
	// The old debug lines: a list from `virsh list` came one name per line;
	// named domains were appended with a leading space each.
	var runLine, offLine []string
	seen := map[string]bool{}
	add := func(list *[]selected, line *[]string, n string, st virt.State, sep string) {
		if seen[n] {
			return
		}
		seen[n] = true
		*list = append(*list, selected{n, st})
		if sep == "\n" && len(*line) == 0 {
			sep = ""
		}
		*line = append(*line, sep+n)
	}
	listed := func(f virt.Filter, what string) []string {
		names, err := hyp.List(f)
		if err != nil {
			a.p.Err("Cannot list %s domains: %s", what, virt.Describe(err))
			sel.failed = true
		}
		return names
	}
	if allRunning || sel.allKeyword {
		for _, n := range listed(virt.ListRunning, "running") {
			add(&sel.running, &runLine, n, virt.StateRunning, "\n")
		}
	}
	if sel.allKeyword {
		for _, n := range listed(virt.ListShutoffPaused, "shut-off") {
			st, err := domainState(hyp, n)
			if err != nil {
				continue // undefined meanwhile
			}
			add(&sel.offline, &offLine, n, st, "\n")
		}
		every, err := hyp.List(virt.ListAll)
		if err == nil {
			for _, n := range every {
				if !seen[n] {
					a.p.Warn("Skipping domain '%s': it is neither running, paused nor shut off", n)
				}
			}
		}
	}
	for _, n := range names {
		if seen[n] {
			continue
		}
		st, err := domainState(hyp, n)
		switch {
		case errors.Is(err, virt.ErrNoDomain) && prunable != nil && prunable(n):
			sel.gone = append(sel.gone, n)
			seen[n] = true
		case err != nil:
			a.p.Err("Cannot find domain '%s': %s", n, virt.Describe(err))
			if errors.Is(err, virt.ErrNoDomain) {
				sel.missing = append(sel.missing, n)
			}
			sel.failed = true
			seen[n] = true
		case st == virt.StateRunning || st == virt.StateBlocked:
			add(&sel.running, &runLine, n, st, " ")
		case st == virt.StateShutoff || st == virt.StatePaused || st == virt.StateCrashed:
			add(&sel.offline, &offLine, n, st, " ")
		default:
			a.p.Err("Domain '%s' is %s: skipping it", n, st)
			sel.failed = true
			seen[n] = true
		}
	}
	a.p.Debug("Domains NOTRUNNING to backup: %s", strings.Join(offLine, ""))
	a.p.Debug("Domains RUNNING to backup: %s", strings.Join(runLine, ""))
	return sel
}

func domainExists(hyp virt.Hypervisor, name string) bool {
	d, err := hyp.Lookup(name)
	if err != nil {
		return false
	}
	_ = d.Close()
	return true
}

func domainState(hyp virt.Hypervisor, name string) (virt.State, error) {
	d, err := hyp.Lookup(name)
	if err != nil {
		return virt.StateNoState, err
	}
	defer d.Close()
	return d.State()
}
