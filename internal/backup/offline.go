package backup

import (
	"context"
	"strings"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/report"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// offline handles a domain that is not running, under its lock: a copy
// with cp -up semantics (mode, owner and times kept), and with -c or -C, for
// a shut-off domain, a consolidation with qemu-img (blockjob.Offline).
func (r *Runner) offline(ctx context.Context, dom virt.Domain, before virt.State) error {
	name := dom.Name()
	if r.cfg.DumpDir != "" {
		r.p.Warn("Domain '%s' is not running: no state dump (-s) for it", name)
	}
	refused := false
	if r.cfg.Consolidate && before != virt.StateShutoff {
		// QEMU holds a paused domain's images: neither a block job nor
		// qemu-img may merge them. The old refusal, with an honest exit
		// code even under "all", where the old tool went on with the copy.
		r.p.Err("Consolidation only works with running domains. '%s' is not running! Doing full backup only of '%s'", name, name)
		if !r.cfg.AllKeyword || r.dir == nil {
			r.p.Err("Skipping consolidation/backup of '%s'", name)
			return ErrFailed
		}
		r.p.Debug("Doing full backup (not consolidation) of '%s'", name)
		refused = true
	}
	if r.cfg.Snapshot || refused {
		if err := r.copyOffline(ctx, dom, before); err != nil {
			return err
		}
	}
	if refused {
		return ErrFailed
	}
	if r.cfg.Consolidate {
		return r.consolidated(func() error {
			return r.jobs.Offline(ctx, dom, r.images, r.chains.OfFile, r.chains.Others(ctx, name, false))
		}, true)
	}
	return nil
}

// copyOffline copies a domain that is not running with cp -up semantics
// and records its restore point.
func (r *Runner) copyOffline(ctx context.Context, dom virt.Domain, before virt.State) error {
	name := dom.Name()
	if r.dir == nil {
		r.needsBackupDir(name, before)
		return ErrFailed
	}
	if !r.dir.Exists() {
		r.p.Err("Backup directory '%s' doesn't exist", r.dir.Path)
		return ErrFailed
	}
	all, err := dom.Disks()
	if err != nil {
		r.p.Err("Cannot read the disks of '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	// The inactive XML does not describe chains: ask qemu-img, for every
	// disk, before anything is copied.
	disks := virt.FileDisks(all)
	chains := make([][]virt.Image, len(disks))
	var files []string
	failed := false
	for i, d := range disks {
		c, err := r.chains.OfFile(ctx, d.Source)
		if err != nil {
			r.p.Err("Unable to read the backing chain of %s: %v", d.Source, err)
			failed = true
			continue
		}
		chains[i] = c
		files = append(files, virt.Paths(c)...)
	}
	if !failed {
		if err := r.dir.Admit(name, files, r.holder(ctx, name, files)); err != nil {
			return ErrFailed
		}
	}
	at := r.now()
	var listed oldFileList
	var done []copied
	for i, d := range disks {
		if chains[i] == nil {
			continue
		}
		r.offlineWalkLines(d.Source, chains[i], &listed)
		r.act(report.ActionOffline)
		r.chainsCopied(d.Target, d.Source, chains[i])
		files, err := r.dir.CopyChain(ctx, name, chains[i], true)
		if err != nil {
			failed = true
		} else {
			done = append(done, copied{disk: d, top: chains[i][0], chain: chains[i], files: files})
		}
		if ctx.Err() != nil {
			break
		}
	}
	r.p.Debug("All %d block files for '%s': %s : %s", len(listed.files), name, listed.lastDisk, strings.Join(listed.files, " "))
	// A domain started during the copy makes the copy a torn mix of
	// moments: say so instead of calling it a backup.
	after, err := dom.State()
	if err == nil && after != before && (after == virt.StateRunning || after == virt.StatePaused && before == virt.StateShutoff) {
		r.p.Err("Domain '%s' changed from %s to %s during its offline backup: the copy may be inconsistent", name, before, after)
		failed = true
	}
	if failed {
		return ErrFailed
	}
	return r.record(ctx, dom, at, backupdir.MethodOffline, all, done, "")
}

// oldFileList reproduces the list behind the old tool's "All N block files"
// debug line: per disk it wrote the first parent at index 0 and every
// parent from index 1 on into one array, which kept the longer tail of an
// earlier disk.
type oldFileList struct {
	files    []string
	lastDisk string
}

func (l *oldFileList) set(i int, v string) {
	for len(l.files) <= i {
		l.files = append(l.files, "")
	}
	l.files[i] = v
}

// offlineWalkLines prints the old tool's offline debug lines for one disk,
// in its order (top first): the file copied, then for each parent its
// name, its copy and the parent's own parent.
func (r *Runner) offlineWalkLines(disk string, chain []virt.Image, l *oldFileList) {
	dir := r.dir.Path
	r.p.Debug("Backing up: cp -up %s %s/", disk, dir)
	l.lastDisk = disk
	first := ""
	if len(chain) > 1 {
		first = chain[1].Path
	}
	l.set(0, first)
	for i := 1; i < len(chain); i++ {
		l.set(i, chain[i].Path)
		r.p.Debug("Parent block device: '%s'", chain[i].Path)
		r.p.Debug("Backing up: cp -up %s %s/", chain[i].Path, dir)
		next := ""
		if i+1 < len(chain) {
			next = chain[i+1].Path
		}
		r.p.Debug("Next file in backing file chain: '%s'", next)
	}
}
