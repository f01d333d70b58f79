// Package backup runs fi-backup's per-domain work: lock, snapshot, copy of
// the read-only backing chain into the backup directory, consolidation, and
// the offline copy of domains that are not running.
//
// Online backup, one disk, three runs (T1 < T2 < T3):
//
//	host:   vm.qcow2 ← vm.bimg-T1 ← vm.bimg-T2 ← vm.bimg-T3 (active, written by the guest)
//	backup: vm.qcow2 ← vm.bimg-T1 ← vm.bimg-T2
//
// Each backup copy's backing reference is rewritten to the relative name of
// its parent copy, so the backup directory opens on its own.
package backup

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/fi-backup/fi-backup/internal/lock"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/statedump"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// Runner holds what every domain's run needs.
type Runner struct {
	P       *logging.Printer
	Hyp     virt.Hypervisor
	Prog    string // $0, for the lock contention message
	Now     func() time.Time
	LockDir string
	QemuImg string

	BackupDir   string
	DumpDir     string
	Snapshot    bool
	Consolidate bool
	Method      string // "blockcommit" or "blockpull"
	Quiesce     bool
	JobTimeout  time.Duration
	AllKeyword  bool // the positional argument was "all"
	PollEvery   time.Duration

	cleanOnce sync.Once
	claimsMu  sync.Mutex
	claims    map[string]string // backup file → source it holds in this run (B12)
}

// ErrFailed marks a domain whose failure has already been reported.
var ErrFailed = errors.New("domain failed")

func (r *Runner) tool() qcow2.Tool { return qcow2.Tool{Path: r.QemuImg} }

func (r *Runner) pollEvery() time.Duration {
	if r.PollEvery > 0 {
		return r.PollEvery
	}
	return 200 * time.Millisecond
}

// takeLock takes the domain's lock, reporting contention with the old
// message; what names the skipped phase.
func (r *Runner) takeLock(name, what string) (*lock.Lock, error) {
	l, err := lock.TryLock(r.LockDir, name)
	switch {
	case err == nil:
		return l, nil
	case errors.Is(err, lock.ErrLocked):
		r.P.Err("Another instance of %s is already running on '%s'! Skipping %s of '%s'", r.Prog, name, what, name)
	default:
		r.P.Err("Cannot lock domain '%s': %v. Skipping %s of '%s'", name, err, what, name)
	}
	return nil, ErrFailed
}

// open takes the domain's lock and looks the domain up; done closes both.
// what names the phase a lock clash skips.
func (r *Runner) open(name, what string) (virt.Domain, func(), error) {
	l, err := r.takeLock(name, what)
	if err != nil {
		return nil, nil, err
	}
	dom, err := r.Hyp.Lookup(name)
	if err != nil {
		_ = l.Unlock()
		r.P.Err("Cannot find domain '%s': %s", name, virt.Describe(err))
		return nil, nil, ErrFailed
	}
	return dom, func() { _ = dom.Close(); _ = l.Unlock() }, nil
}

// resumeLeftPaused resumes a domain an interrupted -s run left paused, under
// its lock; true when the domain runs again and should be backed up online.
func (r *Runner) resumeLeftPaused(name string) bool {
	dom, done, err := r.open(name, "backup")
	if err != nil {
		return false
	}
	defer done()
	if st, err := dom.State(); err != nil || st != virt.StatePaused {
		return false
	}
	return r.resumeAfterDump(dom)
}

// Online backs up (and/or consolidates) one running domain.
func (r *Runner) Online(ctx context.Context, name string) error {
	what := "backup"
	if !r.Snapshot {
		what = "consolidation"
	}
	dom, done, err := r.open(name, what)
	if err != nil {
		return err
	}
	defer done()
	if err := r.recoverJobs(dom); err != nil {
		return err
	}
	if r.Snapshot {
		if err := r.snapshotAndCopy(ctx, dom); err != nil {
			return err // B9: no consolidation after a failed snapshot or copy
		}
	}
	if r.Consolidate {
		if err := ctx.Err(); err != nil {
			return err
		}
		return r.consolidate(ctx, dom)
	}
	return nil
}

