// Package cli is fi-backup's command line: the old script's option grammar
// and messages, the dependency checks, domain selection, and the one place
// where the outcome becomes an exit code.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"
	"unicode"

	"golang.org/x/sys/unix"

	"github.com/fi-backup/fi-backup/internal/backup"
	"github.com/fi-backup/fi-backup/internal/lock"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// Env is everything Run needs from the outside world; tests replace parts.
type Env struct {
	Prog    string // $0 as the old script saw it, shown in usage and lock messages
	Stdout  io.Writer
	Stderr  io.Writer
	Getenv  func(string) string
	Connect func(uri string) (virt.Hypervisor, error)
	Now     func() time.Time
	LockDir string
	// Signals delivers SIGINT/SIGTERM: the first stops the run after
	// cleaning up, a second one exits at once through Exit.
	Signals <-chan os.Signal
	Exit    func(code int)
}

type app struct {
	Env
	p *logging.Printer
}

// Main runs fi-backup with the real environment and returns the exit code.
func Main(args []string, connect func(string) (virt.Hypervisor, error)) int {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	// A reader that went away (fi-backup … | head) must not kill the tool
	// between a guest's pause and its resume: with SIGPIPE caught, a write
	// to the closed pipe fails with EPIPE instead, which the printer
	// remembers and Run turns into a non-zero exit at the end.
	pipes := make(chan os.Signal, 1)
	signal.Notify(pipes, syscall.SIGPIPE)
	defer signal.Stop(pipes)
	return Run(context.Background(), Env{
		Prog: progName(os.Args[0], exec.LookPath), Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv,
		Connect: connect, Now: time.Now, LockDir: lock.DefaultDir, Signals: sigs, Exit: os.Exit,
	}, args)
}

// progName is $0 as bash showed it for the old script: a command found
// through PATH is shown with the directory it was found in.
func progName(argv0 string, lookPath func(string) (string, error)) string {
	if argv0 == "" || strings.Contains(argv0, "/") {
		return argv0
	}
	if p, err := lookPath(argv0); err == nil {
		return p
	}
	return argv0
}

type signalError struct{ sig syscall.Signal }

func (e signalError) Error() string { return "interrupted by " + unix.SignalName(e.sig) }

// Run is the whole program; it returns the exit code.
func Run(ctx context.Context, env Env, args []string) int {
	a := &app{Env: env}
	if a.Getenv == nil {
		a.Getenv = func(string) string { return "" }
	}
	if a.Now == nil {
		a.Now = time.Now
	}
	a.p = logging.New(env.Stdout, false, false)
	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	if env.Signals != nil {
		go a.watchSignals(env.Signals, stop)
	}
	o, err := a.parse(args)
	if err != nil {
		return exitCode(err)
	}
	code := a.run(ctx, o)
	var se signalError
	if errors.As(context.Cause(ctx), &se) {
		a.p.Err("Interrupted by %s: stopped after cleaning up", unix.SignalName(se.sig))
		code = 128 + int(se.sig)
	}
	if err := a.p.WriteErr(); err != nil {
		fmt.Fprintf(a.Stderr, "fi-backup: output lost: %v\n", err)
		if code == ExitOK {
			code = ExitFailure
		}
	}
	return code
}

// watchSignals: the first SIGINT/SIGTERM cancels the run, which then cleans
// up (aborts its block job, resumes a paused guest, removes temporary
// files) and exits 130/143. Cleanup can wait on libvirt for many seconds; a
// second signal (an impatient admin, cron's timeout) exits at once. What is
// left then is recorded in the journal, and the next run recovers it.
func (a *app) watchSignals(sigs <-chan os.Signal, stop context.CancelCauseFunc) {
	first, ok := <-sigs
	if !ok {
		return
	}
	stop(signalError{first.(syscall.Signal)})
	// Said at once (never blocking this goroutine: stdout may be a full
	// pipe), so the admin knows what is going on and what a second signal does.
	go a.p.Info("Interrupted by %s: cleaning up (a second signal exits at once)", unix.SignalName(first.(syscall.Signal)))
	second, ok := <-sigs
	if !ok {
		return
	}
	sig := second.(syscall.Signal)
	done := make(chan struct{})
	go func() {
		// Best effort: stdout may be a full pipe.
		a.p.Err("Interrupted again by %s: exiting without cleaning up; the next run recovers what this one left (see the journal in %s)", unix.SignalName(sig), a.LockDir)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(time.Second):
	}
	a.Exit(128 + int(sig))
}

func exitCode(err error) int {
	var en exitNow
	if errors.As(err, &en) {
		return en.code
	}
	return ExitFailure
}

