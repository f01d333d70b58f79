// Package blockjob consolidates a running domain's backing chain with a
// libvirt block job, as the old tool's -c and -C did, without its ways of
// losing data:
//
//	blockcommit: base ← bimg-T1 ← bimg-T2 (active)  becomes  base (active)
//	blockpull:   base ← bimg-T1 ← bimg-T2 (active)  becomes  bimg-T2 (active, standalone)
//
// Only this tool's own overlays are merged: with none on top of a disk there
// is nothing to do (a commit would write the disk's own image into a golden
// image below it). A commit goes into an explicit base, the first image
// below the top that is not one of those overlays — never into a template
// other domains use (B8), and never while another domain's chain cannot be
// read (fail closed). The job is waited for through libvirt's events,
// registered before it starts, with a poll as safety net; a commit is
// pivoted only once READY (B41). A timeout, a failure or a signal aborts the
// job, which leaves the disk on its previous, valid chain. Afterwards only
// files that left the chain in this job, carry the overlay name and no other
// domain uses are deleted (B7).
//
// A job outlives the process that started it, so it is journaled (see
// package journal) before it starts; Recover aborts the journaled job — and
// no other — when a later run finds it.
package blockjob

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/progress"
	"github.com/fi-backup/fi-backup/internal/snapshot"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// Method is a consolidation method, as -m names it.
type Method string

// Consolidation methods.
const (
	Commit Method = "blockcommit"
	Pull   Method = "blockpull"
)

// Journal kinds of the block jobs (the method names).
const (
	KindCommit = string(Commit)
	KindPull   = string(Pull)
)

// Domain is what consolidation needs of a domain; virt.Domain has it.
type Domain interface {
	Name() string
	State() (virt.State, error)
	Disks() ([]virt.Disk, error)
	WatchJobs() (events <-chan virt.JobEvent, stop func(), err error)
	StartJob(kind virt.JobKind, target, base string, bandwidth uint64) error
	JobInfo(target string) (virt.JobInfo, error)
	Pivot(target string) error
	AbortJob(target string) error
}

// Users tells which files other domains use; *chains.Users has it.
type Users interface {
	Of(path string) string
	Complete() bool
	Why() string
}

// ErrFailed means a consolidation failed; the reason has been reported.
var ErrFailed = errors.New("consolidation failed")

// ErrTimeout means a block job did not become ready in time.
var ErrTimeout = errors.New("block job timed out")

// Consolidator runs consolidations with one method and one set of limits.
type Consolidator struct {
	P         *logging.Printer
	Journal   journal.Store
	Method    Method
	Timeout   time.Duration // per job; 30 minutes when 0
	Bandwidth uint64        // bytes/s per job; 0: unlimited
	PollEvery time.Duration // safety-net poll; 200 ms when 0
	// Bar, when set, gives the progress display's bar of a disk's job.
	Bar func(target string) *progress.Bar
}

func (c *Consolidator) pollEvery() time.Duration {
	if c.PollEvery > 0 {
		return c.PollEvery
	}
	return 200 * time.Millisecond
}

// Domain consolidates every file disk of a running domain, with the old
// tool's lines. Each disk is tried; any failure fails the domain (B35).
func (c *Consolidator) Domain(ctx context.Context, dom Domain, users Users) error {
	name := dom.Name()
	st, err := dom.State()
	if err != nil || st != virt.StateRunning {
		c.P.Err("Error: Consolidation requires '%s' to be running", name)
		return ErrFailed
	}
	return c.eachDisk(ctx, dom, string(c.Method), func(d virt.Disk) error {
		return c.disk(ctx, dom, d, users)
	})
}

