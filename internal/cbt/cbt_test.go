package cbt

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/virt"
	"github.com/fi-backup/fi-backup/internal/virt/virttest"
)

const id = "0123456789abcdef"

type env struct {
	f   *virttest.Fake
	dom virt.Domain
	r   *Runner
	out *bytes.Buffer
	dir string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	f := virttest.New(map[string]virt.State{"dom": virt.StateRunning})
	dom, err := f.Lookup("dom")
	require.NoError(t, err)
	t.Cleanup(func() { _ = dom.Close() })
	var out bytes.Buffer
	return &env{f: f, dom: dom, out: &out, dir: t.TempDir(),
		r: &Runner{P: logging.New(&out, true, true), Journal: journal.Store{Dir: t.TempDir()}, PollEvery: time.Millisecond}}
}

// job is a backup at moment m: vda incremental from prev ("" full), with
// its two target files existing (as the caller creates them) and journaled.
func (e *env) job(t *testing.T, m, prev string) (virt.BackupSpec, journal.Record) {
	t.Helper()
	tmp := filepath.Join(e.dir, ".vm.cbt-"+m+".fi-backup-cbt")
	final := filepath.Join(e.dir, "vm.cbt-"+m)
	require.NoError(t, os.WriteFile(tmp, []byte("target"), 0o600))
	spec := virt.BackupSpec{Checkpoint: CheckpointName(id, m), Disks: []virt.BackupDisk{
		{Target: "vda", Path: tmp, Bitmap: true},
		{Target: "hdc"},
	}}
	if prev != "" {
		spec.Disks[0].Incremental = CheckpointName(id, prev)
	}
	rec := Record("dom", spec.Checkpoint, e.dir, m, []string{tmp, final}, false)
	require.NoError(t, e.r.Begin(rec))
	return spec, rec
}

func (e *env) checkpoints(t *testing.T) []string {
	t.Helper()
	cps, err := e.dom.Checkpoints()
	require.NoError(t, err)
	var out []string
	for _, c := range cps {
		out = append(out, c.Name)
	}
	return out
}

func (e *env) journaled(t *testing.T) bool {
	t.Helper()
	rec, err := e.r.Journal.Read("dom")
	require.NoError(t, err)
	return rec != nil
}

func TestOurs(t *testing.T) {
	cps := []virt.Checkpoint{
		{Name: CheckpointName(id, "20240101-000002")},
		{Name: "virtnbdbackup.0"},
		{Name: CheckpointName("fedcba9876543210", "20240101-000001")},
		{Name: CheckpointName(id, "20240101-000001")},
		{Name: CheckpointName(id, "latest")},
	}
	assert.Equal(t, []virt.Checkpoint{{Name: "fi-backup-0123456789abcdef-20240101-000001"}, {Name: "fi-backup-0123456789abcdef-20240101-000002"}}, Ours(id, cps))
}

// TestRunSuccess: the event decides; the checkpoint exists, the journal
// stays until Done, the rate limit reaches the job of every backed-up disk.
func TestRunSuccess(t *testing.T) {
	e := newEnv(t)
	e.r.Bandwidth = 1 << 20
	spec, rec := e.job(t, "20240101-000001", "")
	require.NoError(t, e.r.Run(context.Background(), e.dom, spec, rec, false))
	assert.Equal(t, []string{CheckpointName(id, "20240101-000001")}, e.checkpoints(t))
	assert.True(t, e.journaled(t), "the journal stays until the point is recorded")
	assert.Equal(t, map[string]uint64{"vda": 1 << 20}, e.f.Backup.Speeds)
	e.r.Done("dom")
	assert.False(t, e.journaled(t))
}

// TestRunFailedJobCleansUp: a job that fails (an aborted one: libvirt's
// "Operation canceled") still made its checkpoint; it is deleted with the
// target, the journal goes, and the older checkpoint is untouched.
func TestRunFailedJobCleansUp(t *testing.T) {
	e := newEnv(t)
	spec, rec := e.job(t, "20240101-000001", "")
	require.NoError(t, e.r.Run(context.Background(), e.dom, spec, rec, false))
	e.r.Done("dom")
	e.f.Backup.End = func(string, virt.BackupSpec) *virt.BackupEvent {
		return &virt.BackupEvent{Error: "Operation canceled"}
	}
	spec, rec = e.job(t, "20240101-000002", "20240101-000001")
	err := e.r.Run(context.Background(), e.dom, spec, rec, false)
	assert.ErrorContains(t, err, "the backup job failed: Operation canceled")
	assert.Equal(t, []string{CheckpointName(id, "20240101-000001")}, e.checkpoints(t), "the failed job's checkpoint is gone, the last good one stays")
	for _, f := range rec.Files {
		assert.NoFileExists(t, f)
	}
	assert.False(t, e.journaled(t))
}

