package backup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/cbt"
	"github.com/fi-backup/fi-backup/internal/copyfile"
	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/report"
	"github.com/fi-backup/fi-backup/internal/snapshot"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// --cbt: a running domain is backed up through libvirt's backup API
// (package cbt) into the backup directory's plain qcow2 chains (package
// backupdir), one new file per disk and run:
//
//	run 1 at T1:  vm.cbt-T1                                 full, checkpoint fi-backup-<id>-T1
//	run 2 at T2:  vm.cbt-T1 ◄── vm.cbt-T2                   changes since T1, checkpoint T2 (T1 deleted)
//	run 3 at T3:  vm.cbt-T1 ◄── vm.cbt-T2 ◄── vm.cbt-T3     changes since T2, checkpoint T3 (T2 deleted)
//
// Restore point T is the file of the job started at T (with the chain
// below it). The run increments from the checkpoint of the directory's
// newest --cbt restore point only when the host still has it, its bitmap
// covers the disk and the chain it extends is intact; anything else is a
// full backup of that disk, never an increment that might miss data.

// cbtDisk is one disk's part in a --cbt run.
type cbtDisk struct {
	disk   virt.Disk
	name   string // the disk's own image name (what a restore calls it)
	bitmap bool   // qcow2: the checkpoint tracks it
	prev   []backupdir.File
	target backupdir.CBTTarget
	// changed is libvirt's estimate of the bytes an increment copies;
	// -1 when unknown.
	changed int64
}

// need is about what a disk's part writes into the backup directory: the
// changes since the checkpoint for an increment, the data of its whole
// chain for a full backup (never-written areas cost nothing).
func (d *cbtDisk) need() int64 {
	if len(d.prev) > 0 {
		return max(d.changed, 0)
	}
	files := virt.Paths(d.disk.Chain)
	if len(files) == 0 {
		files = []string{d.disk.Source}
	}
	var n int64
	for _, f := range files {
		n += backupdir.Allocated(f)
	}
	return n
}

