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
	"github.com/fi-backup/fi-backup/internal/qcow2"
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
	jobs    *blockjob.Consolidator
	cbt     *cbt.Runner
}

// New prepares a run.
func New(cfg Config, env Env) *Runner {
	tool := qcow2.Tool{Path: env.QemuImg}
	r := &Runner{
		cfg: cfg, p: env.P, hyp: env.Hyp, prog: env.Prog, now: env.Now, lockDir: env.LockDir, tool: env.Tool, images: tool,
		journal: journal.Store{Dir: env.LockDir},
		chains:  chains.Reader{P: env.P, Hyp: env.Hyp, Tool: tool},
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
	dom, err := r.hyp.Lookup(name)
	if err != nil {
		r.p.Err("Cannot find domain '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	defer dom.Close()
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
