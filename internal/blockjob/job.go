package blockjob

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/progress"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// abortWait bounds the wait for libvirt to report an aborted job gone.
const abortWait = 15 * time.Second

// run starts a block job and waits for it: READY then pivot for a commit,
// COMPLETED for a pull. Events are registered before the job starts (READY
// can arrive before the start call returns); a poll of the live XML and
// job info is the safety net. On timeout or cancellation the job is
// aborted, which leaves the domain on its old, valid chain.
func (c *Consolidator) run(ctx context.Context, dom Domain, kind virt.JobKind, target, top, base string) error {
	events, stop, err := dom.WatchJobs()
	if err != nil {
		return err
	}
	defer stop()
	rec := journal.Record{Domain: dom.Name(), Disk: target, Kind: KindPull, Top: top, Base: base}
	if kind == virt.JobCommit {
		rec.Kind = KindCommit
	}
	if err := c.Journal.Write(rec); err != nil {
		return fmt.Errorf("write job journal: %w", err)
	}
	if err := dom.StartJob(kind, target, base, c.Bandwidth); err != nil {
		// The call may have failed after the job started (a connection
		// lost mid-call): keep the journal only while the job it
		// describes is there, so no later run aborts another job.
		if ours, _, jerr := journaled(dom, &rec); jerr == nil && !ours {
			c.clearJournal(dom.Name())
		}
		return err
	}
	over, err := c.wait(ctx, dom, events, kind, target)
	// The journal goes only when the job is known to be over; a process
	// killed, or a connection lost, before that leaves it for Recover.
	if over {
		c.clearJournal(dom.Name())
	}
	return err
}

func (c *Consolidator) clearJournal(dom string) {
	if err := c.Journal.Clear(dom); err != nil {
		c.P.Warn("Could not remove the journal '%s': %v; the next run will find it and check the domain again", c.Journal.Path(dom), err)
	}
}

// wait waits for the job's end; over reports whether libvirt no longer runs
// it (finished, pivoted, failed, or aborted by us).
func (c *Consolidator) wait(ctx context.Context, dom Domain, events <-chan virt.JobEvent, kind virt.JobKind, target string) (over bool, err error) {
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = 30 * time.Minute
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(c.pollEvery())
	defer tick.Stop()
	var bar *progress.Bar
	if c.Bar != nil {
		bar = c.Bar(target)
		defer bar.Done()
	}
	for {
		select {
		case <-ctx.Done():
			return c.abort(dom, target), fmt.Errorf("interrupted: block job aborted, '%s' stays on its previous chain", target)
		case <-deadline.C:
			return c.abort(dom, target), fmt.Errorf("%w: not finished after %s; job aborted, the disk stays on its previous chain", ErrTimeout, timeout)
		case ev := <-events:
			if ev.Disk != target {
				continue
			}
			switch ev.Status {
			case virt.JobReady:
				if kind == virt.JobCommit {
					return c.pivot(ctx, dom, target)
				}
			case virt.JobCompleted:
				if kind == virt.JobPull {
					return true, nil
				}
			case virt.JobFailed:
				return true, errors.New("block job failed")
			case virt.JobCanceled:
				return true, errors.New("block job was cancelled")
			}
		case <-tick.C:
			ready, gone, info, err := poll(dom, kind, target)
			bar.Set(int64(info.Cur), int64(info.End))
			switch {
			case err != nil:
				return gone, err
			case ready && kind == virt.JobCommit:
				return c.pivot(ctx, dom, target)
			case ready:
				return true, nil
			}
		}
	}
}

// poll reports READY (commit) or finished (pull) from libvirt's state. gone
// means the job no longer exists although it did not do its work (the
// domain stopped, someone aborted it): err says why.
func poll(dom Domain, kind virt.JobKind, target string) (ready, gone bool, info virt.JobInfo, err error) {
	info, err = dom.JobInfo(target)
	switch {
	case errors.Is(err, virt.ErrNotRunning):
		return false, true, info, errors.New("the domain stopped during the block job")
	case err != nil:
		return false, false, info, err
	case kind == virt.JobPull:
		return !info.Active, false, info, nil
	case !info.Active:
		return false, true, info, errors.New("the block job ended without becoming ready")
	}
	d, err := diskByTarget(dom, target)
	if err != nil {
		return false, false, info, err
	}
	return d.Mirror != nil && d.Mirror.Ready == "yes", false, info, nil
}