// TestRunAbortRace: on a timeout the job is aborted; when its completion
// event says it finished anyway, the backup is kept — the abort call
// decides nothing.
func TestRunAbortRace(t *testing.T) {
	for _, finished := range []bool{false, true} {
		e := newEnv(t)
		e.r.Timeout = 20 * time.Millisecond
		e.f.Backup.End = func(string, virt.BackupSpec) *virt.BackupEvent { return nil } // runs until aborted
		e.f.Backup.FinishOnAbort = finished
		spec, rec := e.job(t, "20240101-000001", "")
		err := e.r.Run(context.Background(), e.dom, spec, rec, false)
		if finished {
			require.NoError(t, err)
			assert.Contains(t, e.out.String(), "[WAR] The backup job of 'dom' finished as it was aborted")
			assert.Equal(t, []string{spec.Checkpoint}, e.checkpoints(t))
			assert.FileExists(t, rec.Files[0])
			continue
		}
		assert.ErrorIs(t, err, ErrTimeout)
		assert.Empty(t, e.checkpoints(t))
		assert.NoFileExists(t, rec.Files[0])
		assert.False(t, e.journaled(t))
	}
}

// TestRunInterrupted: a cancelled context aborts the job and cleans up.
func TestRunInterrupted(t *testing.T) {
	e := newEnv(t)
	e.f.Backup.End = func(string, virt.BackupSpec) *virt.BackupEvent { return nil }
	spec, rec := e.job(t, "20240101-000001", "")
	ctx, cancel := context.WithCancel(context.Background())
	e.r.Step = func(step string) error {
		if step == "cbt-begun" {
			cancel()
		}
		return nil
	}
	err := e.r.Run(ctx, e.dom, spec, rec, false)
	assert.ErrorContains(t, err, "interrupted")
	assert.Empty(t, e.checkpoints(t))
	assert.NoFileExists(t, rec.Files[0])
	assert.False(t, e.journaled(t))
}

// TestRunInconsistent: libvirt refuses an incremental start from a broken
// bitmap; nothing is created and the error says so.
func TestRunInconsistent(t *testing.T) {
	e := newEnv(t)
	spec, rec := e.job(t, "20240101-000001", "")
	require.NoError(t, e.r.Run(context.Background(), e.dom, spec, rec, false))
	e.r.Done("dom")
	e.f.Backup.Broken = map[string]bool{CheckpointName(id, "20240101-000001"): true}
	spec, rec = e.job(t, "20240101-000002", "20240101-000001")
	err := e.r.Run(context.Background(), e.dom, spec, rec, false)
	assert.ErrorIs(t, err, ErrInconsistent)
	assert.ErrorContains(t, err, "missing or broken bitmap")
	assert.Equal(t, []string{CheckpointName(id, "20240101-000001")}, e.checkpoints(t))
	assert.NoFileExists(t, rec.Files[0])
	assert.False(t, e.journaled(t))
}

// TestRunQuiesce: the guest is frozen for the start and thawed right
// after it, also when the start fails; no agent: nothing is created.
func TestRunQuiesce(t *testing.T) {
	e := newEnv(t)
	frozenAtStart := false
	e.f.Backup.Begin = func(string, virt.BackupSpec) error {
		frozenAtStart = e.f.Backup.Frozen["dom"]
		return nil
	}
	spec, rec := e.job(t, "20240101-000001", "")
	require.NoError(t, e.r.Run(context.Background(), e.dom, spec, rec, true))
	assert.True(t, frozenAtStart, "frozen while the job starts")
	assert.False(t, e.f.Backup.Frozen["dom"], "thawed")
	e.r.Done("dom")

	e.f.Backup.Begin = func(string, virt.BackupSpec) error { return errors.New("boom") }
	spec, rec = e.job(t, "20240101-000002", "20240101-000001")
	assert.ErrorContains(t, e.r.Run(context.Background(), e.dom, spec, rec, true), "boom")
	assert.False(t, e.f.Backup.Frozen["dom"], "thawed after a failed start")

	e.f.Backup.Begin = nil
	e.f.Backup.NoAgent = true
	n := len(e.f.Backup.Specs)
	spec, rec = e.job(t, "20240101-000003", "20240101-000001")
	err := e.r.Run(context.Background(), e.dom, spec, rec, true)
	assert.ErrorIs(t, err, ErrFreeze)
	assert.ErrorContains(t, err, "QEMU guest agent is not configured")
	assert.Len(t, e.f.Backup.Specs, n, "no backup without the freeze")
	assert.NoFileExists(t, rec.Files[0])
	assert.False(t, e.journaled(t))
}

