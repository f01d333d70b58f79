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
	users := r.otherUsers(ctx, name)
	failed := false
	for i, d := range disks {
		if ctx.Err() != nil {
			failed = true
			break
		}
		r.P.Debug("Consolidation of '%d' block device: '%s' for '%s'", i, d.Source, name)
		if err := r.consolidateDisk(ctx, dom, d, users); err != nil {
			failed = true // B35: the other disks still get their turn
		}
	}
	if failed {
		return ErrFailed
	}
	return nil
}

// chainWalkLines prints the old tool's debug lines of its chain walk: for
// chain top, parent, grandparent, ... it named each file from the
// grandparent down, then an empty name where the chain ended.
func (r *Runner) chainWalkLines(chain []virt.Image) {
	if len(chain) < 2 {
		return
	}
	for _, img := range chain[2:] {
		r.P.Debug("Next file in backing file chain: '%s'", img.Path)
	}
	r.P.Debug("Next file in backing file chain: ''")
}

func (r *Runner) consolidateDisk(ctx context.Context, dom virt.Domain, d virt.Disk, users hostUsers) error {
	name := dom.Name()
	if d.ChainErr != nil || !d.Complete {
		r.P.Err("Error consolidating block device '%s' for '%s': its backing chain is unknown", d.Source, name)
		return ErrFailed
	}
	if len(d.Chain) < 2 {
		r.P.Debug("No backing file found for '%s'. Nothing to do.", d.Source)
		return nil
	}
	if !virt.IsOverlay(d.Source) {
		// Only this tool's own overlays are ever merged. Without one on
		// top, a commit would write the disk's own image into what lies
		// below it (a golden image, a template), and a pull would copy
		// that into the disk: neither is consolidation of a backup chain.
		r.P.Info("No backup overlay (.bimg-) on top of '%s' for '%s'. Nothing to do.", d.Source, name)
		return nil
	}
	r.P.Debug("Parent block device: '%s'", d.Chain[1].Path)
	r.chainWalkLines(d.Chain)
	before := d.Chain
	kind, base := virt.JobPull, ""
	if r.Method == "blockcommit" {
		kind, base = virt.JobCommit, commitBase(before)
		if u := users.of(base); u != "" {
			r.P.Err("Error consolidating block device '%s' for '%s':\n '%s' is in the backing chain of domain '%s': committing into it would change that domain's disk", d.Source, name, base, u)
			return ErrFailed
		}
		if !users.complete() {
			r.P.Err("Error consolidating block device '%s' for '%s':\n cannot check whether other domains use '%s'", d.Source, name, base)
			return ErrFailed
		}
		r.P.Debug("Committing into '%s'", base)
	}
	start := time.Now()
	if err := r.runJob(ctx, dom, kind, d.Target, d.Source, base); err != nil {
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
	r.deleteLeftovers(name, before, after.Chain, users)
	return nil
}

// commitBase is the image the overlays on top of the chain are committed
// into: the first image below the top whose name is not a
// .bimg-YYYYMMDD-HHMMSS overlay; if every image is one (after a blockpull
// the disk's standalone image carries an overlay name), the bottom one.
// The caller has checked that the top is one of this tool's overlays.
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
func (r *Runner) runJob(ctx context.Context, dom virt.Domain, kind virt.JobKind, target, top, base string) error {
	events, stop, err := dom.WatchJobs()
	if err != nil {
		return err
	}
	defer stop()
	j := jobJournal{Domain: dom.Name(), Disk: target, Kind: journalPull, Top: top, Base: base}
	if kind == virt.JobCommit {
		j.Kind = journalCommit
	}
	if err := r.writeJournal(j); err != nil {
		return fmt.Errorf("write job journal: %w", err)
	}
	if err := dom.StartJob(kind, target, base, uint64(max(r.RateLimit, 0))); err != nil {
		// The call may have failed after the job started (a connection
		// lost mid-call): keep the journal only while the job it
		// describes is there, so the next run never aborts another job.
		if ours, _, jerr := r.journaledJob(dom, &j); jerr == nil && !ours {
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
	if err := dom.AbortJob(target); err != nil {
		// "No active block job" is what we want; anything else is worth
		// knowing while we wait for the job to go.
		if active, aerr := jobActive(dom, target); aerr != nil || active {
			r.P.Warn("Aborting the block job on disk '%s' of '%s' failed: %s", target, dom.Name(), virt.Describe(err))
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
		time.Sleep(min(r.pollEvery(), 100*time.Millisecond))
	}
}

// abortWait bounds the wait for libvirt to report an aborted job gone.
const abortWait = 15 * time.Second

// deleteLeftovers removes the files that left the chain in this job, when
// they carry this tool's overlay name and no other domain uses them.
func (r *Runner) deleteLeftovers(name string, before, after []virt.Image, users hostUsers) {
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
		case users.of(f) != "":
			r.P.Warn("'%s' is in use by domain '%s' and must stay. Not deleting it", f, users.of(f))
		case !users.complete():
			r.P.Warn("'%s' may be in use by another domain (%s). Not deleting it", f, users.why())
		case !virt.IsOverlay(f):
			r.P.Warn("'%s' doesn't seem to be a backup backing file image. Not deleting it (manual intervention required)", f)
		default:
			r.P.Verb("Deleting old backing file '%s' for '%s'", f, name)
			if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
				r.P.Warn("Could not delete file '%s'! %v", f, err)
			}
		}
	}
}

// hostUsers maps the images in the chains of the other defined domains to
// a domain using each. unreadable names the domains whose chains could not
// be read completely: what they use beyond what is listed is unknown, so
// nothing may be assumed unused (fail closed).
type hostUsers struct {
	users      map[string]string
	unreadable []string
}

func (h hostUsers) of(path string) string { return h.users[path] }
func (h hostUsers) complete() bool        { return len(h.unreadable) == 0 }
func (h hostUsers) why() string {
	return "the backing chain of " + strings.Join(h.unreadable, ", ") + " could not be read"
}

// otherUsers reads the chains of every other defined domain (live XML for
// running ones, qemu-img for the others). Each domain whose chain cannot be
// read is named in a [WAR].
func (r *Runner) otherUsers(ctx context.Context, self string) hostUsers {
	h := hostUsers{users: map[string]string{}}
	names, err := r.Hyp.List(virt.ListAll)
	if err != nil {
		r.P.Warn("Cannot list domains to check shared backing files: %s", virt.Describe(err))
		h.unreadable = append(h.unreadable, "every other domain")
		return h
	}
	for _, n := range names {
		if n == self {
			continue
		}
		if err := r.addUsers(ctx, &h, n); err != nil {
			r.P.Warn("Cannot read the backing chain of domain '%s': %v", n, err)
			h.unreadable = append(h.unreadable, "domain '"+n+"'")
		}
	}
	return h
}

func (r *Runner) addUsers(ctx context.Context, h *hostUsers, n string) error {
	dom, err := r.Hyp.Lookup(n)
	if errors.Is(err, virt.ErrNoDomain) {
		return nil // undefined meanwhile
	}
	if err != nil {
		return errors.New(virt.Describe(err))
	}
	disks, err := dom.Disks()
	_ = dom.Close()
	if err != nil {
		return errors.New(virt.Describe(err))
	}
	var failed error
	for _, d := range backupDisks(disks) {
		chain := d.Chain
		if !d.Complete { // inactive XML: ask qemu-img
			c, err := r.tool().Chain(ctx, d.Source)
			if err != nil {
				// What is listed is still taken as used; the rest of the
				// chain is unknown.
				failed = fmt.Errorf("disk '%s': %v", d.Target, err)
			}
			for _, img := range c {
				chain = append(chain, virt.Image{Path: img.Path})
			}
		}
		for _, img := range chain {
			h.users[img.Path] = n
		}
	}
	return failed
}