// eachDisk runs consolidate on every file disk of dom, with the old tool's
// debug lines (method is what the "Consolidation method" line says). Each
// disk is tried (B35); any failure, or an interruption before a disk's
// turn, fails the domain.
func (c *Consolidator) eachDisk(ctx context.Context, dom interface {
	Name() string
	Disks() ([]virt.Disk, error)
}, method string, consolidate func(virt.Disk) error) error {
	name := dom.Name()
	all, err := dom.Disks()
	if err != nil {
		c.P.Err("Cannot read the disks of '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	disks := virt.FileDisks(all)
	paths := make([]string, len(disks))
	for i, d := range disks {
		paths[i] = d.Source
	}
	c.P.Debug("Consolidation of block devices for '%s' requested", name)
	c.P.Debug("Block devices to be consolidated:\n\t%s", strings.Join(paths, " "))
	c.P.Debug("Consolidation method: %s", method)
	failed := false
	for i, d := range disks {
		if ctx.Err() != nil {
			failed = true
			break
		}
		c.P.Debug("Consolidation of '%d' block device: '%s' for '%s'", i, d.Source, name)
		if err := consolidate(d); err != nil {
			failed = true
		}
	}
	if failed {
		return ErrFailed
	}
	return nil
}

func (c *Consolidator) disk(ctx context.Context, dom Domain, d virt.Disk, users Users) error {
	name := dom.Name()
	fail := func(format string, a ...any) error {
		c.P.Err("Error consolidating block device '%s' for '%s':%s", d.Source, name, fmt.Sprintf(format, a...))
		return ErrFailed
	}
	if snapshot.Complete(d) != nil {
		return fail(" its backing chain is unknown")
	}
	if len(d.Chain) < 2 {
		c.P.Debug("No backing file found for '%s'. Nothing to do.", d.Source)
		return nil
	}
	base, ok := Base(d.Chain)
	if !ok {
		c.P.Info("No backup overlay (.bimg-) on top of '%s' for '%s'. Nothing to do.", d.Source, name)
		return nil
	}
	c.P.Debug("Parent block device: '%s'", d.Chain[1].Path)
	c.P.ChainWalk(virt.Paths(d.Chain))
	kind := virt.JobPull
	if c.Method == Commit {
		kind = virt.JobCommit
		if u := users.Of(base); u != "" {
			return fail("\n '%s' is in the backing chain of domain '%s': committing into it would change that domain's disk", base, u)
		}
		if !users.Complete() {
			return fail("\n cannot check whether other domains use '%s' (%s)", base, users.Why())
		}
		c.P.Debug("Committing into '%s'", base)
	} else {
		base = ""
	}
	start := time.Now()
	if err := c.run(ctx, dom, kind, d.Target, d.Source, base); err != nil {
		return fail("\n %s", virt.Describe(err))
	}
	after, err := diskByTarget(dom, d.Target)
	if err != nil {
		return fail("\n cannot re-read the disk: %s", virt.Describe(err))
	}
	if err := CheckResult(kind, base, d.Chain, after); err != nil {
		return fail("\n %v", err)
	}
	c.P.Verb("Consolidation of block device '%s' for '%s' successful", d.Source, name)
	c.P.Debug("Consolidation of '%s' took %.3fs", d.Source, time.Since(start).Seconds())
	if kind == virt.JobCommit {
		c.P.Debug("Not deleting last element of snapshot_chain (top parent) since consolidation method='blockcommit'")
	} else {
		c.P.Debug("Not deleting 0th element of snapshot_chain (last child) since consolidation method='blockpull'")
	}
	c.deleteLeftovers(name, d.Chain, after.Chain, users)
	return nil
}

// Base is the image the overlays on top of a chain (top first) are
// committed into: the first image below the top whose name is not a
// .bimg- overlay of this tool; if every image is one (after a blockpull the
// disk's standalone image carries an overlay name), the bottom one. ok is
// false when the top is not one of this tool's overlays: then there is
// nothing of ours to consolidate.
func Base(chain []virt.Image) (base string, ok bool) {
	if len(chain) < 2 || !snapshot.IsOverlay(chain[0].Path) {
		return "", false
	}
	for _, img := range chain[1:] {
		if !snapshot.IsOverlay(img.Path) {
			return img.Path, true
		}
	}
	return chain[len(chain)-1].Path, true
}

// CheckResult confirms in the live XML that the job did what it should.
func CheckResult(kind virt.JobKind, base string, before []virt.Image, after virt.Disk) error {
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

func diskByTarget(dom interface{ Disks() ([]virt.Disk, error) }, target string) (virt.Disk, error) {
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

// Deletion is what the deletion rule decides for one file that left a
// chain: delete it, or keep it with the reason (the text of a [WAR]).
type Deletion struct {
	Path   string
	Delete bool
	Keep   string
}

// Leftovers applies the deletion rule to the files that were in the chain
// before the job and are not after it: a file is deleted only when it
// carries this tool's overlay name and no other domain uses it (or may use
// it: a chain that could not be read).
func Leftovers(before, after []virt.Image, users Users) []Deletion {
	inAfter := map[string]bool{}
	for _, img := range after {
		inAfter[img.Path] = true
	}
	var out []Deletion
	for _, img := range before {
		f := img.Path
		if inAfter[f] {
			continue
		}
		d := Deletion{Path: f}
		switch {
		case users.Of(f) != "":
			d.Keep = fmt.Sprintf("'%s' is in use by domain '%s' and must stay. Not deleting it", f, users.Of(f))
		case !users.Complete():
			d.Keep = fmt.Sprintf("'%s' may be in use by another domain (%s). Not deleting it", f, users.Why())
		case !snapshot.IsOverlay(f):
			d.Keep = fmt.Sprintf("'%s' doesn't seem to be a backup backing file image. Not deleting it (manual intervention required)", f)
		default:
			d.Delete = true
		}
		out = append(out, d)
	}
	return out
}

func (c *Consolidator) deleteLeftovers(name string, before, after []virt.Image, users Users) {
	dels := Leftovers(before, after, users)
	if len(dels) == 0 {
		return
	}
	c.P.Verb("Deleting old backing files for '%s'", name)
	for _, d := range dels {
		if !d.Delete {
			c.P.Warn("%s", d.Keep)
			continue
		}
		c.P.Verb("Deleting old backing file '%s' for '%s'", d.Path, name)
		if err := os.Remove(d.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
			c.P.Warn("Could not delete file '%s'! %v", d.Path, err)
		}
	}
}
