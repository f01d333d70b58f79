// Package backup runs one domain's turn, from its lock to its last copy:
// it is the orchestration that calls the packages doing the work, in order.
//
//	running domain:  lock → recover (journal) → plan + admit (snapshot, backupdir)
//	                 → [-s dump] → snapshot → copy the read-only chain (backupdir)
//	                 → [-c/-C consolidate (blockjob)]
//	running, --cbt:  lock → recover (journal) → plan (full or increment per disk)
//	                 → push backup with a checkpoint (cbt) → name the files,
//	                 record the point (backupdir) → delete the older checkpoint
//	shut-off domain: lock → chains (qemu-img) → admit → copy with cp -up (backupdir)
//	                 → [-c/-C consolidate with qemu-img (blockjob.Offline)]
//	either, after success with --keep: prune the oldest restore points (backupdir)
//
// The settings of a run are one immutable Config built by the command line;
// everything the run touches outside the process comes in through Env.
package backup

import (
	"context"
	"errors"
	"time"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/blockjob"
	"github.com/fi-backup/fi-backup/internal/cbt"
	"github.com/fi-backup/fi-backup/internal/chains"
	"github.com/fi-backup/fi-backup/internal/copyfile"
	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/lock"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/progress"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/report"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// Config is what the command line asked for.
type Config struct {
	BackupDir   string // -b; "" without
	DumpDir     string // -s; "" without
	Snapshot    bool   // snapshot (and copy): false only with -c
	Consolidate bool   // -c or -C
	Method      blockjob.Method
	Quiesce     bool          // -q
	JobTimeout  time.Duration // --job_timeout
	RateLimit   int64         // --rate_limit, bytes/s; 0: unlimited
	Keep        int           // --keep: restore points kept per domain; 0: all
	AllKeyword  bool          // the domains were given as "all"
	// CBT backs running domains up through libvirt's changed-block
	// tracking (--cbt) instead of a snapshot; shut-off ones are copied.
	CBT bool

	DumpTimeout   time.Duration // FI_BACKUP_DUMP_TIMEOUT; 0: the default
	DumpBandwidth int64         // FI_BACKUP_TEST_DUMP_BANDWIDTH (tests only)
	KillAt        string        // FI_BACKUP_TEST_KILL_AT (tests only): see killAt
}

// Env is the run's surroundings.
type Env struct {
	P         *logging.Printer
	Hyp       virt.Hypervisor
	Prog      string // $0, for the lock contention message
	Now       func() time.Time
	LockDir   string
	QemuImg   string
	Tool      string        // "fi-backup <version>", recorded in the manifests
	PollEvery time.Duration // block-job poll (tests make it short); 0: the default
	Progress  *progress.UI  // the terminal's progress display; nil: none
}

// ErrFailed marks a domain whose failure has been reported.
var ErrFailed = errors.New("domain failed")

// Runner runs the domains of one invocation.
type Runner struct {
	cfg     Config
	p       *logging.Printer
	hyp     virt.Hypervisor
	prog    string
	now     func() time.Time
	lockDir string
	tool    string
	journal journal.Store
	chains  chains.Reader
	dir     *backupdir.Dir // nil without -b
	images  qcow2.Tool
	ui      *progress.UI
	rep     *report.Domain    // this domain's record in the run's report; nil: none
	diskOf  map[string]string // host chain file → disk target, for the report
	jobs    *blockjob.Consolidator
	cbt     *cbt.Runner
}

// New prepares a run.
func New(cfg Config, env Env) *Runner {
	tool := qcow2.Tool{Path: env.QemuImg}
	r := &Runner{
		cfg: cfg, p: env.P, hyp: env.Hyp, prog: env.Prog, now: env.Now, lockDir: env.LockDir, tool: env.Tool, images: tool, ui: env.Progress,
		journal: journal.Store{Dir: env.LockDir},
		chains:  chains.Reader{P: env.P, Hyp: env.Hyp, Tool: tool, Cache: chains.NewCache()},
	}
	if r.now == nil {
		r.now = time.Now
	}
	if cfg.BackupDir != "" {
		r.dir = &backupdir.Dir{Path: cfg.BackupDir, P: env.P, Tool: tool}
		if cfg.RateLimit > 0 {
			r.dir.Limit = copyfile.NewLimiter(cfg.RateLimit)
		}
	}
	r.jobs = &blockjob.Consolidator{
		P: env.P, Journal: r.journal, Method: cfg.Method, Timeout: cfg.JobTimeout,
		Bandwidth: uint64(max(cfg.RateLimit, 0)), PollEvery: env.PollEvery,
	}
	r.cbt = &cbt.Runner{
		P: env.P, Journal: r.journal, Timeout: cfg.JobTimeout,
		Bandwidth: uint64(max(cfg.RateLimit, 0)), PollEvery: env.PollEvery,
	}
	if cfg.KillAt != "" {
		hook := killAt(cfg.KillAt)
		r.cbt.Step = hook
		if r.dir != nil {
			r.dir.StepHook = hook
		}
	}
	return r
}

// For is the runner of one domain's turn: everything it prints goes to p,
// what it does is recorded in rd (nil: no report). Turns of different
// domains may run at once, each with its own For.
func (r *Runner) For(name string, p *logging.Printer, rd *report.Domain) *Runner {
	c := *r
	c.p, c.rep, c.diskOf = p, rd, map[string]string{}
	c.chains.P = p
	jobs := *r.jobs
	jobs.P = p
	c.jobs = &jobs
	cj := *r.cbt
	cj.P = p
	c.cbt = &cj
	var copyBar func(string, int64) *progress.Bar
	if r.ui != nil {
		jobs.Bar = func(target string) *progress.Bar { return r.ui.Job(name, target, string(r.cfg.Method)) }
		copyBar = func(src string, total int64) *progress.Bar { return r.ui.Copy(name, src, total) }
	}
	if r.dir != nil {
		c.dir = r.dir.For(p, c.observeCopy, copyBar)
	}
	return &c
}

// note changes this domain's report record, if there is one.
func (r *Runner) note(fn func(d *report.Domain)) {
	if r.rep != nil {
		r.rep.Update(fn)
	}
}

// act records an action of this domain's turn.
func (r *Runner) act(action string) {
	if r.rep != nil {
		r.rep.Act(action)
	}
}

// observeCopy records a chain file the backup directory handled.
func (r *Runner) observeCopy(ev backupdir.CopyEvent) {
	if r.rep == nil {
		return
	}
	target := r.diskOf[ev.Source]
	r.rep.AddFile(target, "", report.File{Source: ev.Source, Dest: ev.Dest, Copied: ev.Copied, Reason: ev.Reason, Bytes: ev.Bytes, Seconds: ev.Seconds})
}

// chainsCopied tells the report which disk each chain file belongs to.
func (r *Runner) chainsCopied(target, source string, chain []virt.Image) {
	if r.rep == nil {
		return
	}
	r.rep.Disk(target, source)
	for _, img := range chain {
		r.diskOf[img.Path] = target
	}
}

// Run backs up (and/or consolidates) one domain. selected is the state it
// had when the domains were listed; it is read again under the domain's
// lock, because a domain started (or stopped) since then must go the way its
// state now says: copying a running domain's live disk offline would be a
// torn copy reported as good.
func (r *Runner) Run(ctx context.Context, name string, selected virt.State) error {
	if !running(selected) && r.dir == nil && !(selected == virt.StateShutoff && r.cfg.Consolidate && !r.cfg.Snapshot) {
		// The old tool's refusal, before it took any lock (-c on a
		// shut-off domain copies nothing: it needs no directory).
		r.needsBackupDir(name, selected)
		return ErrFailed
	}
	l, err := lock.TryLock(r.lockDir, name)
	if err != nil {
		r.lockFailed(name, selected, err)
		return ErrFailed
	}
	defer func() { _ = l.Unlock() }()
	// Other turns read this domain's chain once per run (target 3 of the
	// performance issue); it may change from here on, so they read it
	// again, as this turn leaves it.
	r.chains.Cache.Forget(name)
	defer r.chains.Cache.Forget(name)
	dom, err := r.hyp.Lookup(name)
	if err != nil {
		r.p.Err("Cannot find domain '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	defer dom.Close()
	defer r.summarize(ctx, dom)
	if err := r.recover(dom); err != nil {
		return err
	}
	st, err := dom.State()
	if err != nil {
		r.p.Err("Cannot read the state of '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	if running(st) != running(selected) {
		r.p.Debug("Domain '%s' is %s now (it was %s when the domains were listed)", name, st, selected)
	}
	switch {
	case running(st) && r.cfg.CBT:
		err = r.cbtOnline(ctx, dom)
	case running(st):
		err = r.online(ctx, dom)
	case st == virt.StateShutoff || st == virt.StatePaused || st == virt.StateCrashed:
		err = r.offline(ctx, dom, st)
	default:
		r.p.Err("Domain '%s' is %s: skipping it", name, st)
		return ErrFailed
	}
	if err != nil || ctx.Err() != nil {
		return err // a domain whose backup failed is not pruned
	}
	return r.prune(ctx, name)
}

func running(s virt.State) bool { return s == virt.StateRunning || s == virt.StateBlocked }

// lockFailed reports a lock that could not be taken, with the old messages:
// with -C both phases are skipped, and the old tool said so for each.
func (r *Runner) lockFailed(name string, selected virt.State, err error) {
	var phases []string
	switch {
	case !running(selected) || r.cfg.Snapshot && !r.cfg.Consolidate:
		phases = []string{"backup"}
	case !r.cfg.Snapshot:
		phases = []string{"consolidation"}
	default:
		phases = []string{"backup", "consolidation"}
	}
	for _, what := range phases {
		if errors.Is(err, lock.ErrLocked) {
			r.p.Err("Another instance of %s is already running on '%s'! Skipping %s of '%s'", r.prog, name, what, name)
		} else {
			r.p.Err("Cannot lock domain '%s': %v. Skipping %s of '%s'", name, err, what, name)
		}
	}
}

// stateWord is how the offline messages name a domain's state ("shut-off"
// is the old tool's word).
func stateWord(st virt.State) string {
	if st == virt.StateShutoff {
		return "shut-off"
	}
	return st.String()
}

func (r *Runner) needsBackupDir(name string, st virt.State) {
	r.p.Err("-b flag (directory) required for backing up the %s domain '%s'", stateWord(st), name)
	r.p.Err("Skipping backup of '%s'", name)
}

// holder tells the backup directory which domain uses a file: the other
// domains' chains (read only when needed) and this domain's own files.
func (r *Runner) holder(ctx context.Context, name string, files []string) func() backupdir.Holder {
	return func() backupdir.Holder {
		u := r.chains.Others(ctx, name, false)
		u.Add(name, files...)
		return u
	}
}

// summarize records, at the end of a domain's turn, what the fleet watches:
// the length of each disk's chain on the host (overlays piling up) and the
// restore points in the backup directory.
func (r *Runner) summarize(ctx context.Context, dom virt.Domain) {
	if r.rep == nil {
		return
	}
	ctx = context.WithoutCancel(ctx) // also after a signal: the report says where things stand
	if disks, err := dom.Disks(); err == nil {
		for _, d := range virt.FileDisks(disks) {
			n := 0
			if d.Complete {
				n = len(d.Chain)
			} else if c, err := r.chains.OfFile(ctx, d.Source); err == nil {
				n = len(c)
			}
			r.rep.Disk(d.Target, d.Source)
			r.note(func(rd *report.Domain) {
				for _, k := range rd.Disks {
					if k.Target == d.Target {
						k.HostChainLength = n
					}
				}
			})
		}
	}
	if r.dir != nil && r.dir.Exists() {
		n := len(r.dir.Points([]string{dom.Name()}, r.owner(ctx), nil))
		r.note(func(rd *report.Domain) { rd.RestorePoints = n })
	}
}