func (r *Runner) snapshotAndCopy(ctx context.Context, dom virt.Domain) error {
	name := dom.Name()
	ts := r.Now()
	snap := virt.SnapshotName(ts)
	r.P.Debug("Snapshot for domain '%s' requested", name)
	r.P.Debug("Using timestamp '%s'", ts.Format(virt.TimestampLayout))
	if r.BackupDir != "" {
		// Fail before the dump and the snapshot when the copy cannot work,
		// so a bad backup directory neither pauses the guest nor adds an
		// overlay to the domain.
		if err := checkWritableDir(r.BackupDir); err != nil {
			r.P.Err("Backup directory '%s' is not usable: %v", r.BackupDir, err)
			return ErrFailed
		}
	}
	// -s (§6, B20): the dump leaves the guest paused; the disk snapshot is
	// taken in that pause so RAM and disks show the same instant, and the
	// guest is resumed right after it, before any copying. The deferred
	// Close resumes and discards on any path that did not finish the dump.
	var dump *statedump.Dump
	if r.DumpDir != "" {
		var err error
		dump, err = r.startDump(ctx, dom, ts)
		if err != nil {
			return err
		}
		defer r.clearJournal(name) // runs after Close has resumed the guest
		defer dump.Close()
	}
	r.P.Debug("Snapshotting block devices for '%s' using suffix '%s'", name, snap)
	quiesce := ""
	if r.Quiesce {
		r.P.Debug("Quiesce requested")
		quiesce = " --quiesce"
	}
	r.P.Verb("/usr/bin/virsh -q snapshot-create-as %s %s --no-metadata --disk-only --atomic%s", name, snap, quiesce)
	if err := dom.Snapshot(virt.SnapshotSpec{Name: snap, Quiesce: r.Quiesce}); err != nil {
		msg := virt.Describe(err)
		r.P.Err("Snapshot for '%s' failed! %s", name, msg)
		if strings.Contains(msg, "Permission denied") {
			r.P.Err("Check apparmor status or check if running with sufficient permissions")
		}
		switch {
		case strings.Contains(msg, "collision with disk"):
			r.P.Err("Two disks of '%s' would get the same overlay name (e.g. disk.img and disk.qcow2 in one directory): rename one of the images", name)
		case strings.Contains(msg, "external snapshot name"):
			r.P.Err("Disks that are not local files (block devices, network disks) must carry snapshot='no' in the definition of '%s' to be left out of the snapshot", name)
		}
		if dump != nil {
			// No disk snapshot matches the dumped RAM: drop it.
			_ = r.finishDump(dump, false)
		}
		return ErrFailed
	}
	r.P.Verb("Snapshot for block devices of '%s' successful", name)
	failed := false
	if dump != nil && r.finishDump(dump, true) != nil {
		failed = true
	}
	if r.BackupDir == "" {
		r.P.Debug("No backup directory specified")
		if failed {
			return ErrFailed
		}
		return nil
	}
	disks, err := r.disksToCopy(dom)
	if err != nil {
		return err
	}
	for _, d := range disks {
		if err := r.copyOnlineDisk(ctx, name, d); err != nil {
			failed = true
			if ctx.Err() != nil {
				break
			}
		}
	}
	if failed {
		return ErrFailed
	}
	return nil
}

// disksToCopy checks that the backup directory is still there (the old
// tool's message when it vanished since the options were read) and returns
// the domain's disks to copy.
func (r *Runner) disksToCopy(dom virt.Domain) ([]virt.Disk, error) {
	if !isDir(r.BackupDir) {
		r.P.Err("Backup directory '%s' doesn't exist", r.BackupDir)
		return nil, ErrFailed
	}
	disks, err := dom.Disks()
	if err != nil {
		r.P.Err("Cannot read the disks of '%s': %s", dom.Name(), virt.Describe(err))
		return nil, ErrFailed
	}
	return backupDisks(disks), nil
}

