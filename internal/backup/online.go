package backup

import (
	"context"
	"time"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/report"
	"github.com/fi-backup/fi-backup/internal/snapshot"
	"github.com/fi-backup/fi-backup/internal/statedump"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// online backs up (and/or consolidates) one running domain.
func (r *Runner) online(ctx context.Context, dom virt.Domain) error {
	if r.cfg.Snapshot {
		if err := r.snapshotAndCopy(ctx, dom); err != nil {
			return err // B9: no consolidation after a failed snapshot or copy
		}
	}
	if !r.cfg.Consolidate {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	// Read the other domains' chains before any job: a commit must not
	// write into a file they use, and no file they use may be deleted.
	return r.consolidated(func() error {
		return r.jobs.Domain(ctx, dom, r.chains.Others(ctx, dom.Name(), true))
	}, false)
}

// consolidated runs a consolidation and records it in the report.
func (r *Runner) consolidated(run func() error, offline bool) error {
	r.act(report.ActionConsolidate)
	start := time.Now()
	err := run()
	r.note(func(d *report.Domain) {
		d.Consolidation = &report.Consolidation{Method: string(r.cfg.Method), Offline: offline, Seconds: time.Since(start).Seconds(), OK: err == nil}
	})
	if err != nil {
		return ErrFailed
	}
	return nil
}

// snapshotAndCopy takes the snapshot (with the -s dump in the same pause)
// and copies the chain that became read-only.
func (r *Runner) snapshotAndCopy(ctx context.Context, dom virt.Domain) error {
	name := dom.Name()
	ts := r.now()
	snap := snapshot.Name(ts)
	r.p.Debug("Snapshot for domain '%s' requested", name)
	r.p.Debug("Using timestamp '%s'", ts.Format(snapshot.TimestampLayout))
	if r.dir != nil {
		// Everything about the copy that can be known before the snapshot
		// is checked before it: a refused run neither pauses the guest nor
		// adds an overlay to the domain.
		if err := r.dir.CheckUsable(); err != nil {
			r.p.Err("Backup directory '%s' is not usable: %v", r.dir.Path, err)
			return ErrFailed
		}
		disks, err := snapshot.Plan(r.p, dom)
		if err != nil {
			return ErrFailed
		}
		var files []string
		for _, d := range disks {
			files = append(files, virt.Paths(d.Chain)...)
		}
		if err := r.dir.Admit(name, files, r.holder(ctx, name, files)); err != nil {
			return ErrFailed
		}
	}
	// -s (§6, B20): the dump leaves the guest paused; the disk snapshot is
	// taken in that pause so RAM and disks show the same instant, and the
	// guest is resumed right after it, before any copying. The deferred
	// Close resumes and discards on any path that did not finish the dump.
	// Nothing is written to stdout from the start of the dump until the
	// guest runs again: a slow or closed reader must never hold a guest
	// paused (the lines are printed, in order, right after the resume).
	var dump *statedump.Dump
	release := func() {}
	if r.cfg.DumpDir != "" {
		release = r.p.Hold()
		defer release()
		var err error
		dump, err = r.startDump(ctx, dom, ts)
		if err != nil {
			return err
		}
		defer r.clearJournal(name) // runs after Close has resumed the guest
		defer dump.Close()
	}
	r.p.Debug("Snapshotting block devices for '%s' using suffix '%s'", name, snap)
	r.act(report.ActionSnapshot)
	if r.cfg.Quiesce {
		r.act(report.ActionQuiesce)
	}
	if err := snapshot.Take(r.p, dom, snap, r.cfg.Quiesce); err != nil {
		if dump != nil {
			// No disk snapshot matches the dumped RAM: drop it.
			_ = r.finishDump(dump, false)
		}
		return ErrFailed
	}
	r.note(func(d *report.Domain) { d.Snapshot, d.Quiesced = snap, r.cfg.Quiesce })
	failed := dump != nil && r.finishDump(dump, true) != nil
	if dump != nil {
		r.note(func(d *report.Domain) {
			d.Dump = &report.Dump{File: dump.Path(), PauseSeconds: dump.Pause().Seconds()}
		})
	}
	release()
	if r.dir == nil {
		r.p.Debug("No backup directory specified")
		if failed {
			return ErrFailed
		}
		return nil
	}
	all, disks, err := r.copyOnline(ctx, dom)
	if err != nil || failed {
		return ErrFailed
	}
	state := ""
	if dump != nil {
		state = dump.Path()
	}
	return r.record(ctx, dom, ts, backupdir.MethodSnapshot, all, disks, state)
}

// copyOnline copies, disk by disk, every file of the chain below the new
// overlay (read-only from now on, so no pause is needed). It returns the
// domain's disks and what each snapshotted disk's copy left.
func (r *Runner) copyOnline(ctx context.Context, dom virt.Domain) ([]virt.Disk, []copied, error) {
	if !r.dir.Exists() {
		// The old tool's message when the directory vanished meanwhile.
		r.p.Err("Backup directory '%s' doesn't exist", r.dir.Path)
		return nil, nil, ErrFailed
	}
	all, err := dom.Disks()
	if err != nil {
		r.p.Err("Cannot read the disks of '%s': %s", dom.Name(), virt.Describe(err))
		return nil, nil, ErrFailed
	}
	var out []copied
	failed := false
	for _, d := range virt.FileDisks(all) {
		r.p.Debug("Getting all backing files for: '%s'", d.Source)
		if err := snapshot.Complete(d); err != nil {
			r.p.Err("Cannot back up disk '%s' of '%s': %v", d.Target, dom.Name(), err)
			failed = true
			continue
		}
		r.p.ChainWalk(virt.Paths(d.Chain))
		r.act(report.ActionCopy)
		r.chainsCopied(d.Target, d.Source, d.Chain[1:])
		files, err := r.dir.CopyChain(ctx, dom.Name(), d.Chain[1:], false)
		if err != nil {
			failed = true
			if ctx.Err() != nil {
				break
			}
			continue
		}
		// A disk left out of the snapshot (snapshot='no', read-only) keeps
		// its active image: what was copied is not a restore point of it.
		if len(files) > 0 && d.Snapshot != "no" && !d.ReadOnly {
			out = append(out, copied{disk: d, top: d.Chain[1], chain: d.Chain[1:], files: files})
		}
	}
	if failed {
		return nil, nil, ErrFailed
	}
	return all, out, nil
}