// cbtOnline backs up one running domain with --cbt.
func (r *Runner) cbtOnline(ctx context.Context, dom virt.Domain) error {
	name := dom.Name()
	r.p.Debug("Backup of '%s' through changed-block tracking (--cbt) requested", name)
	if err := r.dir.CheckUsable(); err != nil {
		r.p.Err("Backup directory '%s' is not usable: %v", r.dir.Path, err)
		return ErrFailed
	}
	if err := r.dir.FinishPending(name); err != nil {
		r.p.Err("Cannot bring the manifests of '%s' up to date: %v", r.dir.Path, err)
		return ErrFailed
	}
	id, err := r.dir.ID()
	if err != nil {
		r.p.Err("Cannot read the id of the backup directory '%s': %v", r.dir.Path, err)
		return ErrFailed
	}
	all, err := dom.Disks()
	if err != nil {
		r.p.Err("Cannot read the disks of '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	disks, err := r.cbtPlan(dom, all)
	if err != nil {
		return err
	}
	forceFull := false
	for attempt := 0; ; attempt++ {
		err := r.cbtRun(ctx, dom, id, all, disks, forceFull)
		if !errors.Is(err, cbt.ErrInconsistent) || forceFull {
			return err
		}
		// QEMU stopped uncleanly since the last run: the bitmaps of every
		// checkpoint are missing or broken. Ours go; a full backup starts
		// the series again. Older restore points stay as they are.
		why := strings.TrimPrefix(err.Error(), cbt.ErrInconsistent.Error()+": ")
		r.p.Warn("The changed-block bitmaps of '%s' are inconsistent (QEMU stopped uncleanly since the last backup?): %s. Deleting its fi-backup checkpoints of '%s' and making a full backup", name, why, r.dir.Path)
		r.cbt.DeleteOurs(dom, id, "")
		forceFull = true
	}
}

// cbtPlan decides each disk's part: disks the snapshot method leaves out
// (not a disk, snapshot='no', read-only) stay out; a disk that is not a
// local file must say snapshot='no', as for a snapshot; a disk that is not
// qcow2 has no bitmap and is copied in full on every run.
func (r *Runner) cbtPlan(dom virt.Domain, all []virt.Disk) ([]*cbtDisk, error) {
	name := dom.Name()
	var out []*cbtDisk
	byName := map[string]string{}
	for _, d := range all {
		switch {
		case d.Device != "disk":
			r.p.Verb("Disk '%s' of '%s' is a %s: not backed up", d.Target, name, d.Device)
			continue
		case d.Snapshot == "no":
			r.p.Info("Disk '%s' of '%s' has snapshot='no': not backed up", d.Target, name)
			continue
		case d.ReadOnly:
			r.p.Info("Disk '%s' of '%s' is read-only: not backed up", d.Target, name)
			continue
		case d.Type != "file" || d.Source == "":
			r.p.Err("Backup for '%s' failed! Disk '%s' is not a local file (%s)", name, d.Target, d.Type)
			r.p.Err("Disks that are not local files (block devices, network disks) must carry snapshot='no' in the definition of '%s' to be left out of the backup", name)
			return nil, ErrFailed
		}
		cd := &cbtDisk{disk: d, bitmap: d.Format == "qcow2", name: filepath.Base(d.Source)}
		if len(d.Chain) > 0 && snapshot.Complete(d) == nil {
			cd.name = snapshot.DiskName(d.Chain)
		}
		if !cd.bitmap {
			r.p.Info("Disk '%s' of '%s' is %s: it has no changed-block bitmap and is backed up in full on every --cbt run", d.Target, name, d.Format)
		}
		stem := backupdir.CBTName(cd.name, "")
		if other, ok := byName[stem]; ok {
			r.p.Err("Backup for '%s' failed! Disks '%s' and '%s' would both be backed up as '%s<moment>': rename one of the images", name, other, d.Target, stem)
			return nil, ErrFailed
		}
		byName[stem] = d.Target
		out = append(out, cd)
	}
	if len(out) == 0 {
		r.p.Err("Backup for '%s' failed! It has no disk to back up", name)
		return nil, ErrFailed
	}
	return out, nil
}

// cbtRun is one attempt: decide full or incremental per disk, claim the
// names, journal, create the targets, run the job, give the files their
// names, record the restore point, delete the older checkpoints.
func (r *Runner) cbtRun(ctx context.Context, dom virt.Domain, id string, all []virt.Disk, disks []*cbtDisk, forceFull bool) error {
	name := dom.Name()
	base, err := r.cbtBase(dom, id, disks, forceFull)
	if err != nil {
		return err
	}
	for _, d := range disks {
		st, err := os.Stat(d.disk.Source)
		if err != nil {
			r.p.Err("Backup for '%s' failed! %v", name, err)
			return ErrFailed
		}
		_, size, err := qcow2.VirtualSize(d.disk.Source)
		if err != nil {
			r.p.Err("Backup for '%s' failed! Cannot read the size of '%s': %v", name, d.disk.Source, err)
			return ErrFailed
		}
		d.target = backupdir.CBTTarget{Size: size, Mode: copyfile.OnlineMode(st.Mode())}
		if len(d.prev) > 0 {
			d.target.Backing = d.prev[0].Name
		}
	}
	var need int64
	for _, d := range disks {
		need += d.need()
	}
	if err := r.dir.AdmitCBT(name, need); err != nil {
		return ErrFailed
	}
	at, err := r.cbtReserve(ctx, name, disks)
	if err != nil {
		return err
	}
	moment := at.Format(snapshot.TimestampLayout)
	checkpoint := cbt.CheckpointName(id, moment)
	r.p.Debug("Using timestamp '%s'", moment)
	spec := virt.BackupSpec{Checkpoint: checkpoint}
	var files []string
	for _, d := range disks {
		files = append(files, r.dir.Temp(d.target), r.dir.Final(d.target))
	}
	rec := cbt.Record(name, checkpoint, r.dir.Path, moment, files, r.cfg.Quiesce)
	if err := r.cbt.Begin(rec); err != nil {
		for _, d := range disks {
			_ = os.Remove(r.dir.Temp(d.target))
		}
		r.p.Err("Backup for '%s' failed! %v", name, err)
		return ErrFailed
	}
	byTarget := map[string]*cbtDisk{}
	for _, d := range disks {
		byTarget[d.disk.Target] = d
		if err := r.dir.CreateCBT(d.target); err != nil {
			r.cbt.Cleanup(dom, rec)
			r.p.Err("Backup for '%s' failed! Cannot create '%s': %v", name, r.dir.Temp(d.target), err)
			return ErrFailed
		}
	}
	for _, d := range all {
		bd := virt.BackupDisk{Target: d.Target}
		if c := byTarget[d.Target]; c != nil {
			bd.Path, bd.Bitmap = r.dir.Temp(c.target), c.bitmap
			if len(c.prev) > 0 {
				bd.Incremental = base
				r.p.Verb("Disk '%s' of '%s': changes since checkpoint '%s' into '%s' (on '%s')", d.Target, name, base, c.target.Name, c.target.Backing)
			} else {
				r.p.Verb("Disk '%s' of '%s': full backup into '%s'", d.Target, name, c.target.Name)
			}
		}
		spec.Disks = append(spec.Disks, bd)
	}
	q := ""
	if r.cfg.Quiesce {
		q = " with its file systems frozen (-q)"
	}
	r.p.Verb("Starting the backup of '%s'%s, with checkpoint '%s'", name, q, checkpoint)
	r.act(report.ActionCBT)
	if r.cfg.Quiesce {
		r.act(report.ActionQuiesce)
	}
	job := &report.CBT{Checkpoint: checkpoint, Incremental: base}
	r.note(func(rd *report.Domain) { rd.CBT, rd.Quiesced = job, r.cfg.Quiesce })
	start := time.Now()
	err = r.cbt.Run(ctx, dom, spec, rec, r.cfg.Quiesce)
	r.note(func(*report.Domain) { job.Seconds, job.OK = time.Since(start).Seconds(), err == nil })
	if err != nil {
		if errors.Is(err, cbt.ErrInconsistent) && base != "" {
			return err // the caller starts over with a full backup
		}
		r.p.Err("Backup for '%s' failed! %s", name, virt.Describe(err))
		if errors.Is(err, virt.ErrAgent) || errors.Is(err, cbt.ErrFreeze) {
			r.p.Err("-q needs qemu-guest-agent running in '%s' and its channel in the definition", name)
		}
		return ErrFailed
	}
	var points []copied
	var bytes int64
	for _, d := range disks {
		f, err := r.dir.FinishCBT(ctx, d.target, time.Minute)
		if err != nil {
			r.cbt.Cleanup(dom, rec)
			r.p.Err("Backup for '%s' failed! Cannot finish '%s': %v", name, r.dir.Final(d.target), err)
			return ErrFailed
		}
		bytes += f.Size
		points = append(points, cbtCopied(d, f))
		if r.rep != nil {
			why := "full backup"
			if len(d.prev) > 0 {
				why = "changes since checkpoint " + base
			}
			r.rep.AddFile(d.disk.Target, d.disk.Source, report.File{Source: d.disk.Source, Dest: r.dir.Final(d.target), Copied: true, Reason: why,
				Bytes: backupdir.Allocated(r.dir.Final(d.target)), Seconds: time.Since(start).Seconds()})
		}
	}
	r.p.Verb("Backup of block devices of '%s' successful: %s written in %.3fs", name, humanBytes(bytes), time.Since(start).Seconds())
	if err := ctx.Err(); err != nil {
		// Stopped while the files were finished: a stopped run makes no
		// restore point, this one's checkpoint and files go.
		r.cbt.Cleanup(dom, rec)
		r.p.Err("Backup for '%s' failed! Interrupted before its restore point was recorded", name)
		return ErrFailed
	}
	if err := r.record(ctx, dom, at, backupdir.MethodCBT, all, points, ""); err != nil {
		r.cbt.Cleanup(dom, rec)
		return err
	}
	r.step("cbt-recorded")
	r.cbt.Done(name)
	// Only now, with the new restore point recorded, may the checkpoint
	// of the previous one go.
	r.cbt.DeleteOurs(dom, id, checkpoint)
	return nil
}

// cbtCopied is what the manifest records of a disk: its new file on the
// chain it extends; the host file is the disk's active image, the restore
// name its own image's.
func cbtCopied(d *cbtDisk, f backupdir.File) copied {
	files := []backupdir.File{f}
	for _, p := range d.prev {
		p.Copied = false // made by an earlier run
		files = append(files, p)
	}
	return copied{disk: d.disk, top: virt.Image{Path: d.disk.Source, Format: d.disk.Format},
		chain: []virt.Image{{Path: d.name}}, files: files}
}

// cbtBase decides which disks get an increment: it returns the checkpoint
// they increment from ("" when every disk gets a full backup) and sets
// each such disk's previous chain. It says why with a [WAR] wherever a
// directory that has --cbt restore points gets a full backup.
func (r *Runner) cbtBase(dom virt.Domain, id string, disks []*cbtDisk, forceFull bool) (string, error) {
	name := dom.Name()
	for _, d := range disks {
		d.prev = nil
	}
	cps, err := dom.Checkpoints()
	if err != nil {
		r.p.Err("Backup for '%s' failed! Cannot list its checkpoints: %s", name, virt.Describe(err))
		return "", ErrFailed
	}
	ours := cbt.Ours(id, cps)
	last := r.dir.LatestCBT(name)
	switch {
	case forceFull:
		return "", nil
	case last == nil && len(ours) == 0:
		r.p.Info("No --cbt restore point of '%s' in '%s' yet: full backup", name, r.dir.Path)
		return "", nil
	case last == nil:
		r.p.Warn("'%s' has the checkpoint '%s' of '%s', which holds no --cbt restore point of it (a rotated or restored directory?): full backup", name, ours[len(ours)-1].Name, r.dir.Path)
		return "", nil
	}
	want := cbt.CheckpointName(id, last.Moment)
	// Only the base's sizes are asked for: each costs QEMU a bitmap merge.
	base, err := dom.Checkpoint(want)
	switch {
	case err != nil && !errors.Is(err, virt.ErrNoCheckpoint):
		r.p.Err("Backup for '%s' failed! Cannot read its checkpoint '%s': %s", name, want, virt.Describe(err))
		return "", ErrFailed
	case err != nil:
		r.p.Warn("The checkpoint '%s' of the newest --cbt restore point %s of '%s' is not on the host (the domain was redefined, or the checkpoint deleted): full backup", want, last.Moment, name)
		return "", nil
	}
	prev := map[string]backupdir.Disk{}
	for _, d := range last.Disks {
		prev[d.Target] = d
	}
	incremental := false
	for _, d := range disks {
		if !d.bitmap {
			continue
		}
		p, ok := prev[d.disk.Target]
		why := ""
		switch {
		case !ok || !p.BackedUp || len(p.Chain) == 0:
			why = "it is not in the restore point " + last.Moment
		case !backupdir.IsCBT(p.Chain[0].Name):
			why = "the restore point " + last.Moment + " holds no --cbt file of it"
		case p.Name != d.name:
			why = fmt.Sprintf("its image is '%s' now, '%s' at %s", d.name, p.Name, last.Moment)
		case !base.Tracks(d.disk.Target):
			why = "the checkpoint '" + want + "' has no bitmap of it"
		default:
			why = r.dir.ChainIntact(p.Chain)
		}
		if why != "" {
			r.p.Warn("Disk '%s' of '%s' gets a full backup: %s", d.disk.Target, name, why)
			continue
		}
		d.prev, incremental = p.Chain, true
		d.changed = -1
		if n, ok := base.Changed[d.disk.Target]; ok {
			d.changed = int64(n)
		}
	}
	if !incremental {
		return "", nil
	}
	return want, nil
}

// cbtReserve picks the run's moment: now, or the next free second when a
// name of that moment is taken (a restore point of the same second, or a
// disk of another domain with the same image name backed up into the same
// directory in the same second). The job starts after the moment.
func (r *Runner) cbtReserve(ctx context.Context, name string, disks []*cbtDisk) (time.Time, error) {
	for attempt := 0; attempt < 10; attempt++ {
		at := r.now().Truncate(time.Second)
		moment := at.Format(snapshot.TimestampLayout)
		ts := make([]backupdir.CBTTarget, len(disks))
		for i, d := range disks {
			d.target.Name = backupdir.CBTName(d.name, moment)
			ts[i] = d.target
		}
		ok, err := r.dir.ReserveCBT(name, moment, ts)
		if err != nil {
			r.p.Err("Backup for '%s' failed! Cannot create files in '%s': %v", name, r.dir.Path, err)
			return time.Time{}, ErrFailed
		}
		if ok {
			return at, nil
		}
		r.p.Debug("The names of moment %s are taken in '%s': waiting for the next second", moment, r.dir.Path)
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(time.Until(at.Add(time.Second))):
		}
	}
	r.p.Err("Backup for '%s' failed! No free moment for its files in '%s'", name, r.dir.Path)
	return time.Time{}, ErrFailed
}

// recoverCBT finishes a --cbt backup a killed run left (see cbt.Recover):
// whether its restore point was recorded is told by its manifest, in the
// directory the journal names.
func (r *Runner) recoverCBT(dom virt.Domain, rec *journal.Record) error {
	recorded := false
	if rec.Dir != "" && rec.Moment != "" {
		d := &backupdir.Dir{Path: rec.Dir}
		_, err := os.Stat(d.MetaPath(dom.Name(), rec.Moment, ".json"))
		recorded = err == nil
	}
	for _, f := range rec.Files {
		// Only files of the journal's own kind are ever deleted: a record
		// that names anything else was not written by this tool.
		base := filepath.Base(f)
		if !backupdir.IsCBT(strings.TrimSuffix(strings.TrimPrefix(base, "."), ".fi-backup-cbt")) {
			r.p.Warn("Ignoring the journal of '%s': it names '%s', which is no --cbt backup file. Not acting on it (remove it if it is not yours)", dom.Name(), f)
			return nil
		}
	}
	if err := r.cbt.Recover(dom, rec, recorded); err != nil {
		return ErrFailed
	}
	return nil
}

// step calls the test kill hook (FI_BACKUP_TEST_KILL_AT), if any.
func (r *Runner) step(name string) {
	if r.dir != nil && r.dir.StepHook != nil {
		_ = r.dir.StepHook(name)
	}
}
