package blockjob

import (
	"context"
	"fmt"
	"time"

	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// A shut-off domain has no QEMU to run a block job, so -c and -C merge its
// chain with qemu-img, to the same result as the live methods:
//
//	blockcommit: qemu-img commit of the overlays into the explicit base
//	             (Base), then the definition's disk points at the base
//	blockpull:   qemu-img rebase -b "" of the top (its backing files' data
//	             copied into it), then the definition loses the chain
//
// then the deletion rule removes what left the chain. While qemu-img works,
// it holds QEMU's write locks on the images, so a `virsh start` in that time
// fails ("Failed to get write lock") and nothing changes. The definition is
// changed last, and checked after: a domain started in the instant between
// the merge and the redefinition runs on the old chain, which the merge left
// intact (qemu-img commit -d keeps the overlays' data): then the old
// definition is put back and nothing is deleted. Every state a kill leaves
// is a domain whose definition names a complete, valid chain; the journal
// lets the next run delete what the finished merge left behind.

// Journal kinds of offline consolidations.
const (
	KindOfflineCommit = "offline-" + KindCommit
	KindOfflinePull   = "offline-" + KindPull
)

// IsOffline reports whether a journal kind is an offline consolidation.
func IsOffline(kind string) bool { return kind == KindOfflineCommit || kind == KindOfflinePull }

// OfflineDomain is what offline consolidation needs of a shut-off domain;
// virt.Domain has it.
type OfflineDomain interface {
	Name() string
	State() (virt.State, error)
	Disks() ([]virt.Disk, error)
	Definition() (string, error)
	Redefine(xml string) error
}

// Images is the image work offline consolidation needs; qcow2.Tool has it.
type Images interface {
	Commit(ctx context.Context, top, base string, rate int64) error
	Flatten(ctx context.Context, image, format string) error
}

// ChainOf reads the backing chain of an image file (top first).
type ChainOf func(ctx context.Context, path string) ([]virt.Image, error)

// Offline consolidates every file disk of a shut-off domain. Each disk is
// tried; any failure fails the domain.
func (c *Consolidator) Offline(ctx context.Context, dom OfflineDomain, img Images, chainOf ChainOf, users Users) error {
	method := fmt.Sprintf("%s (offline, with qemu-img: '%s' is shut off)", c.Method, dom.Name())
	return c.eachDisk(ctx, dom, method, func(d virt.Disk) error {
		return c.offlineDisk(ctx, dom, d, img, chainOf, users)
	})
}

func (c *Consolidator) offlineDisk(ctx context.Context, dom OfflineDomain, d virt.Disk, img Images, chainOf ChainOf, users Users) error {
	name := dom.Name()
	fail := func(format string, a ...any) error {
		c.P.Err("Error consolidating block device '%s' for '%s':%s", d.Source, name, fmt.Sprintf(format, a...))
		return ErrFailed
	}
	chain, err := chainOf(ctx, d.Source)
	if err != nil {
		return fail(" its backing chain is unreadable: %v", err)
	}
	if len(chain) < 2 {
		c.P.Debug("No backing file found for '%s'. Nothing to do.", d.Source)
		return nil
	}
	base, ok := Base(chain)
	if !ok {
		c.P.Info("No backup overlay (.bimg-) on top of '%s' for '%s'. Nothing to do.", d.Source, name)
		return nil
	}
	c.P.Debug("Parent block device: '%s'", chain[1].Path)
	c.P.ChainWalk(virt.Paths(chain))
	// The files the merge writes, or whose own view it changes (a commit
	// leaves the overlays between top and base meaningless on their own).
	touched := []virt.Image{chain[0]}
	kind := KindOfflinePull
	baseAt := indexOf(chain, base)
	if c.Method == Commit {
		kind = KindOfflineCommit
		touched = chain[:baseAt+1]
	}
	for _, f := range touched {
		if u := users.Of(f.Path); u != "" {
			return fail("\n '%s' is in the backing chain of domain '%s': merging would change that domain's disk", f.Path, u)
		}
	}
	if !users.Complete() {
		return fail("\n cannot check whether other domains use the files of this chain (%s)", users.Why())
	}
	before, err := dom.Definition()
	if err != nil {
		return fail("\n cannot read the definition: %s", virt.Describe(err))
	}
	rec := journal.Record{Domain: name, Kind: kind, Disk: d.Target, Top: chain[0].Path, Base: base, Chain: virt.Paths(chain)}
	if err := c.Journal.Write(rec); err != nil {
		return fail("\n cannot write the journal: %v", err)
	}
	start := time.Now()
	newSource, newFormat := chain[0].Path, chain[0].Format
	if kind == KindOfflineCommit {
		c.P.Debug("Committing into '%s' with qemu-img", base)
		err = img.Commit(ctx, chain[0].Path, base, int64(c.Bandwidth))
		newSource, newFormat = base, chain[baseAt].Format
	} else {
		c.P.Debug("Pulling the backing files of '%s' into it with qemu-img", chain[0].Path)
		err = img.Flatten(ctx, chain[0].Path, chain[0].Format)
	}
	if err != nil {
		// The definition still names the whole chain, which the merge
		// left readable: nothing to finish.
		c.clearJournal(name)
		if ctx.Err() != nil {
			return fail("\n interrupted; the disk stays on its chain")
		}
		return fail("\n %v", err)
	}
	if err := c.redefine(dom, before, d.Target, newSource, newFormat); err != nil {
		c.clearJournal(name)
		return fail("\n %v", err)
	}
	c.P.Verb("Consolidation of block device '%s' for '%s' successful", d.Source, name)
	c.P.Debug("Consolidation of '%s' took %.3fs", d.Source, time.Since(start).Seconds())
	err = c.offlineLeftovers(ctx, dom, rec, chainOf, users)
	c.clearJournal(name)
	return err
}

// redefine points the target disk of the definition at source, then checks
// what libvirt made of it: only that disk changed, and the domain was not
// started from the old definition meanwhile (it would run on the old chain:
// the old definition is put back).
func (c *Consolidator) redefine(dom OfflineDomain, before, target, source, format string) error {
	xml, err := virt.PointDisk(before, target, source, format)
	if err != nil {
		return fmt.Errorf("cannot edit the definition: %w", err)
	}
	if err := dom.Redefine(xml); err != nil {
		return fmt.Errorf("cannot redefine the domain: %s", virt.Describe(err))
	}
	restore := func(why string) error {
		if err := dom.Redefine(before); err != nil {
			return fmt.Errorf("%s, and the previous definition could not be put back: %s", why, virt.Describe(err))
		}
		return fmt.Errorf("%s: the previous definition is back, nothing is deleted", why)
	}
	after, err := dom.Definition()
	if err != nil {
		return restore(fmt.Sprintf("cannot read the new definition: %s", virt.Describe(err)))
	}
	if diff := virt.DiffOutside(before, after, target); diff != "" {
		return restore("redefining the disk changed more than the disk (" + diff + ")")
	}
	st, err := dom.State()
	if err != nil {
		return restore(fmt.Sprintf("cannot read the state: %s", virt.Describe(err)))
	}
	if st != virt.StateShutoff {
		live, err := diskByTarget(dom, target)
		if err != nil || live.Source != source {
			return restore(fmt.Sprintf("the domain was started (%s) during the consolidation, on its previous chain", st))
		}
	}
	return nil
}

// offlineLeftovers deletes, by the deletion rule, the files of the chain
// the journal recorded that the disk's chain no longer holds.
func (c *Consolidator) offlineLeftovers(ctx context.Context, dom OfflineDomain, rec journal.Record, chainOf ChainOf, users Users) error {
	d, err := diskByTarget(dom, rec.Disk)
	if err != nil {
		c.P.Warn("Cannot re-read disk '%s' of '%s' (%s): not deleting its old backing files", rec.Disk, dom.Name(), virt.Describe(err))
		return nil
	}
	after, err := chainOf(ctx, d.Source)
	if err != nil {
		c.P.Warn("Cannot read the new backing chain of '%s' (%v): not deleting its old backing files", d.Source, err)
		return nil
	}
	before := make([]virt.Image, len(rec.Chain))
	for i, p := range rec.Chain {
		before[i] = virt.Image{Path: p}
	}
	if rec.Kind == KindOfflineCommit {
		c.P.Debug("Not deleting last element of snapshot_chain (top parent) since consolidation method='blockcommit'")
	} else {
		c.P.Debug("Not deleting 0th element of snapshot_chain (last child) since consolidation method='blockpull'")
	}
	c.deleteLeftovers(dom.Name(), before, after, users)
	return nil
}

// RecoverOffline finishes an offline consolidation a killed run left: if
// the disk already runs on the merged result (the base after a commit, a
// top without backing file after a pull), what left the chain is deleted by
// the rule; otherwise the disk is on its complete old chain and nothing is
// needed (-c again merges it). The journal goes in both cases.
func (c *Consolidator) RecoverOffline(ctx context.Context, dom OfflineDomain, rec *journal.Record, chainOf ChainOf, users Users) error {
	name := dom.Name()
	defer c.clearJournal(name)
	d, err := diskByTarget(dom, rec.Disk)
	if err != nil {
		c.P.Warn("An offline consolidation of '%s' was interrupted, and disk '%s' cannot be read (%s): leaving its files alone", name, rec.Disk, virt.Describe(err))
		return nil
	}
	done := false
	switch rec.Kind {
	case KindOfflineCommit:
		done = d.Source == rec.Base
	case KindOfflinePull:
		if d.Source == rec.Top {
			chain, err := chainOf(ctx, d.Source)
			done = err == nil && len(chain) == 1
		}
	}
	if !done {
		c.P.Warn("An offline consolidation of disk '%s' of '%s' was interrupted (pid %d) before it finished: the disk stays on its chain ('%s'); run -c again to merge it", rec.Disk, name, rec.PID, d.Source)
		return nil
	}
	c.P.Warn("Finishing the offline consolidation of disk '%s' of '%s' an interrupted run (pid %d) left: deleting what left its chain", rec.Disk, name, rec.PID)
	return c.offlineLeftovers(ctx, dom, *rec, chainOf, users)
}

func indexOf(chain []virt.Image, path string) int {
	for i, img := range chain {
		if img.Path == path {
			return i
		}
	}
	return len(chain) - 1
}
