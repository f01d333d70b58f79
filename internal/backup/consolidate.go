package backup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/fi-backup/fi-backup/internal/virt"
)

// Consolidation shrinks a running disk's chain.
//
//	blockcommit: base ← bimg-T1 ← bimg-T2 (active)  becomes  base (active)
//	blockpull:   base ← bimg-T1 ← bimg-T2 (active)  becomes  bimg-T2 (active, standalone)
//
// The commit goes into an explicit base, the first image below the top that
// is not one of this tool's overlays, never into a template shared by other
// domains below it (B8). Afterwards only files that left the chain in this
// job, carry the overlay name and no other domain uses are deleted (B7).

// ErrJobTimeout means a block job did not become ready in time.
var ErrJobTimeout = errors.New("block job timed out")

func (r *Runner) consolidate(ctx context.Context, dom virt.Domain) error {
	name := dom.Name()
	st, err := dom.State()
	if err != nil || st != virt.StateRunning {
		r.P.Err("Error: Consolidation requires '%s' to be running", name)
		return ErrFailed
	}
	all, err := dom.Disks()
	if err != nil {
		r.P.Err("Cannot read the disks of '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	disks := backupDisks(all)
	paths := make([]string, len(disks))
	for i, d := range disks {
		paths[i] = d.Source
	}
	r.P.Debug("Consolidation of block devices for '%s' requested", name)
	r.P.Debug("Block devices to be consolidated:\n\t%s", strings.Join(paths, " "))
	r.P.Debug("Consolidation method: %s", r.Method)
	// Read the other domains' chains before any job: a commit must not
	// write into a file they use, and no file they use may be deleted.
	users, usersOK := r.otherUsers(ctx, name)
	failed := false
	for i, d := range disks {
		if ctx.Err() != nil {
			failed = true
			break
		}
		r.P.Debug("Consolidation of '%d' block device: '%s' for '%s'", i, d.Source, name)
		if err := r.consolidateDisk(ctx, dom, d, users, usersOK); err != nil {
			failed = true // B35: the other disks still get their turn
		}
	}
	if failed {
		return ErrFailed
	}
	return nil
}

func (r *Runner) consolidateDisk(ctx context.Context, dom virt.Domain, d virt.Disk, users map[string]string, usersOK bool) error {
	name := dom.Name()
	if d.ChainErr != nil || !d.Complete {
		r.P.Err("Error consolidating block device '%s' for '%s': its backing chain is unknown", d.Source, name)
		return ErrFailed
	}
	if len(d.Chain) < 2 {
		r.P.Debug("No backing file found for '%s'. Nothing to do.", d.Source)
		return nil
	}
	r.P.Debug("Parent block device: '%s'", d.Chain[1].Path)
	before := d.Chain
	kind, base := virt.JobPull, ""
	if r.Method == "blockcommit" {
		kind, base = virt.JobCommit, commitBase(before)
		if u := users[base]; u != "" {
			r.P.Err("Error consolidating block device '%s' for '%s':\n '%s' is in the backing chain of domain '%s': committing into it would change that domain's disk", d.Source, name, base, u)
			return ErrFailed
		}
		if !usersOK {
			r.P.Err("Error consolidating block device '%s' for '%s':\n cannot check whether other domains use '%s'", d.Source, name, base)
			return ErrFailed
		}
		r.P.Debug("Committing into '%s'", base)
	}
	start := time.Now()
	if err := r.runJob(ctx, dom, kind, d.Target, base); err != nil {
		r.P.Err("Error consolidating block device '%s' for '%s':\n %s", d.Source, name, virt.Describe(err))
		return ErrFailed
	}
	after, err := diskByTarget(dom, d.Target)
	if err != nil {
		r.P.Err("Error consolidating block device '%s' for '%s':\n cannot re-read the disk: %s", d.Source, name, virt.Describe(err))
		return ErrFailed
	}
	if err := checkResult(kind, base, before, after); err != nil {
		r.P.Err("Error consolidating block device '%s' for '%s':\n %v", d.Source, name, err)
		return ErrFailed
	}
	r.P.Verb("Consolidation of block device '%s' for '%s' successful", d.Source, name)
	r.P.Debug("Consolidation of '%s' took %s", d.Source, fmtDur(time.Since(start)))
	if kind == virt.JobCommit {
		r.P.Debug("Not deleting last element of snapshot_chain (top parent) since consolidation method='blockcommit'")
	} else {
		r.P.Debug("Not deleting 0th element of snapshot_chain (last child) since consolidation method='blockpull'")
	}
	r.deleteLeftovers(name, before, after.Chain, users, usersOK)
	return nil
}

// commitBase is the first image below the top whose name is not a
// .bimg-YYYYMMDD-HHMMSS overlay; if every image is one, the bottom one.
func commitBase(chain []virt.Image) string {
	for _, img := range chain[1:] {
		if !virt.IsOverlay(img.Path) {
			return img.Path
		}
	}
	return chain[len(chain)-1].Path
}

func diskByTarget(dom virt.Domain, target string) (virt.Disk, error) {
	disks, err := dom.Disks()
	if err != nil {
		return virt.Disk{}, err
	}
	for _, d := range disks {
		if d.Target == target {
			return d, nil
		}
	}
	return virt.Disk{}, fmt.Errorf("disk %s vanished from the domain", target)
}

// checkResult confirms in the live XML that the job did what it should.
func checkResult(kind virt.JobKind, base string, before []virt.Image, after virt.Disk) error {
	switch kind {
	case virt.JobCommit:
		if after.Source != base {
			return fmt.Errorf("after the pivot the disk runs on '%s', not on '%s'", after.Source, base)
		}
	case virt.JobPull:
		if after.Source != before[0].Path || len(after.Chain) != 1 {
			return fmt.Errorf("after the pull '%s' still has %d backing files", after.Source, len(after.Chain)-1)
		}
	}
	return nil
}

// runJob starts a block job and waits for it: READY then pivot for a
// commit, COMPLETED for a pull. Events are registered before the job starts
// (READY can arrive before the start call returns); a poll of the live XML
// and job info is the safety net. On timeout or cancellation the job is
// aborted, which leaves the domain on its old, valid chain.
func (r *Runner) runJob(ctx context.Context, dom virt.Domain, kind virt.JobKind, target, base string) error {
	events, stop, err := dom.WatchJobs()
	if err != nil {
		return err
	}
	defer stop()
	kindName := "blockpull"
	if kind == virt.JobCommit {
		kindName = "blockcommit"
	}
	if err := r.writeJournal(jobJournal{Domain: dom.Name(), Disk: target, Kind: kindName, Base: base}); err != nil {
		return fmt.Errorf("write job journal: %w", err)
	}
	if err := dom.StartJob(kind, target, base); err != nil {
		// The call may have failed after the job started (a connection
		// lost mid-call): keep the journal unless no job is there.
		if active, aerr := jobActive(dom, target); aerr == nil && !active {
			r.clearJournal(dom.Name())
		}
		return err
	}
	over, err := r.waitJob(ctx, dom, events, kind, target)
	// The journal goes only when the job is known to be over; a process
	// killed, or a connection lost, before that leaves it for the next
	// run's recoverJobs.
	if over {
		r.clearJournal(dom.Name())
	}
	return err
}

// waitJob waits for the job's end; over reports whether libvirt no longer
// runs it (finished, pivoted, failed, or aborted by us).
func (r *Runner) waitJob(ctx context.Context, dom virt.Domain, events <-chan virt.JobEvent, kind virt.JobKind, target string) (over bool, err error) {
	timeout := r.JobTimeout
	if timeout <= 0 {
		timeout = 30 * time.Minute
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(r.pollEvery())
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return r.abortJob(dom, target), fmt.Errorf("interrupted: block job aborted, '%s' stays on its previous chain", target)
		case <-deadline.C:
			return r.abortJob(dom, target), fmt.Errorf("%w: not finished after %s; job aborted, the disk stays on its previous chain", ErrJobTimeout, timeout)
		case ev := <-events:
			if ev.Disk != target {
				continue
			}
			switch ev.Status {
			case virt.JobReady:
				if kind == virt.JobCommit {
					return r.pivot(ctx, dom, target)
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
			ready, gone, err := r.pollJob(dom, kind, target)
			switch {
			case err != nil:
				return gone, err
			case ready && kind == virt.JobCommit:
				return r.pivot(ctx, dom, target)
			case ready:
				return true, nil
			}
		}
	}
}

// pollJob reports READY (commit) or finished (pull) from libvirt's state.
// gone means the job no longer exists although it did not do its work (the
// domain stopped, someone aborted it): err says why.
func (r *Runner) pollJob(dom virt.Domain, kind virt.JobKind, target string) (ready, gone bool, err error) {
	info, err := dom.JobInfo(target)
	switch {
	case errors.Is(err, virt.ErrNotRunning):
		return false, true, errors.New("the domain stopped during the block job")
	case err != nil:
		return false, false, err
	case kind == virt.JobPull:
		return !info.Active, false, nil
	case !info.Active:
		return false, true, errors.New("the block job ended without becoming ready")
	}
	d, err := diskByTarget(dom, target)
	if err != nil {
		return false, false, err
	}
	return d.Mirror != nil && d.Mirror.Ready == "yes", false, nil
}

func (r *Runner) pivot(ctx context.Context, dom virt.Domain, target string) (over bool, err error) {
	for attempt := 0; ; attempt++ {
		err := dom.Pivot(target)
		switch {
		case err == nil:
			return true, nil
		case !errors.Is(err, virt.ErrJobActive) || attempt >= 20 || ctx.Err() != nil:
			return r.abortJob(dom, target), err
		}
		time.Sleep(r.pollEvery()) // READY seen but libvirt not there yet
	}
}

// abortJob cancels the job and waits (bounded) until libvirt reports it
// gone, so no job is left dangling when the tool exits; it reports whether
// the job is gone.
func (r *Runner) abortJob(dom virt.Domain, target string) bool {
	_ = dom.AbortJob(target)
	for i := 0; i < 150; i++ {
		active, err := jobActive(dom, target)
		if err == nil && !active {
			return true
		}
		if err != nil && errors.Is(err, virt.ErrNotRunning) {
			return true // the domain is gone, and its jobs with it
		}
		time.Sleep(100 * time.Millisecond)
	}
	return false
}

// deleteLeftovers removes the files that left the chain in this job, when
// they carry this tool's overlay name and no other domain uses them.
func (r *Runner) deleteLeftovers(name string, before, after []virt.Image, users map[string]string, usersOK bool) {
	inAfter := map[string]bool{}
	for _, img := range after {
		inAfter[img.Path] = true
	}
	var gone []string
	for _, img := range before {
		if !inAfter[img.Path] {
			gone = append(gone, img.Path)
		}
	}
	if len(gone) == 0 {
		return
	}
	r.P.Verb("Deleting old backing files for '%s'", name)
	for _, f := range gone {
		switch {
		case !usersOK:
			r.P.Warn("'%s' may be used by another domain (the domain list could not be read). Not deleting it", f)
		case !virt.IsOverlay(f):
			r.P.Warn("'%s' doesn't seem to be a backup backing file image. Not deleting it (manual intervention required)", f)
		case users[f] != "":
			r.P.Warn("'%s' is in the backing chain of domain '%s'. Not deleting it", f, users[f])
		default:
			r.P.Verb("Deleting old backing file '%s' for '%s'", f, name)
			if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
				r.P.Warn("Could not delete file '%s'! %v", f, err)
			}
		}
	}
}

// otherUsers maps every image in the chains of the other defined domains to
// a domain using it. ok is false when some domain's chain could not be
// read: then nothing may be assumed unused.
func (r *Runner) otherUsers(ctx context.Context, self string) (users map[string]string, ok bool) {
	users = map[string]string{}
	names, err := r.Hyp.List(virt.ListAll)
	if err != nil {
		r.P.Warn("Cannot list domains to check shared backing files: %s", virt.Describe(err))
		return users, false
	}
	ok = true
	for _, n := range names {
		if n == self {
			continue
		}
		dom, err := r.Hyp.Lookup(n)
		if errors.Is(err, virt.ErrNoDomain) {
			continue // undefined meanwhile
		}
		if err != nil {
			ok = false
			continue
		}
		disks, err := dom.Disks()
		_ = dom.Close()
		if err != nil {
			ok = false
			continue
		}
		for _, d := range backupDisks(disks) {
			chain := d.Chain
			if !d.Complete { // inactive XML: ask qemu-img
				c, err := r.tool().Chain(ctx, d.Source)
				if err != nil {
					// Its chain is unreadable (a missing link, say): what is
					// listed in the XML is still taken as used.
					r.P.Debug("Cannot read the chain of '%s' of domain '%s': %v", d.Source, n, err)
				}
				for _, img := range c {
					chain = append(chain, virt.Image{Path: img.Path})
				}
			}
			for _, img := range chain {
				users[img.Path] = n
			}
		}
	}
	return users, ok
}
