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
	"syscall"
	"time"
	"unicode"

	"golang.org/x/sys/unix"

	"github.com/fi-backup/fi-backup/internal/backup"
	"github.com/fi-backup/fi-backup/internal/lock"
	"github.com/fi-backup/fi-backup/internal/logging"
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
	err := a.run(ctx, args)
	var se signalError
	if errors.As(context.Cause(ctx), &se) {
		a.p.Err("Interrupted by %s: stopped after cleaning up", unix.SignalName(se.sig))
		err = errors.Join(err, se)
	}
	if werr := a.p.WriteErr(); werr != nil {
		fmt.Fprintf(a.Stderr, "fi-backup: output lost: %v\n", werr)
		err = errors.Join(err, errOutputLost)
	}
	return exitCode(err)
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
	var hyp virt.Hypervisor
	var connErr error
	connect := func() {
		if hyp == nil && connErr == nil {
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
	qemuImg, ok := a.checkDependencies(hyp, connErr)
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
		Tool: "fi-backup " + Version,
	})
	// A guest a killed -s run left paused is resumed before the domains
	// are listed, so that -r and all find it running again.
	r.RecoverAll(ctx)
	var prunable func(string) bool
	if o.Keep > 0 {
		prunable = r.HasPoints
	}
	sel := a.selectDomains(hyp, names, o.AllRunning, prunable)
	var failed error
	if sel.failed {
		failed = backup.ErrFailed
	}
	for _, d := range append(sel.running, sel.offline...) {
		if ctx.Err() != nil {
			break
		}
		if err := r.Run(ctx, d.name, d.state); err != nil {
			failed = backup.ErrFailed
		}
	}
	for _, name := range sel.gone {
		if ctx.Err() != nil {
			break
		}
		if err := r.PruneGone(ctx, name); err != nil {
			failed = backup.ErrFailed
		}
	}
	return failed
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
