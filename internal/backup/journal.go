package backup

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/fi-backup/fi-backup/internal/lock"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// A block job outlives the process that started it: an active commit whose
// fi-backup was killed stays mirrored forever, and every later snapshot and
// consolidation of the domain fails on it. Before starting a job the tool
// writes a small journal next to the domain's lock file, and removes it when
// the job is finished or aborted. A later run (holding the same lock) that
// finds the journal and that very job still there aborts it — which leaves
// the disk on its previous, valid chain — and carries on. A job without a
// journal, or one that is not the job the journal describes, was started by
// someone else and is left alone.
//
// The journal lives in /var/lock, which every local user may write to, and
// it makes root abort jobs and resume guests. So it is written without ever
// following a link (a fresh O_EXCL temporary file renamed into place, mode
// 0600), and read only when it is a regular file owned by this process's
// user (root) that nobody else may write.

type jobJournal struct {
	Domain string `json:"domain"`
	Disk   string `json:"disk,omitempty"`
	Kind   string `json:"kind"`          // journalCommit, journalPull or journalDump
	Top    string `json:"top,omitempty"` // the disk's active image when the job started
	Base   string `json:"base,omitempty"`
	PID    int    `json:"pid"`
}

// Journal kinds.
const (
	journalCommit = "blockcommit"
	journalPull   = "blockpull"
	journalDump   = "dump" // a -s state dump in progress
)

const journalSuffix = ".fi-backup.job"

// errUntrustedJournal marks a journal file the tool refuses to act on.
var errUntrustedJournal = errors.New("untrusted journal")

func (r *Runner) journalPath(dom string) string {
	return filepath.Join(r.LockDir, dom+journalSuffix)
}

func (r *Runner) writeJournal(j jobJournal) error {
	j.PID = os.Getpid()
	b, err := json.Marshal(j)
	if err != nil {
		return err
	}
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return err
	}
	tmp := filepath.Join(r.LockDir, "."+j.Domain+journalSuffix+"."+hex.EncodeToString(rnd[:]))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		// rename replaces whatever sits at the name (a planted link too)
		// without following it.
		err = os.Rename(tmp, r.journalPath(j.Domain))
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}

func (r *Runner) clearJournal(dom string) {
	if err := os.Remove(r.journalPath(dom)); err != nil && !errors.Is(err, os.ErrNotExist) {
		r.P.Warn("Could not remove the journal '%s': %v; the next run will find it and check the domain again", r.journalPath(dom), err)
	}
}

// readJournal returns nil when there is no journal, and an error wrapping
// errUntrustedJournal when the file is not one this tool wrote.
func (r *Runner) readJournal(dom string) (*jobJournal, error) {
	p := r.journalPath(dom)
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOENT):
		return nil, nil
	case errors.Is(err, unix.ELOOP):
		return nil, fmt.Errorf("%w: %s is a symbolic link", errUntrustedJournal, p)
	case err != nil:
		return nil, fmt.Errorf("open %s: %w", p, err)
	}
	f := os.NewFile(uintptr(fd), p)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", p, err)
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return nil, fmt.Errorf("%w: %s is not a regular file", errUntrustedJournal, p)
	case int(st.Uid) != os.Geteuid():
		return nil, fmt.Errorf("%w: %s belongs to uid %d, not to uid %d", errUntrustedJournal, p, st.Uid, os.Geteuid())
	case st.Mode&0o022 != 0:
		return nil, fmt.Errorf("%w: %s may be written by others (mode %04o)", errUntrustedJournal, p, st.Mode&0o7777)
	}
	b, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	var j jobJournal
	if err := json.Unmarshal(b, &j); err != nil {
		return nil, fmt.Errorf("%w: %s is not a fi-backup journal: %v", errUntrustedJournal, p, err)
	}
	if j.Domain != dom {
		return nil, fmt.Errorf("%w: %s names domain '%s'", errUntrustedJournal, p, j.Domain)
	}
	return &j, nil
}

// RecoverAll finishes what interrupted runs left on any domain, before the
// domains of this run are selected: a guest a killed -s run left paused is
// resumed (so -r and all see it running again), an orphaned block job of
// this tool is aborted. Domains another run holds the lock of are left to
// that run.
func (r *Runner) RecoverAll(ctx context.Context) {
	entries, err := os.ReadDir(r.LockDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), journalSuffix)
		if !ok || name == "" || strings.HasPrefix(e.Name(), ".") || ctx.Err() != nil {
			continue
		}
		l, err := lock.TryLock(r.LockDir, name)
		if err != nil {
			continue // in use by a live run, or not ours to lock
		}
		dom, err := r.Hyp.Lookup(name)
		switch {
		case errors.Is(err, virt.ErrNoDomain):
			r.P.Debug("Removing the journal of '%s': the domain no longer exists", name)
			r.clearJournal(name)
		case err == nil:
			_ = r.recoverJobs(dom)
			_ = dom.Close()
		}
		_ = l.Unlock()
	}
}