func (c *Consolidator) pivot(ctx context.Context, dom Domain, target string) (over bool, err error) {
	for attempt := 0; ; attempt++ {
		err := dom.Pivot(target)
		switch {
		case err == nil:
			return true, nil
		case !errors.Is(err, virt.ErrJobActive) || attempt >= 20 || ctx.Err() != nil:
			return c.abort(dom, target), err
		}
		time.Sleep(c.pollEvery()) // READY seen but libvirt not there yet
	}
}

// abort cancels the job and waits (bounded) until libvirt reports it gone,
// so no job is left dangling when the tool exits; it reports whether the
// job is gone.
func (c *Consolidator) abort(dom Domain, target string) bool {
	if err := dom.AbortJob(target); err != nil {
		// "No active block job" is what we want; anything else is worth
		// knowing while we wait for the job to go.
		if active, aerr := jobActive(dom, target); aerr != nil || active {
			c.P.Warn("Aborting the block job on disk '%s' of '%s' failed: %s", target, dom.Name(), virt.Describe(err))
		}
	}
	for end := time.Now().Add(abortWait); ; {
		active, err := jobActive(dom, target)
		if err == nil && !active {
			return true
		}
		if err != nil && errors.Is(err, virt.ErrNotRunning) {
			return true // the domain is gone, and its jobs with it
		}
		if time.Now().After(end) {
			return false
		}
		time.Sleep(min(c.pollEvery(), 100*time.Millisecond))
	}
}

// Recover finishes a block job a killed run left (its journal record):
// the job now on the journal's disk is aborted when it is that very job
// (same kind, top and base) — the disk stays on its previous chain — and
// left alone otherwise. The record is removed either way. The caller holds
// the domain's lock; the domain runs.
func (c *Consolidator) Recover(dom Domain, rec *journal.Record) error {
	name := dom.Name()
	ours, other, err := journaled(dom, rec)
	if err != nil {
		c.P.Err("Cannot check the block job left on disk '%s' of '%s': %s", rec.Disk, name, virt.Describe(err))
		return ErrFailed
	}
	switch {
	case ours:
		c.P.Warn("Aborting the %s job on disk '%s' of '%s' left by an interrupted fi-backup run (pid %d); the disk stays on its previous chain", rec.Kind, rec.Disk, name, rec.PID)
		if !c.abort(dom, rec.Disk) {
			c.P.Err("The block job on disk '%s' of '%s' is still active", rec.Disk, name)
			return ErrFailed
		}
	case other != "":
		c.P.Warn("A %s job runs on disk '%s' of '%s', but not the %s job an interrupted fi-backup run started: leaving it alone", other, rec.Disk, name, rec.Kind)
	}
	c.clearJournal(name)
	return nil
}

// journaled tells whether the job now on the record's disk is the one the
// record describes, or names the kind of another job found there.
func journaled(dom Domain, rec *journal.Record) (ours bool, other string, err error) {
	info, d, err := jobState(dom, rec.Disk)
	if err != nil || !info.Active {
		return false, "", err
	}
	typ := info.Type
	if typ == virt.JobTypeUnknown && d.Mirror != nil && d.Mirror.Job == "active-commit" {
		typ = virt.JobTypeActiveCommit // libvirtd still reconnecting: the XML knows
	}
	if !Matches(rec, typ, d) {
		return false, typ.String(), nil
	}
	return true, "", nil
}

// Matches is the identity check of a journaled job: its kind, then the
// files it works on, where the record and libvirt both tell them.
func Matches(rec *journal.Record, typ virt.JobType, d virt.Disk) bool {
	switch rec.Kind {
	case KindCommit:
		if typ != virt.JobTypeActiveCommit && typ != virt.JobTypeCommit {
			return false
		}
		if rec.Base != "" && d.Mirror != nil && d.Mirror.Source != "" && d.Mirror.Source != rec.Base {
			return false
		}
	case KindPull:
		if typ != virt.JobTypePull {
			return false
		}
	default:
		return false
	}
	return rec.Top == "" || d.Source == rec.Top
}

// jobState asks both libvirt's job info and the live XML: right after a
// libvirtd restart the job info can report no job while the disk is still
// mirrored (libvirtd is re-reading QEMU's state).
func jobState(dom Domain, target string) (virt.JobInfo, virt.Disk, error) {
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

func jobActive(dom Domain, target string) (bool, error) {
	info, _, err := jobState(dom, target)
	return info.Active, err
}
