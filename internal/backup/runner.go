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
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/time/rate"

	"github.com/fi-backup/fi-backup/internal/copyfile"
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
	RateLimit   int64 // bytes/s for copies and block jobs; 0: unlimited
	AllKeyword  bool  // the positional argument was "all"
	PollEvery   time.Duration

	cleanOnce sync.Once
	claimsMu  sync.Mutex
	claims    map[string]string // backup file → source it holds in this run (B12)
	limOnce   sync.Once
	lim       *rate.Limiter
	resOnce   sync.Once
	res       time.Duration
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

// limiter is the run's one rate limiter, shared by all copies.
func (r *Runner) limiter() *rate.Limiter {
	r.limOnce.Do(func() {
		if r.RateLimit > 0 {
			r.lim = copyfile.NewLimiter(r.RateLimit)
		}
	})
	return r.lim
}

// Run backs up (and/or consolidates) one domain. selected is the state it
// had when the domains were listed; it is read again under the domain's
// lock, because a domain started (or stopped) since then must go the way its
// state now says: copying a running domain's live disk offline would be a
// torn copy reported as good.
func (r *Runner) Run(ctx context.Context, name string, selected virt.State) error {
	if !isRunningState(selected) && r.BackupDir == "" {
		// The old tool's refusal, before it took any lock.
		r.offlineNeedsBackupDir(name, selected)
		return ErrFailed
	}
	l, err := lock.TryLock(r.LockDir, name)
	if err != nil {
		r.lockFailed(name, selected, err)
		return ErrFailed
	}
	defer func() { _ = l.Unlock() }()
	dom, err := r.Hyp.Lookup(name)
	if err != nil {
		r.P.Err("Cannot find domain '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	defer dom.Close()
	if err := r.recoverJobs(dom); err != nil {
		return err
	}
	st, err := dom.State()
	if err != nil {
		r.P.Err("Cannot read the state of '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	if st != selected && (isRunningState(st) != isRunningState(selected)) {
		r.P.Debug("Domain '%s' is %s now (it was %s when the domains were listed)", name, st, selected)
	}
	switch {
	case isRunningState(st):
		return r.online(ctx, dom)
	case st == virt.StateShutoff || st == virt.StatePaused || st == virt.StateCrashed:
		return r.offline(ctx, dom, st)
	}
	r.P.Err("Domain '%s' is %s: skipping it", name, st)
	return ErrFailed
}

func isRunningState(s virt.State) bool { return s == virt.StateRunning || s == virt.StateBlocked }

// lockFailed reports a lock that could not be taken, with the old messages:
// with -C both phases are skipped, and the old tool said so for each.
func (r *Runner) lockFailed(name string, selected virt.State, err error) {
	var phases []string
	switch {
	case !isRunningState(selected) || r.Snapshot && !r.Consolidate:
		phases = []string{"backup"}
	case !r.Snapshot:
		phases = []string{"consolidation"}
	default:
		phases = []string{"backup", "consolidation"}
	}
	for _, what := range phases {
		if errors.Is(err, lock.ErrLocked) {
			r.P.Err("Another instance of %s is already running on '%s'! Skipping %s of '%s'", r.Prog, name, what, name)
		} else {
			r.P.Err("Cannot lock domain '%s': %v. Skipping %s of '%s'", name, err, what, name)
		}
	}
}

// online backs up (and/or consolidates) one running domain.
func (r *Runner) online(ctx context.Context, dom virt.Domain) error {
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
		if err := r.preflight(ctx, dom); err != nil {
			return err
		}
	}
	// -s (§6, B20): the dump leaves the guest paused; the disk snapshot is
	// taken in that pause so RAM and disks show the same instant, and the
	// guest is resumed right after it, before any copying. The deferred
	// Close resumes and discards on any path that did not finish the dump.
	// Nothing is written to stdout from the start of the dump until the
	// guest runs again: a slow or closed reader must never hold a guest
	// paused (the lines are printed, in order, right after the resume).
	var dump *statedump.Dump
	release := func() {}
	if r.DumpDir != "" {
		release = r.P.Hold()
		defer release()
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
	release()
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

// preflight checks, before the snapshot, everything about the copy that
// can be known then: every disk's chain is known, and no copy would land on
// a file it must not overwrite (B12 clashes, a backup directory that holds
// the disks themselves). A run refused here adds no overlay.
func (r *Runner) preflight(ctx context.Context, dom virt.Domain) error {
	all, err := dom.Disks()
	if err != nil {
		r.P.Err("Cannot read the disks of '%s': %s", dom.Name(), virt.Describe(err))
		return ErrFailed
	}
	var files []string
	for _, d := range backupDisks(all) {
		switch {
		case d.ChainErr != nil:
			r.P.Err("Cannot back up disk '%s' of '%s': %v", d.Target, dom.Name(), d.ChainErr)
			return ErrFailed
		case !d.Complete:
			r.P.Err("Cannot back up disk '%s' of '%s': libvirt does not report its backing chain", d.Target, dom.Name())
			return ErrFailed
		}
		for _, img := range d.Chain {
			files = append(files, img.Path)
		}
	}
	return r.checkDestinations(ctx, dom.Name(), files)
}

// checkDestinations refuses copies into the backup directory that would
// overwrite a file they must not: a disk file of any defined domain (a -b
// pointing at the disks' own directory, or at one that holds other
// domains' disks), another source's copy (B12).
func (r *Runner) checkDestinations(ctx context.Context, name string, files []string) error {
	var live map[fileID]string
	for _, src := range files {
		dst := r.destination(src)
		st, err := os.Stat(dst)
		if err == nil {
			if live == nil {
				live = r.hostFiles(ctx, name, files)
			}
			if owner, ok := live[idOf(st)]; ok {
				r.P.Err("Backup directory '%s' holds disk files in use: copying '%s' there would overwrite '%s' of domain '%s'. Choose another backup directory", r.BackupDir, src, dst, owner)
				return ErrFailed
			}
		}
		if same, _ := samePath(dst, src); same {
			r.P.Err("Backup directory '%s' holds disk files in use: copying '%s' there would overwrite '%s' of domain '%s'. Choose another backup directory", r.BackupDir, src, dst, name)
			return ErrFailed
		}
		if err := r.checkDestination(dst, src); err != nil {
			r.P.Err("%v", err)
			return ErrFailed
		}
	}
	return nil
}

// fileID identifies a file whatever the path it is reached by.
type fileID struct{ dev, ino uint64 }

func idOf(st os.FileInfo) fileID {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return fileID{dev: s.Dev, ino: s.Ino}
	}
	return fileID{}
}

// hostFiles maps every chain file of this domain (files) and of every
// other defined domain to the domain using it. Chains that cannot be read
// contribute what is known of them.
func (r *Runner) hostFiles(ctx context.Context, self string, files []string) map[fileID]string {
	out := map[fileID]string{}
	add := func(p, dom string) {
		if st, err := os.Stat(p); err == nil {
			out[idOf(st)] = dom
		}
	}
	for _, f := range files {
		add(f, self)
	}
	users := hostUsers{users: map[string]string{}}
	if names, err := r.Hyp.List(virt.ListAll); err == nil {
		for _, n := range names {
			if n != self {
				_ = r.addUsers(ctx, &users, n)
			}
		}
	}
	for p, dom := range users.users {
		add(p, dom)
	}
	return out
}

// samePath reports whether a and b name the same file after resolving
// symbolic links (b exists; a may not).
func samePath(a, b string) (bool, error) {
	ra, err := filepath.EvalSymlinks(a)
	if err != nil {
		return false, err
	}
	rb, err := filepath.EvalSymlinks(b)
	if err != nil {
		return false, err
	}
	return ra == rb, nil
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
	r.chainWalkLines(d.Chain)
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

// stateWord is how the offline messages name a domain's state ("shut-off"
// is the old tool's word, which it used for paused domains too).
func stateWord(st virt.State) string {
	if st == virt.StateShutoff {
		return "shut-off"
	}
	return st.String()
}

func (r *Runner) offlineNeedsBackupDir(name string, st virt.State) {
	r.P.Err("-b flag (directory) required for backing up the %s domain '%s'", stateWord(st), name)
	r.P.Err("Skipping backup of '%s'", name)
}

// offline copies a domain that is not running, with cp -up semantics. The
// caller holds the domain's lock.
func (r *Runner) offline(ctx context.Context, dom virt.Domain, before virt.State) error {
	name := dom.Name()
	if r.DumpDir != "" {
		r.P.Warn("Domain '%s' is not running: no state dump (-s) for it", name)
	}
	if r.BackupDir == "" {
		r.offlineNeedsBackupDir(name, before)
		return ErrFailed
	}
	if r.Consolidate {
		if !r.AllKeyword {
			r.P.Err("Consolidation only works with running domains. '%s' is not running! Doing full backup only of '%s'", name, name)
			r.P.Err("Skipping consolidation/backup of '%s'", name)
			return ErrFailed
		}
		// Under "all" the old tool went on with the backup and exited 0:
		// the line is a warning, not an error.
		r.P.Warn("Consolidation only works with running domains. '%s' is not running! Doing full backup only of '%s'", name, name)
		r.P.Debug("Doing full backup (not consolidation) of '%s'", name)
	}
	disks, err := r.disksToCopy(dom)
	if err != nil {
		return err
	}
	failed := false
	chains := make([][]virt.Image, len(disks))
	var files []string
	for i, d := range disks {
		chain, err := r.tool().Chain(ctx, d.Source)
		if err != nil {
			r.P.Err("Unable to read the backing chain of %s: %v", d.Source, err)
			failed = true
			continue
		}
		for _, c := range chain {
			chains[i] = append(chains[i], virt.Image{Path: c.Path, Format: c.Format})
			files = append(files, c.Path)
		}
	}
	if !failed {
		if err := r.checkDestinations(ctx, name, files); err != nil {
			return err
		}
	}
	var listed oldFileList
	for i, d := range disks {
		if chains[i] == nil {
			continue
		}
		r.offlineWalkLines(d.Source, chains[i], &listed)
		if err := r.copyChain(ctx, name, chains[i], true); err != nil {
			failed = true
		}
		if ctx.Err() != nil {
			break
		}
	}
	r.P.Debug("All %d block files for '%s': %s : %s", len(listed.files), name, listed.lastDisk, strings.Join(listed.files, " "))
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

// oldFileList reproduces the list behind the old tool's "All N block files"
// debug line: per disk it wrote the first parent at index 0 and every
// parent from index 1 on into one array, which kept the longer tail of an
// earlier disk.
type oldFileList struct {
	files    []string
	lastDisk string
}

// offlineWalkLines prints the old tool's offline debug lines for one disk
// in its order (top first): the file copied, then for each parent its
// name, its copy and the parent's own parent.
func (r *Runner) offlineWalkLines(disk string, chain []virt.Image, l *oldFileList) {
	r.P.Debug("Backing up: cp -up %s %s/", disk, r.BackupDir)
	l.lastDisk = disk
	first := ""
	if len(chain) > 1 {
		first = chain[1].Path
	}
	l.set(0, first)
	for i := 1; i < len(chain); i++ {
		l.set(i, chain[i].Path)
		r.P.Debug("Parent block device: '%s'", chain[i].Path)
		r.P.Debug("Backing up: cp -up %s %s/", chain[i].Path, r.BackupDir)
		next := ""
		if i+1 < len(chain) {
			next = chain[i+1].Path
		}
		r.P.Debug("Next file in backing file chain: '%s'", next)
	}
}

func (l *oldFileList) set(i int, v string) {
	for len(l.files) <= i {
		l.files = append(l.files, "")
	}
	l.files[i] = v
}

// fmtDur renders a duration for the [DEB] timing lines, e.g. "0.022s".
func fmtDur(d time.Duration) string { return fmt.Sprintf("%.3fs", d.Seconds()) }