// recoverJobs finishes what an interrupted run left on dom: a block job it
// started is aborted; a migration of its state dump is cancelled and the
// guest it paused resumed. Called with the domain's lock held.
func (r *Runner) recoverJobs(dom virt.Domain) error {
	name := dom.Name()
	j, err := r.readJournal(name)
	switch {
	case errors.Is(err, errUntrustedJournal):
		r.P.Warn("Ignoring the journal of '%s': %v. Not acting on it (remove it if it is not yours)", name, err)
		return nil
	case err != nil:
		r.P.Err("Cannot read the journal of '%s': %v", name, err)
		return ErrFailed
	case j == nil:
		return nil
	}
	st, err := dom.State()
	if err != nil {
		r.P.Err("Cannot read the state of '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	if st != virt.StateRunning && st != virt.StateBlocked && st != virt.StatePaused {
		r.clearJournal(name) // no QEMU: no job, no migration
		return nil
	}
	if j.Kind == journalDump {
		// QEMU restarts the guest itself when a migration fails; one that
		// was held paused (or completed into the dead process's pipe)
		// stays paused until someone resumes it.
		_, _ = dom.QMP(`{"execute":"migrate_cancel"}`)
		if st == virt.StatePaused {
			if err := dom.Resume(); err != nil && !errors.Is(err, virt.ErrNotRunning) {
				r.P.Err("Problem resuming domain '%s': %s", name, virt.Describe(err))
				return ErrFailed
			}
			r.P.Warn("Resumed domain '%s', left paused by an interrupted fi-backup -s run (pid %d)", name, j.PID)
		}
		r.clearJournal(name)
		return nil
	}
	ours, other, err := r.journaledJob(dom, j)
	if err != nil {
		r.P.Err("Cannot check the block job left on disk '%s' of '%s': %s", j.Disk, name, virt.Describe(err))
		return ErrFailed
	}
	switch {
	case ours:
		r.P.Warn("Aborting the %s job on disk '%s' of '%s' left by an interrupted fi-backup run (pid %d); the disk stays on its previous chain", j.Kind, j.Disk, name, j.PID)
		if !r.abortJob(dom, j.Disk) {
			r.P.Err("The block job on disk '%s' of '%s' is still active", j.Disk, name)
			return ErrFailed
		}
	case other != "":
		r.P.Warn("A %s job runs on disk '%s' of '%s', but not the %s job an interrupted fi-backup run started: leaving it alone", other, j.Disk, name, j.Kind)
	}
	r.clearJournal(name)
	return nil
}

// journaledJob tells whether the job now on the journal's disk is the one
// the journal describes (same kind, same top, same base), or names the
// kind of another job found there.
func (r *Runner) journaledJob(dom virt.Domain, j *jobJournal) (ours bool, other string, err error) {
	info, d, err := jobState(dom, j.Disk)
	if err != nil || !info.Active {
		return false, "", err
	}
	typ := info.Type
	if typ == virt.JobTypeUnknown && d.Mirror != nil && d.Mirror.Job == "active-commit" {
		typ = virt.JobTypeActiveCommit // libvirtd still reconnecting: the XML knows
	}
	if !jobMatches(j, typ, d) {
		return false, typ.String(), nil
	}
	return true, "", nil
}

// jobMatches is the identity check of a journaled job: kind, then the
// files it works on where the journal and libvirt both tell them.
func jobMatches(j *jobJournal, typ virt.JobType, d virt.Disk) bool {
	switch j.Kind {
	case journalCommit:
		if typ != virt.JobTypeActiveCommit && typ != virt.JobTypeCommit {
			return false
		}
		if j.Base != "" && d.Mirror != nil && d.Mirror.Source != "" && d.Mirror.Source != j.Base {
			return false
		}
	case journalPull:
		if typ != virt.JobTypePull {
			return false
		}
	default:
		return false
	}
	return j.Top == "" || d.Source == j.Top
}

// jobState asks both libvirt's job info and the live XML: right after a
// libvirtd restart the job info can report no job while the disk is still
// mirrored (libvirtd is re-reading QEMU's state).
func jobState(dom virt.Domain, target string) (virt.JobInfo, virt.Disk, error) {
	info, err := dom.JobInfo(target)
	if err != nil {
		return info, virt.Disk{}, err
	}
	d, err := diskByTarget(dom, target)
	if err != nil {
		return info, d, err
	}
	if !info.Active && d.Mirror != nil {
		info.Active = true
	}
	return info, d, nil
}

// jobActive reports whether any block job runs on the disk.
func jobActive(dom virt.Domain, target string) (bool, error) {
	info, _, err := jobState(dom, target)
	return info.Active, err
}