// TestRunDomainStops: a domain that stops during the job fails it; its
// checkpoint cannot be deleted now and is left for the next run.
func TestRunDomainStops(t *testing.T) {
	e := newEnv(t)
	e.f.Backup.End = func(string, virt.BackupSpec) *virt.BackupEvent {
		e.f.States["dom"] = virt.StateShutoff
		return nil
	}
	spec, rec := e.job(t, "20240101-000001", "")
	err := e.r.Run(context.Background(), e.dom, spec, rec, false)
	assert.ErrorContains(t, err, "the domain stopped during the backup job")
	assert.Contains(t, e.out.String(), "[WAR] Could not delete the checkpoint '"+spec.Checkpoint+"'")
	assert.NoFileExists(t, rec.Files[0])
	assert.False(t, e.journaled(t))
}

// TestDeleteOurs: only the directory's own checkpoints go, the kept one
// stays; another directory's and another tool's are never touched. A
// checkpoint whose bitmap is gone loses its record.
func TestDeleteOurs(t *testing.T) {
	e := newEnv(t)
	mk := func(names ...string) {
		for _, n := range names {
			e.f.Backup.Checkpoints["dom"] = append(e.f.Backup.Checkpoints["dom"], virt.Checkpoint{Name: n, Bitmaps: []string{"vda"}})
		}
	}
	e.f.Backup.Checkpoints = map[string][]virt.Checkpoint{}
	mk(CheckpointName(id, "20240101-000001"), "virtnbdbackup.0", CheckpointName("fedcba9876543210", "20240101-000001"),
		CheckpointName(id, "20240101-000002"), CheckpointName(id, "20240101-000003"))
	e.f.Backup.DeleteErr = map[string]error{CheckpointName(id, "20240101-000001"): errors.New("internal error: bitmap not found in backing chain")}
	e.r.DeleteOurs(e.dom, id, CheckpointName(id, "20240101-000003"))
	assert.Equal(t, []string{"virtnbdbackup.0", CheckpointName("fedcba9876543210", "20240101-000001"), CheckpointName(id, "20240101-000003")}, e.checkpoints(t))
	assert.Equal(t, []string{CheckpointName(id, "20240101-000002"), CheckpointName(id, "20240101-000001") + " (metadata)"}, e.f.Backup.Deleted, "newest first; a missing bitmap: metadata only")
}

