package backup

import (
	"context"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/fi-backup/fi-backup/internal/report"
)

// prune applies --keep to a domain whose backup (and consolidation) just
// succeeded, under its lock: the oldest restore points are merged away so
// that Keep remain.
func (r *Runner) prune(ctx context.Context, name string) error {
	if r.cfg.Keep < 1 || r.dir == nil {
		return nil
	}
	r.act(report.ActionPrune)
	gone, freed, err := r.dir.Prune(ctx, name, r.cfg.Keep, r.owner(ctx))
	r.note(func(d *report.Domain) { d.Pruned, d.FreedBytes = gone, freed })
	if err != nil {
		r.p.Err("Cannot prune the restore points of '%s' in '%s': %v", name, r.dir.Path, err)
		return ErrFailed
	}
	if freed > 0 {
		r.p.Verb("Pruning the restore points of '%s' freed %s in '%s'", name, humanBytes(freed), r.dir.Path)
	}
	return nil
}

// HasPoints reports whether the backup directory holds restore points of
// a domain (by its manifests: a domain that no longer exists cannot own
// the old tool's files).
func (r *Runner) HasPoints(name string) bool {
	return r.dir != nil && len(r.dir.Manifests(name, nil)) > 0
}

// PruneGone applies --keep to the restore points of a domain that no
// longer exists, named on the command line: the only way its points are
// ever pruned (all and -r never touch them).
func (r *Runner) PruneGone(ctx context.Context, name string) error {
	r.p.Warn("Domain '%s' does not exist: only pruning its restore points in '%s' (--keep=%d)", name, r.dir.Path, r.cfg.Keep)
	return r.withLock(name, "pruning", func() error { return r.prune(ctx, name) })
}

// killAt is the step hook of FI_BACKUP_TEST_KILL_AT=step[:n]: the process
// SIGKILLs itself after the n-th (default first) step of that name of a
// backup-directory change, so that tests can prove what a kill there
// leaves.
func killAt(spec string) func(string) error {
	step, nth := spec, 1
	if i := strings.LastIndexByte(spec, ':'); i > 0 {
		if n, err := strconv.Atoi(spec[i+1:]); err == nil && n > 0 {
			step, nth = spec[:i], n
		}
	}
	seen := 0
	return func(name string) error {
		if name != step {
			return nil
		}
		if seen++; seen == nth {
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // the signal is on its way
		}
		return nil
	}
}