// backupDisks are the disks the old tool copied and consolidated: device
// "disk" with a source path.
func backupDisks(disks []virt.Disk) []virt.Disk {
	var out []virt.Disk
	for _, d := range disks {
		if d.Device == "disk" && d.Source != "" {
			out = append(out, d)
		}
	}
	return out
}

func (r *Runner) copyOnlineDisk(ctx context.Context, domName string, d virt.Disk) error {
	r.P.Debug("Getting all backing files for: '%s'", d.Source)
	switch {
	case d.ChainErr != nil:
		r.P.Err("Cannot back up disk '%s' of '%s': %v", d.Target, domName, d.ChainErr)
		return ErrFailed
	case !d.Complete:
		r.P.Err("Cannot back up disk '%s' of '%s': libvirt does not report its backing chain", d.Target, domName)
		return ErrFailed
	}
	for _, img := range d.Chain[1:] {
		r.P.Debug("Next file in backing file chain: '%s'", img.Path)
	}
	return r.copyChain(ctx, domName, d.Chain[1:], false)
}

func (r *Runner) claim(dst, src string) (string, bool) {
	r.claimsMu.Lock()
	defer r.claimsMu.Unlock()
	if r.claims == nil {
		r.claims = map[string]string{}
	}
	if prev, ok := r.claims[dst]; ok && prev != src {
		return prev, false
	}
	r.claims[dst] = src
	return "", true
}

// Offline copies a domain that is not running, with cp -up semantics.
func (r *Runner) Offline(ctx context.Context, name string) error {
	if j, _ := r.readJournal(name); j != nil && j.Kind == journalDump && r.resumeLeftPaused(name) {
		return r.Online(ctx, name)
	}
	if r.DumpDir != "" {
		r.P.Warn("Domain '%s' is not running: no state dump (-s) for it", name)
	}
	if r.BackupDir == "" {
		r.P.Err("-b flag (directory) required for backing up the shut-off domain '%s'", name)
		r.P.Err("Skipping backup of '%s'", name)
		return ErrFailed
	}
	if r.Consolidate {
		r.P.Err("Consolidation only works with running domains. '%s' is not running! Doing full backup only of '%s'", name, name)
		if !r.AllKeyword {
			r.P.Err("Skipping consolidation/backup of '%s'", name)
			return ErrFailed
		}
		r.P.Debug("Doing full backup (not consolidation) of '%s'", name)
	}
	dom, done, err := r.open(name, "backup")
	if err != nil {
		return err
	}
	defer done()
	before, err := dom.State()
	if err != nil {
		r.P.Err("Cannot read the state of '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	disks, err := r.disksToCopy(dom)
	if err != nil {
		return err
	}
	failed := false
	var all []string
	for _, d := range disks {
		chain, err := r.tool().Chain(ctx, d.Source)
		if err != nil {
			r.P.Err("Unable to read the backing chain of %s: %v", d.Source, err)
			failed = true
			continue
		}
		imgs := make([]virt.Image, len(chain))
		for i, c := range chain {
			imgs[i] = virt.Image{Path: c.Path, Format: c.Format}
			all = append(all, c.Path)
		}
		if err := r.copyChain(ctx, name, imgs, true); err != nil {
			failed = true
		}
		if ctx.Err() != nil {
			break
		}
	}
	r.P.Debug("All %d block files for '%s': %s", len(all), name, strings.Join(all, " : "))
	// A domain started during the copy makes the copy a torn mix of
	// moments: say so instead of calling it a backup.
	after, err := dom.State()
	if err == nil && after != before && (after == virt.StateRunning || after == virt.StatePaused && before == virt.StateShutoff) {
		r.P.Err("Domain '%s' changed from %s to %s during its offline backup: the copy may be inconsistent", name, before, after)
		failed = true
	}
	if failed {
		return ErrFailed
	}
	return nil
}

// fmtDur renders a duration for the [DEB] timing lines, e.g. "0.022s".
func fmtDur(d time.Duration) string { return fmt.Sprintf("%.3fs", d.Seconds()) }