func (a *app) run(ctx context.Context, o *Options) int {
	if o.AllRunning {
		a.p.Debug("all_running_domains = '1' so all running domains will be backed up")
	}
	var hyp virt.Hypervisor
	var connErr error
	uri := a.Getenv("FI_BACKUP_URI")
	connect := func() {
		if hyp == nil && connErr == nil {
			hyp, connErr = a.Connect(uri)
		}
	}
	defer func() {
		if hyp != nil {
			_ = hyp.Close()
		}
	}()
	if o.Consolidate {
		if o.Quiesce && !o.Snapshot {
			a.usage("consolidation (-c | -C) and quiesce (-q) are not compatible")
			return ExitFailure
		}
		if o.DumpDir != "" {
			a.usage("consolidation (-c | -C) and dump state (-s) are not compatible")
			return ExitFailure
		}
		if !o.MethodSet {
			connect()
			o.Method = defaultMethod(hyp)
		}
	}
	if o.DumpDir != "" && o.Quiesce {
		a.usage("dump state (-s) and quiesce (-q) are not compatible")
		return ExitFailure
	}
	connect()
	qemuImg, ok := a.checkDependencies(hyp, connErr)
	if !ok {
		return ExitDependency
	}
	// Empty arguments are not domain names: `fi-backup -b DIR "$DOMAINS"`
	// with an empty $DOMAINS is "no domain given", as with the old script.
	var args []string
	for _, arg := range o.Args {
		if strings.TrimSpace(arg) != "" {
			args = append(args, arg)
		}
	}
	if len(args) == 0 && !o.AllRunning {
		a.usage("<domain name> is missing!")
		return ExitNoDomain
	}
	if len(args) > 0 && o.AllRunning {
		a.usage("Setting all_running (-r) and specifying domains not compatible")
		return ExitNoDomain
	}
	r := &backup.Runner{
		P: a.p, Hyp: hyp, Prog: a.Prog, Now: a.Now, LockDir: a.LockDir,
		QemuImg:   qemuImg,
		BackupDir: o.BackupDir, DumpDir: o.DumpDir, Snapshot: o.Snapshot,
		Consolidate: o.Consolidate, Method: o.Method, Quiesce: o.Quiesce,
		JobTimeout: o.JobTimeout, RateLimit: o.RateLimit,
	}
	// A guest a killed -s run left paused is resumed before the domains
	// are listed, so that -r and all find it running again.
	r.RecoverAll(ctx)
	sel := a.selectDomains(hyp, args, o.AllRunning)
	r.AllKeyword = sel.allKeyword
	failed := sel.failed
	for _, d := range append(sel.running, sel.offline...) {
		if ctx.Err() != nil {
			break
		}
		if err := r.Run(ctx, d.name, d.state); err != nil {
			failed = true
		}
	}
	if failed {
		return ExitFailure
	}
	return ExitOK
}

// defaultMethod is the old rule: blockcommit when QEMU ≥ 2.1.0 and libvirt
// ≥ 1.2.9, else blockpull (also when the versions cannot be read).
func defaultMethod(hyp virt.Hypervisor) string {
	if hyp == nil {
		return MethodPull
	}
	qv, err1 := hyp.HypervisorVersion()
	lv, err2 := hyp.LibVersion()
	if err1 == nil && err2 == nil && versionAtLeast(qv, "2.1.0") && versionAtLeast(lv, "1.2.9") {
		return MethodCommit
	}
	return MethodPull
}

// checkDependencies reports every problem (the old script accumulated
// them) and returns the qemu-img path to use.
func (a *app) checkDependencies(hyp virt.Hypervisor, connErr error) (string, bool) {
	ok := true
	name := a.Getenv("FI_BACKUP_QEMU_IMG")
	if name == "" {
		name = "qemu-img"
	}
	qemuImg, err := exec.LookPath(name)
	if err != nil {
		a.p.Err("'%s' cannot be found or executed", name)
		ok = false
	}
	if connErr != nil {
		a.p.Err("Cannot connect to libvirt: %s", virt.Describe(connErr))
		return qemuImg, false
	}
	lv, err := hyp.LibVersion()
	switch {
	case err != nil:
		a.p.Err("Cannot read libVirt version: %s", virt.Describe(err))
		ok = false
	case versionAtLeast(lv, "1.0.0"):
		a.p.Info("libVirt version '%s' support is experimental", lv)
	case versionAtLeast(lv, "0.9.13"):
		a.p.Debug("libVirt version '%s' is supported", lv)
	default:
		a.p.Err("Unsupported libVirt version '%s'. Please use libVirt 0.9.13 or later", lv)
		ok = false
	}
	if qemuImg != "" {
		iv, err := qcow2.Version(qemuImg)
		switch {
		case err != nil:
			a.p.Err("'%s' cannot be found or executed", qemuImg)
			ok = false
		case versionAtLeast(iv, "1.2.0"):
			a.p.Debug("%s version '%s' is supported", qemuImg, iv)
		default:
			a.p.Err("Unsupported %s version '%s'. Please use 'qemu-img' 1.2.0 or later", qemuImg, iv)
			ok = false
		}
		if err == nil && versionAtLeast(iv, "2.10.0") {
			a.p.Debug("%s version '%s' will use --force-share for file access", qemuImg, iv)
		}
	}
	qv, err := hyp.HypervisorVersion()
	switch {
	case err != nil:
		a.p.Err("Cannot read QEMU/KVM version from libvirt: %s", virt.Describe(err))
		ok = false
	case versionAtLeast(qv, "1.2.0"):
		a.p.Debug("QEMU/KVM version '%s' is supported", qv)
	default:
		a.p.Err("Unsupported QEMU/KVM version '%s'. Please use QEMU/KVM 1.2.0 or later", qv)
		ok = false
	}
	return qemuImg, ok
}

type selection struct {
	running, offline []selected
	failed           bool // a named domain could not be used
	allKeyword       bool
}

type selected struct {
	name  string
	state virt.State
}

// selectDomains turns the positional arguments into the running and
// not-running lists, from libvirt's state enums, in libvirt's order for
// all/-r and in the order given for names.
func (a *app) selectDomains(hyp virt.Hypervisor, args []string, allRunning bool) selection {
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
		case err != nil:
			a.p.Err("Cannot find domain '%s': %s", n, virt.Describe(err))
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
