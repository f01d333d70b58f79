// Package cli is fi-backup's command line: the old script's option grammar
// and messages, the dependency checks, domain selection, the run's
// configuration, and the one place where the outcome becomes an exit code.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"

	"golang.org/x/sys/unix"

	"github.com/fi-backup/fi-backup/internal/backup"
	"github.com/fi-backup/fi-backup/internal/lock"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/progress"
	"github.com/fi-backup/fi-backup/internal/report"
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
	// PollEvery is the block-job poll interval (tests shorten it).
	PollEvery time.Duration
}

type app struct {
	Env
	p   *logging.Printer
	rep *report.Run // --report or --textfile_dir; nil: none
	ui  *progress.UI
	o   *Options // once parsed
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

// Run is the whole program; it returns the exit code.
func Run(ctx context.Context, env Env, args []string) int {
	a := &app{Env: env}
	if a.Getenv == nil {
		a.Getenv = func(string) string { return "" }
	}
	if a.Now == nil {
		a.Now = time.Now
	}
	// On a terminal, stderr shows the copies and jobs as they go.
	ui, logTo := progress.Start(env.Stdout, env.Stderr)
	defer ui.Stop()
	a.ui = ui
	a.p = logging.New(logTo, false, false)
	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	if env.Signals != nil {
		go a.watchSignals(env.Signals, stop)
	}
	err := a.run(ctx, args)
	var se signalError
	signal := ""
	if errors.As(context.Cause(ctx), &se) {
		a.p.Err("Interrupted by %s: stopped after cleaning up", unix.SignalName(se.sig))
		err = errors.Join(err, se)
		signal = unix.SignalName(se.sig)
	}
	if a.rep != nil && !a.writeReport(exitCode(err), signal) {
		err = errors.Join(err, errReport)
	}
	if werr := a.p.WriteErr(); werr != nil {
		fmt.Fprintf(a.Stderr, "fi-backup: output lost: %v\n", werr)
		err = errors.Join(err, errOutputLost)
	}
	return exitCode(err)
}

// writeReport writes the --report document and the --textfile_dir
// metrics of the run that ends with code; a failure is an [ERR] (the
// backups themselves happened).
func (a *app) writeReport(code int, signal string) bool {
	if code == ExitOK && a.p.WriteErr() != nil {
		code = ExitFailure
	}
	a.rep.Finish(a.Now(), code, signal)
	ok := true
	if a.o.Report != "" {
		if err := a.rep.WriteFile(a.o.Report); err != nil {
			a.p.Err("Cannot write the report '%s': %v", a.o.Report, err)
			ok = false
		}
	}
	if a.o.TextfileDir != "" {
		if err := a.rep.WriteMetrics(a.o.TextfileDir); err != nil {
			a.p.Err("Cannot write the metrics into '%s': %v", a.o.TextfileDir, err)
			ok = false
		}
	}
	return ok
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
	a.Exit(exitCode(signalError{sig}))
}

// run parses, checks and runs; its error says how it ended.
func (a *app) run(ctx context.Context, args []string) error {
	o, err := a.parse(args)
	if err != nil {
		return err
	}
	if o.AllRunning {
		a.p.Debug("all_running_domains = '1' so all running domains will be backed up")
	}
	if err := a.checkCommand(o); err != nil {
		return err
	}
	a.o = o
	if o.Report != "" || o.TextfileDir != "" {
		a.rep = report.New("fi-backup "+Version, args, a.Now())
		a.p.SetTap(func(prefix, msg string) {
			if prefix == "[ERR] " {
				a.rep.Error(msg)
			}
		})
	}
	var hyp virt.Hypervisor
	var connErr error
	var probe *qemuImgProbe
	connect := func() {
		if hyp == nil && connErr == nil {
			probe = a.startQemuImgProbe() // runs while libvirt connects
			hyp, connErr = a.Connect(a.Getenv("FI_BACKUP_URI"))
		}
	}
	defer func() {
		if hyp != nil {
			_ = hyp.Close()
		}
	}()
	if o.Consolidate {
		if o.Quiesce && !o.Snapshot {
			return a.usageErr("consolidation (-c | -C) and quiesce (-q) are not compatible")
		}
		if o.DumpDir != "" {
			return a.usageErr("consolidation (-c | -C) and dump state (-s) are not compatible")
		}
		if !o.MethodSet {
			connect()
			o.Method = defaultMethod(hyp)
		}
	}
	if o.DumpDir != "" && o.Quiesce {
		return a.usageErr("dump state (-s) and quiesce (-q) are not compatible")
	}
	connect()
	qemuImg, ok := a.checkDependencies(hyp, connErr, probe)
	if !ok {
		return errDependency
	}
	// Empty arguments are not domain names: `fi-backup -b DIR "$DOMAINS"`
	// with an empty $DOMAINS is "no domain given", as with the old script.
	var names []string
	for _, arg := range o.Args {
		if strings.TrimSpace(arg) != "" {
			names = append(names, arg)
		}
	}
	if o.Command != "" {
		return a.command(ctx, o, names, hyp, qemuImg)
	}
	if len(names) == 0 && !o.AllRunning {
		a.usage("<domain name> is missing!")
		return errNoDomain
	}
	if len(names) > 0 && o.AllRunning {
		a.usage("Setting all_running (-r) and specifying domains not compatible")
		return errNoDomain
	}
	r := backup.New(a.config(o, names), backup.Env{
		P: a.p, Hyp: hyp, Prog: a.Prog, Now: a.Now, LockDir: a.LockDir, QemuImg: qemuImg, PollEvery: a.PollEvery,
		Tool: "fi-backup " + Version, Progress: a.ui,
	})
	// A guest a killed -s run left paused is resumed before the domains
	// are listed, so that -r and all find it running again.
	recoverErr := r.RecoverAll(ctx)
	var prunable func(string) bool
	if o.Keep > 0 {
		prunable = r.HasPoints
	}
	sel := a.selectDomains(hyp, names, o.AllRunning, prunable)
	var failed error
	if sel.failed || recoverErr != nil {
		failed = backup.ErrFailed
	}
	if a.rep != nil {
		for _, n := range sel.missing {
			a.rep.Domain(n, report.ResultMissing, a.Now()).Finish(a.Now(), report.ResultMissing)
		}
	}
	turns := make([]turn, 0, len(sel.running)+len(sel.offline)+len(sel.gone))
	for _, d := range append(sel.running, sel.offline...) {
		turns = append(turns, turn{name: d.name, state: d.state.String(), run: func(ctx context.Context, r *backup.Runner) error {
			return r.Run(ctx, d.name, d.state)
		}})
	}
	for _, name := range sel.gone {
		turns = append(turns, turn{name: name, state: report.ResultMissing, run: func(ctx context.Context, r *backup.Runner) error {
			return r.PruneGone(ctx, name)
		}})
	}
	if !a.runTurns(ctx, r, turns, o.Parallel) {
		failed = backup.ErrFailed
	}
	return failed
}

// turn is one domain's part of the run.
type turn struct {
	name, state string
	run         func(context.Context, *backup.Runner) error
}

// runTurns runs the domains' turns, up to n at once, and reports whether
// all succeeded. With n = 1 they run in order and print as they go, as the
// old tool did; with more, each turn's lines are kept and printed as one
// block when it ends (in the order the turns end), so that no two domains'
// lines interleave. Locks, journals and the exit code work the same way.
func (a *app) runTurns(ctx context.Context, r *backup.Runner, turns []turn, n int) bool {
	var mu sync.Mutex
	ok := true
	one := func(t turn, buffered bool) {
		var rd *report.Domain
		if a.rep != nil {
			rd = a.rep.Domain(t.name, t.state, a.Now())
		}
		p := a.p.Child(buffered, func(prefix, msg string) {
			if rd != nil && prefix == "[ERR] " {
				rd.Update(func(d *report.Domain) { d.Errors = append(d.Errors, msg) })
			}
		})
		err := t.run(ctx, r.For(t.name, p, rd))
		if buffered {
			p.Flush(a.p)
		}
		if rd != nil {
			result := report.ResultOK
			switch {
			case err != nil && ctx.Err() != nil:
				result = report.ResultInterrupted
			case err != nil:
				result = report.ResultFailed
			}
			rd.Finish(a.Now(), result)
		}
		if err != nil {
			mu.Lock()
			ok = false
			mu.Unlock()
		}
	}
	skipped := func(rest []turn) {
		for _, t := range rest {
			if a.rep != nil {
				a.rep.Domain(t.name, t.state, a.Now()).Finish(a.Now(), report.ResultNotStarted)
			}
		}
	}
	if n <= 1 {
		for i, t := range turns {
			if ctx.Err() != nil {
				skipped(turns[i:])
				break
			}
			one(t, false)
		}
		return ok
	}
	slots := make(chan struct{}, n)
	var wg sync.WaitGroup
	for i, t := range turns {
		slots <- struct{}{}
		if ctx.Err() != nil {
			<-slots
			skipped(turns[i:])
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			one(t, true)
		}()
	}
	wg.Wait()
	return ok
}

// checkCommand refuses options that make no sense with --list, --verify
// or --restore (or those commands' own options without them).
func (a *app) checkCommand(o *Options) error {
	if o.Command == "" {
		switch {
		case o.CBT && o.BackupDir == "":
			return a.usageErr("--cbt requires -b <directory>")
		case o.CBT && o.Consolidate:
			return a.usageErr("--cbt and consolidation (-c | -C) are not compatible: --cbt adds no overlay, there is nothing to consolidate")
		case o.CBT && o.DumpDir != "":
			return a.usageErr("--cbt and dump state (-s) are not compatible")
		case o.CBT && o.MethodSet:
			return a.usageErr("--cbt and -m are not compatible: --cbt never consolidates")
		case o.Keep > 0 && o.BackupDir == "":
			return a.usageErr("--keep requires -b <directory>")
		case o.Keep > 0 && o.Consolidate && !o.Snapshot:
			return a.usageErr("--keep and consolidation only (-c) are not compatible")
		case o.TargetDir != "":
			return a.usageErr("--target_dir only works with --restore")
		case o.Format != "":
			return a.usageErr("--format only works with --list")
		}
		return nil
	}
	c := "--" + o.Command
	switch {
	case o.BackupDir == "":
		return a.usageErr(c + " requires -b <directory>")
	case o.Consolidate:
		return a.usageErr(c + " and consolidation (-c | -C) are not compatible")
	case o.DumpDir != "":
		return a.usageErr(c + " and dump state (-s) are not compatible")
	case o.Quiesce:
		return a.usageErr(c + " and quiesce (-q) are not compatible")
	case o.MethodSet:
		return a.usageErr(c + " and -m are not compatible")
	case o.AllRunning:
		return a.usageErr(c + " and all_running (-r) are not compatible")
	case o.Keep > 0:
		return a.usageErr(c + " and --keep are not compatible")
	case o.CBT:
		return a.usageErr(c + " and --cbt are not compatible")
	case o.Report != "":
		return a.usageErr(c + " and --report are not compatible")
	case o.TextfileDir != "":
		return a.usageErr(c + " and --textfile_dir are not compatible")
	case o.Parallel > 1:
		return a.usageErr(c + " and --parallel are not compatible")
	case o.Format != "" && o.Command != "list":
		return a.usageErr("--format only works with --list")
	case o.TargetDir != "" && o.Command != "restore":
		return a.usageErr("--target_dir only works with --restore")
	case o.Command == "restore" && o.TargetDir == "":
		return a.usageErr("--restore requires --target_dir <directory>")
	}
	return nil
}

// command runs --list, --verify or --restore.
func (a *app) command(ctx context.Context, o *Options, args []string, hyp virt.Hypervisor, qemuImg string) error {
	var names []string
	for _, arg := range args {
		if arg == "all" {
			continue // every domain of the directory, as with no name
		}
		if strings.ContainsFunc(arg, unicode.IsSpace) && domainExists(hyp, arg) {
			names = append(names, arg)
			continue
		}
		names = append(names, strings.Fields(arg)...)
	}
	r := backup.New(a.config(o, nil), backup.Env{
		P: a.p, Hyp: hyp, Prog: a.Prog, Now: a.Now, LockDir: a.LockDir, QemuImg: qemuImg, Tool: "fi-backup " + Version,
	})
	var err error
	switch o.Command {
	case "list":
		format := backup.ListText
		if o.Format == "json" {
			format = backup.ListJSON
		}
		err = r.List(ctx, names, format)
	case "verify":
		err = r.Verify(ctx, names)
	case "restore":
		switch {
		case len(names) == 0:
			a.usage("<domain name> is missing!")
			return errNoDomain
		case len(names) > 1:
			return a.usageErr("--restore takes exactly one domain")
		}
		err = r.Restore(ctx, names[0], o.RestoreAt, o.TargetDir)
	}
	if err != nil {
		return backup.ErrFailed
	}
	return nil
}

// config is the run's settings: the options, the domain arguments and the
// environment knobs of the state dump.
func (a *app) config(o *Options, names []string) backup.Config {
	cfg := backup.Config{
		BackupDir: o.BackupDir, DumpDir: o.DumpDir, Snapshot: o.Snapshot, Consolidate: o.Consolidate,
		Method: o.Method, Quiesce: o.Quiesce, JobTimeout: o.JobTimeout, RateLimit: o.RateLimit, Keep: o.Keep,
		CBT: o.CBT,
	}
	for _, n := range names {
		if n == "all" {
			cfg.AllKeyword = true
		}
	}
	// FI_BACKUP_DUMP_TIMEOUT bounds the -s migration (a guest dirtying RAM
	// faster than it can be written never converges: it is cancelled and
	// resumed); FI_BACKUP_TEST_DUMP_BANDWIDTH slows it down for tests.
	if v := a.Getenv("FI_BACKUP_DUMP_TIMEOUT"); v != "" {
		if d, err := time.ParseDuration(v); err == nil && d > 0 {
			cfg.DumpTimeout = d
		} else {
			a.p.Warn("Ignoring FI_BACKUP_DUMP_TIMEOUT='%s': not a positive duration", v)
		}
	}
	cfg.KillAt = a.Getenv("FI_BACKUP_TEST_KILL_AT")
	if v := a.Getenv("FI_BACKUP_TEST_DUMP_BANDWIDTH"); v != "" {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n > 0 {
			cfg.DumpBandwidth = n
		} else {
			a.p.Warn("Ignoring FI_BACKUP_TEST_DUMP_BANDWIDTH='%s': not a positive number of bytes/s", v)
		}
	}
	return cfg
}
