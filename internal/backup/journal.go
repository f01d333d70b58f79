package backup

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/fi-backup/fi-backup/internal/virt"
)

// A block job outlives the process that started it: an active commit whose
// fi-backup was killed stays mirrored forever, and every later snapshot and
// consolidation of the domain fails on it. Before starting a job the tool
// writes a small journal next to the domain's lock file, and removes it when
// the job is finished or aborted. A later run (holding the same lock) that
// finds the journal and the job still there aborts the job — which leaves the
// disk on its previous, valid chain — and carries on. A job without a journal
// was started by someone else and is left alone.

type jobJournal struct {
	Domain string `json:"domain"`
	Disk   string `json:"disk"`
	Kind   string `json:"kind"`
	Base   string `json:"base,omitempty"`
	PID    int    `json:"pid"`
}

func (r *Runner) journalPath(dom string) string {
	return filepath.Join(r.LockDir, dom+".fi-backup.job")
}

func (r *Runner) writeJournal(j jobJournal) error {
	j.PID = os.Getpid()
	b, err := json.Marshal(j)
	if err != nil {
		return err
	}
	p := r.journalPath(j.Domain)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

func (r *Runner) clearJournal(dom string) {
	_ = os.Remove(r.journalPath(dom))
}

func (r *Runner) readJournal(dom string) (*jobJournal, error) {
	b, err := os.ReadFile(r.journalPath(dom))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var j jobJournal
	if err := json.Unmarshal(b, &j); err != nil {
		return nil, fmt.Errorf("unreadable journal %s: %w", r.journalPath(dom), err)
	}
	return &j, nil
}

// journalDump is the journal kind of a -s state dump in progress.
const journalDump = "dump"

// recoverJobs finishes what an interrupted run left: a block job it started
// is aborted; a migration of its state dump is cancelled. Called with the
// domain's lock held, for a running domain.
func (r *Runner) recoverJobs(dom virt.Domain) error {
	j, err := r.readJournal(dom.Name())
	if err != nil {
		r.P.Err("Cannot read the journal of '%s': %v", dom.Name(), err)
		return ErrFailed
	}
	if j == nil {
		return nil
	}
	if j.Kind == journalDump {
		// The guest runs (QEMU restarts it when a migration fails); a
		// migration to the dead process's pipe may still be listed.
		_, _ = dom.QMP(`{"execute":"migrate_cancel"}`)
		r.clearJournal(dom.Name())
		return nil
	}
	active, err := jobActive(dom, j.Disk)
	if err != nil {
		r.P.Err("Cannot check the block job left on disk '%s' of '%s': %s", j.Disk, dom.Name(), virt.Describe(err))
		return ErrFailed
	}
	if active {
		r.P.Warn("Aborting the %s job on disk '%s' of '%s' left by an interrupted fi-backup run (pid %d); the disk stays on its previous chain", j.Kind, j.Disk, dom.Name(), j.PID)
		if !r.abortJob(dom, j.Disk) {
			r.P.Err("The block job on disk '%s' of '%s' is still active", j.Disk, dom.Name())
			return ErrFailed
		}
	}
	r.clearJournal(dom.Name())
	return nil
}

// resumeAfterDump resumes a paused domain whose state dump was interrupted
// (the journal says so): the dump had paused it. It reports whether it did.
func (r *Runner) resumeAfterDump(dom virt.Domain) bool {
	j, err := r.readJournal(dom.Name())
	if err != nil || j == nil || j.Kind != journalDump {
		return false
	}
	_, _ = dom.QMP(`{"execute":"migrate_cancel"}`)
	if err := dom.Resume(); err != nil && !errors.Is(err, virt.ErrNotRunning) {
		r.P.Err("Problem resuming domain '%s': %s", dom.Name(), virt.Describe(err))
		return false
	}
	r.P.Warn("Resumed domain '%s', left paused by an interrupted fi-backup -s run (pid %d)", dom.Name(), j.PID)
	r.clearJournal(dom.Name())
	return true
}

// jobActive asks both libvirt's job info and the live XML: right after a
// libvirtd restart the job info can report no job while the disk is still
// mirrored (libvirtd is re-reading QEMU's state).
func jobActive(dom virt.Domain, target string) (bool, error) {
	info, err := dom.JobInfo(target)
	if err != nil {
		return false, err
	}
	if info.Active {
		return true, nil
	}
	d, err := diskByTarget(dom, target)
	if err != nil {
		return false, err
	}
	return d.Mirror != nil, nil
}
