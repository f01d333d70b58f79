package backup

import (
	"context"
	"errors"

	"github.com/fi-backup/fi-backup/internal/blockjob"
	"github.com/fi-backup/fi-backup/internal/cbt"
	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/lock"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// Journal kind of a -s state dump in progress (its guest may be paused).
const kindDump = "dump"

// RecoverAll resumes, before the domains of this run are listed, every
// guest a killed -s run left paused (so that -r and all see it running
// again), and drops the journals of domains that no longer exist. Other
// journals (block jobs, offline merges, --cbt jobs) are left to the
// domain's own next turn, whose failures count in its exit code: a run for
// other domains neither acts on them nor prints an [ERR] it would not
// count. A domain whose lock another run holds is left to that run.
func (r *Runner) RecoverAll(ctx context.Context) error {
	var failed error
	for _, name := range r.journal.Domains() {
		if ctx.Err() != nil {
			return failed
		}
		l, err := lock.TryLock(r.lockDir, name)
		if err != nil {
			continue // in use by a live run, or not ours to lock
		}
		dom, err := r.hyp.Lookup(name)
		switch {
		case errors.Is(err, virt.ErrNoDomain):
			r.p.Debug("Removing the journal of '%s': the domain no longer exists", name)
			r.clearJournal(name)
		case err == nil:
			if rec, rerr := r.journal.Read(name); rerr == nil && rec != nil && rec.Kind == kindDump {
				if err := r.recover(dom); err != nil {
					failed = err // a guest perhaps still paused: the run fails
				}
			}
			_ = dom.Close()
		}
		_ = l.Unlock()
	}
	return failed
}

// recover finishes what an interrupted run left on dom (its journal): a
// block job it started is aborted (blockjob.Recover); the migration of its
// state dump is cancelled and the guest it paused resumed; a --cbt push
// backup is aborted and its checkpoint and files deleted (cbt.Recover).
// Called with the domain's lock held.
func (r *Runner) recover(dom virt.Domain) error {
	name := dom.Name()
	rec, err := r.journal.Read(name)
	switch {
	case errors.Is(err, journal.ErrUntrusted):
		r.p.Warn("Ignoring the journal of '%s': %v. Not acting on it (remove it if it is not yours)", name, err)
		return nil
	case err != nil:
		r.p.Err("Cannot read the journal of '%s': %v", name, err)
		return ErrFailed
	case rec == nil:
		return nil
	}
	st, err := dom.State()
	if err != nil {
		r.p.Err("Cannot read the state of '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	if blockjob.IsOffline(rec.Kind) {
		ctx := context.Background()
		return r.jobs.RecoverOffline(ctx, dom, rec, r.chains.OfFile, r.chains.Others(ctx, name, false))
	}
	if rec.Kind == cbt.Kind {
		// Also for a domain that no longer runs: its files go.
		return r.recoverCBT(dom, rec)
	}
	if !running(st) && st != virt.StatePaused {
		r.clearJournal(name) // no QEMU: no job, no migration
		return nil
	}
	if rec.Kind != kindDump {
		if err := r.jobs.Recover(dom, rec); err != nil {
			return ErrFailed
		}
		return nil
	}
	// QEMU restarts the guest itself when a migration fails; one that was
	// held paused (or completed into the dead process's pipe) stays paused
	// until someone resumes it.
	_, _ = dom.QMP(`{"execute":"migrate_cancel"}`)
	if st == virt.StatePaused {
		if err := dom.Resume(); err != nil && !errors.Is(err, virt.ErrNotRunning) {
			r.p.Err("Problem resuming domain '%s': %s", name, virt.Describe(err))
			return ErrFailed
		}
		r.p.Warn("Resumed domain '%s', left paused by an interrupted fi-backup -s run (pid %d)", name, rec.PID)
	}
	r.clearJournal(name)
	return nil
}

func (r *Runner) clearJournal(dom string) {
	if err := r.journal.Clear(dom); err != nil {
		r.p.Warn("Could not remove the journal '%s': %v; the next run will find it and check the domain again", r.journal.Path(dom), err)
	}
}
