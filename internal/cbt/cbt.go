// Package cbt runs the push backups of --cbt: libvirt's backup API with a
// checkpoint (a persistent dirty bitmap per disk, in the disk's active
// qcow2 image) created atomically with each backup, so that the next run
// copies only the clusters written since. The host's disk chain never
// changes: no overlay, nothing to consolidate.
//
//	run 1:  full backup            + checkpoint fi-backup-<dir id>-T1
//	run 2:  changes since T1       + checkpoint fi-backup-<dir id>-T2, then T1 deleted
//	run 3:  changes since T2       + checkpoint fi-backup-<dir id>-T3, then T2 deleted
//
// The targets are qcow2 files the caller created (REUSE_EXTERNAL), each
// increment with a relative backing reference to the previous backup file
// (package backupdir), so the backup directory holds plain qcow2 chains.
//
// The traps of libvirt's backup API, and what is done about each:
//   - a failed or aborted job still creates its checkpoint: it is deleted,
//     with the partial target, so no increment is ever based on it;
//   - an abort races with the job's end: the outcome is taken from the
//     job-completed event (registered before the job starts), never from
//     the abort call;
//   - after an unclean QEMU exit the bitmaps are broken or gone: libvirt
//     refuses the incremental start (ErrInconsistent), the caller deletes
//     its checkpoints and makes a full backup;
//   - the job outlives a killed process: it is journaled before anything is
//     created; the next run aborts it if it still runs and deletes its
//     checkpoint and files (Recover).
//
// Checkpoints are named fi-backup-<id of the backup directory>-<moment>;
// only those of the caller's directory are ever deleted.
package cbt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// Kind is the journal kind of a push backup in flight.
const Kind = "cbt"

// Domain is what a push backup needs of a domain; virt.Domain has it.
type Domain interface {
	Name() string
	State() (virt.State, error)
	Checkpoints() ([]virt.Checkpoint, error)
	DeleteCheckpoint(name string, metadataOnly bool) error
	WatchBackup() (events <-chan virt.BackupEvent, stop func(), err error)
	BeginBackup(spec virt.BackupSpec) error
	BackupJob() (virt.BackupJob, error)
	LastJobEnd() (virt.BackupEnd, bool, error)
	AbortBackup() error
	SetBackupSpeed(target string, bandwidth uint64) error
	FSFreeze() error
	FSThaw() error
}

var (
	// ErrInconsistent: the incremental start was refused because a
	// checkpoint's bitmap is missing or broken; nothing was created.
	ErrInconsistent = errors.New("checkpoint bitmaps inconsistent")
	// ErrTimeout: the job did not end within the timeout and was aborted.
	ErrTimeout = errors.New("backup job timed out")
	// ErrFreeze: the guest's file systems could not be frozen (-q).
	ErrFreeze = errors.New("cannot freeze the guest's file systems")
	// ErrStillRunning: the job could not be stopped; its journal stays
	// for the next run.
	ErrStillRunning = errors.New("backup job still running")
)

const prefix = "fi-backup-"

var momentRE = regexp.MustCompile(`^[0-9]{8}-[0-9]{6}$`)

// CheckpointName is the checkpoint of the backup directory dirID's restore
// point at moment.
func CheckpointName(dirID, moment string) string { return prefix + dirID + "-" + moment }