// TestRecover: a journaled job that still runs is aborted, then its
// checkpoint and files are deleted; one that finished is cleaned up the
// same way; a recorded one keeps everything; another tool's job is never
// aborted.
func TestRecover(t *testing.T) {
	t.Run("running", func(t *testing.T) {
		e := newEnv(t)
		e.f.Backup.End = func(string, virt.BackupSpec) *virt.BackupEvent { return nil }
		spec, rec := e.job(t, "20240101-000001", "")
		require.NoError(t, e.dom.BeginBackup(spec)) // the killed run's job
		require.NoError(t, e.r.Recover(e.dom, &rec, false))
		j, err := e.dom.BackupJob()
		require.NoError(t, err)
		assert.False(t, j.Active, "aborted")
		assert.Empty(t, e.checkpoints(t))
		assert.NoFileExists(t, rec.Files[0])
		assert.False(t, e.journaled(t))
		assert.Contains(t, e.out.String(), "[WAR] Aborting the --cbt backup job of 'dom' left by an interrupted fi-backup run")
	})
	t.Run("finished", func(t *testing.T) {
		e := newEnv(t)
		spec, rec := e.job(t, "20240101-000001", "")
		require.NoError(t, e.dom.BeginBackup(spec))
		require.NoError(t, os.WriteFile(rec.Files[1], []byte("renamed"), 0o600))
		require.NoError(t, e.r.Recover(e.dom, &rec, false))
		assert.Empty(t, e.checkpoints(t))
		assert.NoFileExists(t, rec.Files[0])
		assert.NoFileExists(t, rec.Files[1])
		assert.False(t, e.journaled(t))
	})
	t.Run("recorded", func(t *testing.T) {
		e := newEnv(t)
		spec, rec := e.job(t, "20240101-000001", "")
		require.NoError(t, e.dom.BeginBackup(spec))
		require.NoError(t, e.r.Recover(e.dom, &rec, true))
		assert.Equal(t, []string{spec.Checkpoint}, e.checkpoints(t))
		assert.FileExists(t, rec.Files[0])
		assert.False(t, e.journaled(t))
	})
	t.Run("another job", func(t *testing.T) {
		e := newEnv(t)
		e.f.Backup.End = func(string, virt.BackupSpec) *virt.BackupEvent { return nil }
		_, rec := e.job(t, "20240101-000001", "")
		other := virt.BackupSpec{Checkpoint: "virtnbdbackup.1", Disks: []virt.BackupDisk{{Target: "vda", Path: "/elsewhere/vda.data"}}}
		require.NoError(t, e.dom.BeginBackup(other))
		require.NoError(t, e.r.Recover(e.dom, &rec, false))
		j, err := e.dom.BackupJob()
		require.NoError(t, err)
		assert.True(t, j.Active, "another tool's job is left alone")
		assert.Equal(t, []string{"virtnbdbackup.1"}, e.checkpoints(t))
		assert.NoFileExists(t, rec.Files[0])
	})
	t.Run("shut off", func(t *testing.T) {
		e := newEnv(t)
		spec, rec := e.job(t, "20240101-000001", "")
		require.NoError(t, e.dom.BeginBackup(spec))
		e.f.States["dom"] = virt.StateShutoff
		require.NoError(t, e.r.Recover(e.dom, &rec, false))
		assert.Equal(t, []string{spec.Checkpoint}, e.checkpoints(t), "left for a run that can delete its bitmaps too")
		assert.NoFileExists(t, rec.Files[0])
		assert.False(t, e.journaled(t))
	})
}

// TestRunEndsWithoutEvent: a job that libvirt no longer lists and whose
// completion event never comes is decided by libvirt's record of the last
// finished job, when that record is new since the start; an unchanged
// record is an older job's, and the backup counts as failed.
func TestRunEndsWithoutEvent(t *testing.T) {
	for _, tc := range []struct {
		name  string
		ev    *virt.BackupEvent
		noRec bool
		want  string
	}{
		{name: "succeeded", ev: &virt.BackupEvent{Success: true}},
		{name: "failed", ev: &virt.BackupEvent{Error: "No space left on device"}, want: "the backup job failed: No space left on device"},
		{name: "no record of it", ev: &virt.BackupEvent{Success: true}, noRec: true, want: "without a completion event or a record of its end"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.r.EventGrace = 10 * time.Millisecond
			spec, rec := e.job(t, "20240101-000001", "")
			require.NoError(t, e.r.Run(context.Background(), e.dom, spec, rec, false), "a first job, with its event")
			e.r.Done("dom")
			e.f.Backup.NoEvent = true
			e.f.Backup.End = func(string, virt.BackupSpec) *virt.BackupEvent {
				if tc.noRec {
					return nil // runs until its end is faked below, unrecorded
				}
				return tc.ev
			}
			spec, rec = e.job(t, "20240101-000002", "20240101-000001")
			if tc.noRec {
				go func() {
					for {
						if j, _ := e.dom.BackupJob(); j.Active {
							e.f.EndWithoutRecord("dom")
							return
						}
						time.Sleep(time.Millisecond)
					}
				}()
			}
			err := e.r.Run(context.Background(), e.dom, spec, rec, false)
			if tc.want == "" {
				require.NoError(t, err)
				assert.Contains(t, e.out.String(), "ended without a completion event; libvirt's record of its end says it succeeded")
				return
			}
			assert.ErrorContains(t, err, tc.want)
			assert.Equal(t, []string{CheckpointName(id, "20240101-000001")}, e.checkpoints(t))
			assert.False(t, e.journaled(t))
		})
	}
}