// Ours lists the checkpoints of backup directory dirID among cps, oldest
// first (by moment).
func Ours(dirID string, cps []virt.Checkpoint) []virt.Checkpoint {
	var out []virt.Checkpoint
	for _, c := range cps {
		if m, ok := strings.CutPrefix(c.Name, prefix+dirID+"-"); ok && momentRE.MatchString(m) {
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Runner runs push backups with one set of limits.
type Runner struct {
	P         *logging.Printer
	Journal   journal.Store
	Timeout   time.Duration // per job; 30 minutes when 0
	Bandwidth uint64        // bytes/s per disk's job; 0: unlimited
	PollEvery time.Duration // safety-net poll; 200 ms when 0
	// EventGrace is how long the completion event of a job libvirt no
	// longer lists is waited for; 5 s when 0.
	EventGrace time.Duration
	// Step, when set, is called after each step of a job with its name
	// (FI_BACKUP_TEST_KILL_AT). Tests only.
	Step func(step string) error
}

func (r *Runner) pollEvery() time.Duration {
	if r.PollEvery > 0 {
		return r.PollEvery
	}
	return 200 * time.Millisecond
}

func (r *Runner) timeout() time.Duration {
	if r.Timeout > 0 {
		return r.Timeout
	}
	return 30 * time.Minute
}

func (r *Runner) step(name string) {
	if r.Step != nil {
		_ = r.Step(name)
	}
}

// abortWait bounds the wait for an aborted job's end.
const abortWait = 30 * time.Second

func (r *Runner) eventGrace() time.Duration {
	if r.EventGrace > 0 {
		return r.EventGrace
	}
	return 5 * time.Second
}

// Record is the journal record of a push backup: written (Begin) before
// any of its files is created, removed (Done) once its restore point is
// recorded, or by the cleanup of a failed job.
func Record(domain, checkpoint, dir, moment string, files []string, quiesce bool) journal.Record {
	return journal.Record{Domain: domain, Kind: Kind, Checkpoint: checkpoint, Files: files, Dir: dir, Moment: moment, Quiesce: quiesce}
}

// Begin journals a push backup before anything of it exists.
func (r *Runner) Begin(rec journal.Record) error {
	if err := r.Journal.Write(rec); err != nil {
		return fmt.Errorf("write the journal: %w", err)
	}
	return nil
}

// Done removes the journal of a push backup whose restore point is
// recorded.
func (r *Runner) Done(dom string) { r.clearJournal(dom) }

func (r *Runner) clearJournal(dom string) {
	if err := r.Journal.Clear(dom); err != nil {
		r.P.Warn("Could not remove the journal '%s': %v; the next run will find it and check the domain again", r.Journal.Path(dom), err)
	}
}

// Run starts the push backup spec (its targets created, its journal rec
// written) and waits for its end. With quiesce the guest's file systems are
// frozen around the start: the backup's moment is the job's start. nil
// means the job-completed event reported success: the targets hold the
// backup, the checkpoint exists, and the journal stays until Done. On any
// failure the job is stopped, its checkpoint and files deleted and the
// journal removed (except ErrStillRunning: a job that cannot be stopped
// keeps its journal for the next run); the error says why.
func (r *Runner) Run(ctx context.Context, dom Domain, spec virt.BackupSpec, rec journal.Record, quiesce bool) error {
	events, stop, err := dom.WatchBackup()
	if err != nil {
		r.Cleanup(dom, rec)
		return err
	}
	defer stop()
	if quiesce {
		r.P.Debug("Quiesce requested")
		if err := dom.FSFreeze(); err != nil {
			r.thaw(dom) // a freeze that failed half way
			r.Cleanup(dom, rec)
			return fmt.Errorf("%w: %s", ErrFreeze, virt.Describe(err))
		}
	}
	// libvirt's record of the last finished job, to tell ours from it if
	// ours ends without its event.
	prevEnd, hadEnd, _ := dom.LastJobEnd()
	start := time.Now()
	err = dom.BeginBackup(spec)
	var thawErr error
	if quiesce {
		thawErr = r.thaw(dom)
		r.P.Debug("Guest file systems of '%s' frozen for %.3fs", dom.Name(), time.Since(start).Seconds())
	}
	if err != nil {
		// The call may have failed after the job started (a connection
		// lost mid-call): then it is ours to stop.
		if j, jerr := dom.BackupJob(); jerr == nil && sameTargets(j, spec) {
			if _, over := r.abort(dom, events, spec, false); !over {
				return ErrStillRunning
			}
		}
		r.Cleanup(dom, rec)
		if errors.Is(err, virt.ErrCheckpointInconsistent) {
			return fmt.Errorf("%w: %s", ErrInconsistent, virt.Describe(err))
		}
		return err
	}
	r.step("cbt-begun")
	if r.Bandwidth > 0 {
		for _, d := range spec.Disks {
			if d.Path == "" {
				continue
			}
			// A job that already ended refuses a speed: nothing to limit.
			if err := dom.SetBackupSpeed(d.Target, r.Bandwidth); err != nil {
				r.P.Debug("Could not limit the backup job of disk '%s' of '%s': %s", d.Target, dom.Name(), virt.Describe(err))
			}
		}
	}
	ok, over, err := r.wait(ctx, dom, events, spec, func() (bool, error) { return r.endWithoutEvent(dom, prevEnd, hadEnd) })
	if !ok {
		if !over {
			r.P.Err("The backup job of '%s' is still running: the next run aborts it and deletes its checkpoint '%s' (journal '%s')", dom.Name(), spec.Checkpoint, r.Journal.Path(dom.Name()))
			return ErrStillRunning
		}
		r.Cleanup(dom, rec)
		return err
	}
	r.step("cbt-done")
	if thawErr != nil {
		return thawErr
	}
	return nil
}

// thaw thaws the guest's file systems, a few times if need be: a guest
// left frozen stops writing.
func (r *Runner) thaw(dom Domain) error {
	var err error
	for i := 0; i < 3; i++ {
		if err = dom.FSThaw(); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	r.P.Err("Cannot thaw the file systems of '%s': %s. Thaw them with: virsh domfsthaw %s", dom.Name(), virt.Describe(err), dom.Name())
	return fmt.Errorf("thaw: %s", virt.Describe(err))
}

// wait waits for the job's end: ok when its completion event reported
// success; over when libvirt no longer runs it (finished, failed, or
// aborted by us).
func (r *Runner) wait(ctx context.Context, dom Domain, events <-chan virt.BackupEvent, spec virt.BackupSpec, noEvent func() (bool, error)) (ok, over bool, err error) {
	deadline := time.NewTimer(r.timeout())
	defer deadline.Stop()
	tick := time.NewTicker(r.pollEvery())
	defer tick.Stop()
	var gone time.Time
	for {
		select {
		case <-ctx.Done():
			_, over := r.abort(dom, events, spec, false)
			return false, over, errors.New("interrupted: backup job aborted")
		case <-deadline.C:
			// The abort may lose the race with the job's end: the event
			// decides.
			ok, over := r.abort(dom, events, spec, true)
			if ok {
				r.P.Warn("The backup job of '%s' finished as it was aborted after %s (--job_timeout): keeping it", dom.Name(), r.timeout())
				return true, true, nil
			}
			return false, over, fmt.Errorf("%w: not finished after %s (--job_timeout); job aborted", ErrTimeout, r.timeout())
		case ev := <-events:
			if ev.Success {
				return true, true, nil
			}
			return false, true, jobFailed(ev)
		case <-tick.C:
			j, err := dom.BackupJob()
			switch {
			case errors.Is(err, virt.ErrNotRunning):
				return false, true, errors.New("the domain stopped during the backup job")
			case err != nil:
				continue // libvirt busy: the event or the next poll tells
			case sameTargets(j, spec):
				gone = time.Time{}
			case gone.IsZero():
				gone = time.Now() // the event is on its way
			case time.Since(gone) > r.eventGrace():
				ok, err := noEvent()
				return ok, true, err
			}
		}
	}
}

// endWithoutEvent decides the outcome of a job that libvirt no longer
// runs and whose job-completed event did not come (seen with jobs that end
// within their start call): from libvirt's record of the last finished
// job, and only when that record changed since before the start — else it
// is an older job's, and the job counts as failed.
func (r *Runner) endWithoutEvent(dom Domain, prev virt.BackupEnd, hadPrev bool) (bool, error) {
	end, ok, err := dom.LastJobEnd()
	switch {
	case err != nil:
		return false, fmt.Errorf("the backup job ended without a completion event, and its end cannot be read: %s", virt.Describe(err))
	case !ok || !end.Backup || hadPrev && end == prev:
		return false, errors.New("the backup job ended without a completion event or a record of its end")
	case !end.Success:
		return false, jobFailed(virt.BackupEvent{Error: end.Error})
	}
	r.P.Debug("The backup job of '%s' ended without a completion event; libvirt's record of its end says it succeeded", dom.Name())
	return true, nil
}

func jobFailed(ev virt.BackupEvent) error {
	msg := ev.Error
	if msg == "" {
		msg = "no reason given"
	}
	err := fmt.Errorf("the backup job failed: %s", msg)
	if strings.Contains(msg, "inconsistent") || strings.Contains(msg, "bitmap") {
		return fmt.Errorf("%w: %w", ErrInconsistent, err)
	}
	return err
}

// abort aborts the job and waits (bounded) for its end. ok reports that
// its completion event said success after all (only taken when
// acceptSuccess); over that libvirt no longer runs it.
func (r *Runner) abort(dom Domain, events <-chan virt.BackupEvent, spec virt.BackupSpec, acceptSuccess bool) (ok, over bool) {
	if err := dom.AbortBackup(); err != nil {
		// The job may just have ended: its event says how.
		r.P.Debug("Aborting the backup job of '%s': %s", dom.Name(), virt.Describe(err))
	}
	end := time.After(abortWait)
	tick := time.NewTicker(min(r.pollEvery(), 100*time.Millisecond))
	defer tick.Stop()
	var gone time.Time
	for {
		select {
		case ev := <-events:
			return ev.Success && acceptSuccess, true
		case <-tick.C:
			j, err := dom.BackupJob()
			switch {
			case errors.Is(err, virt.ErrNotRunning):
				return false, true
			case err != nil || sameTargets(j, spec):
				gone = time.Time{}
			case gone.IsZero():
				gone = time.Now()
			case time.Since(gone) > r.eventGrace():
				return false, true
			}
		case <-end:
			j, err := dom.BackupJob()
			return false, err == nil && !sameTargets(j, spec)
		}
	}
}

// sameTargets reports whether the running job j writes the targets of spec
// (it is the job this tool started).
func sameTargets(j virt.BackupJob, spec virt.BackupSpec) bool {
	if !j.Active {
		return false
	}
	for _, d := range spec.Disks {
		if d.Path != "" && slices.Contains(j.Targets, d.Path) {
			return true
		}
	}
	return false
}

// Cleanup undoes a push backup that will not become a restore point: its
// checkpoint is deleted (a failed or aborted job still made it), its files
// removed, its journal cleared. A checkpoint that cannot be deleted now
// (the domain stopped) is harmless — no increment is ever based on a
// checkpoint without a restore point — and goes with the next --cbt run.
func (r *Runner) Cleanup(dom Domain, rec journal.Record) {
	if rec.Checkpoint != "" {
		if err := r.DeleteCheckpoint(dom, rec.Checkpoint); err != nil {
			r.P.Warn("Could not delete the checkpoint '%s' of '%s' that the failed backup made: %s; the next --cbt run deletes it", rec.Checkpoint, dom.Name(), virt.Describe(err))
		}
	}
	for _, f := range rec.Files {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			r.P.Warn("Could not remove '%s': %v", f, err)
		}
	}
	r.clearJournal(dom.Name())
}

// DeleteCheckpoint deletes a checkpoint with its bitmaps; when libvirt
// cannot, because the bitmaps are gone (QEMU killed before it wrote them
// to the image), only its record. No such checkpoint is no error.
func (r *Runner) DeleteCheckpoint(dom Domain, name string) error {
	err := dom.DeleteCheckpoint(name, false)
	if err == nil || errors.Is(err, virt.ErrNoCheckpoint) {
		return nil
	}
	if st, serr := dom.State(); serr != nil || (st != virt.StateRunning && st != virt.StatePaused && st != virt.StateBlocked) {
		// A shut-off domain's bitmaps stay in its images: leave the
		// checkpoint for a run that can delete both.
		return err
	}
	if merr := dom.DeleteCheckpoint(name, true); merr != nil {
		if errors.Is(merr, virt.ErrNoCheckpoint) {
			return nil
		}
		return err
	}
	r.P.Debug("Checkpoint '%s' of '%s' had no usable bitmap (%s): removed libvirt's record of it", name, dom.Name(), virt.Describe(err))
	return nil
}

// DeleteOurs deletes the checkpoints of backup directory dirID except
// keep, newest first (libvirt reparents the children of a deleted one).
// Failures are reported; the next run tries again.
func (r *Runner) DeleteOurs(dom Domain, dirID, keep string) {
	cps, err := dom.Checkpoints()
	if err != nil {
		r.P.Warn("Cannot list the checkpoints of '%s': %s; its older fi-backup checkpoints stay until the next --cbt run", dom.Name(), virt.Describe(err))
		return
	}
	ours := Ours(dirID, cps)
	for i := len(ours) - 1; i >= 0; i-- {
		if ours[i].Name == keep {
			continue
		}
		if err := r.DeleteCheckpoint(dom, ours[i].Name); err != nil {
			r.P.Warn("Could not delete the checkpoint '%s' of '%s': %s; the next --cbt run tries again", ours[i].Name, dom.Name(), virt.Describe(err))
			continue
		}
		r.P.Debug("Deleted the checkpoint '%s' of '%s'", ours[i].Name, dom.Name())
	}
}

// Recover finishes a push backup a killed run left (its journal record),
// under the domain's lock: recorded says its restore point was written
// (then only the journal goes). Otherwise a job still writing the
// journaled targets is aborted — and no other job — then the checkpoint
// and files are deleted, so the next increment starts from the last good
// checkpoint. A guest the run may have left frozen (-q) is thawed.
func (r *Runner) Recover(dom Domain, rec *journal.Record, recorded bool) error {
	name := dom.Name()
	st, err := dom.State()
	if err != nil {
		r.P.Err("Cannot read the state of '%s': %s", name, virt.Describe(err))
		return err
	}
	active := st == virt.StateRunning || st == virt.StatePaused || st == virt.StateBlocked
	if active && rec.Quiesce {
		_ = dom.FSThaw() // not frozen: an error, and nothing to do
	}
	if recorded {
		r.P.Debug("The --cbt backup of '%s' at %s left by pid %d is recorded: removing its journal", name, rec.Moment, rec.PID)
		r.clearJournal(name)
		return nil
	}
	spec := virt.BackupSpec{Checkpoint: rec.Checkpoint}
	for _, f := range rec.Files {
		spec.Disks = append(spec.Disks, virt.BackupDisk{Path: f})
	}
	if active {
		j, err := dom.BackupJob()
		if err != nil && !errors.Is(err, virt.ErrNotRunning) {
			r.P.Err("Cannot check the backup job of '%s': %s", name, virt.Describe(err))
			return err
		}
		switch {
		case sameTargets(j, spec):
			r.P.Warn("Aborting the --cbt backup job of '%s' left by an interrupted fi-backup run (pid %d)", name, rec.PID)
			events, stop, werr := dom.WatchBackup()
			if werr != nil {
				events = nil
			} else {
				defer stop()
			}
			if _, over := r.abort(dom, events, spec, false); !over {
				r.P.Err("The backup job of '%s' is still running", name)
				return ErrStillRunning
			}
		case j.Active:
			r.P.Warn("A backup job runs on '%s', but not the one an interrupted fi-backup run started: leaving it alone", name)
		}
	}
	r.P.Warn("Deleting the checkpoint '%s' and the files of the --cbt backup of '%s' at %s left by an interrupted fi-backup run (pid %d): the next backup increments from the last good checkpoint", rec.Checkpoint, name, rec.Moment, rec.PID)
	r.Cleanup(dom, *rec)
	return nil
}
