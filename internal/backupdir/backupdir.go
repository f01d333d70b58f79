// Package backupdir keeps the backup directory: the flat set of copies of
// the domains' backing-chain files that the old tool made, each under its
// source's basename, chained by relative backing references so that the
// directory opens on its own. It decides what to copy (cp -u / cp -up
// semantics, at the directory's time resolution), copies through the copy
// engine (package copyfile), rewrites backing references, keeps a copy that
// is about to be replaced as a generation when older restore points read it
// (B10), and refuses any copy that would overwrite what it must not: another
// source's copy (B12) or a disk file in use.
//
//	host:   vm.qcow2 ◄── vm.bimg-T1 ◄── vm.bimg-T2 (active)
//	backup: vm.qcow2 ◄── vm.bimg-T1                  (relative references)
package backupdir

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/time/rate"

	"github.com/fi-backup/fi-backup/internal/copyfile"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/progress"
	"github.com/fi-backup/fi-backup/internal/qcow2"
)

// ErrFailed means a copy (or the check before it) failed; the reason has
// been reported.
var ErrFailed = errors.New("backup directory operation failed")

// SourceXattr records on each copy which host file it was copied from, so
// that two different sources landing on one name (B12) are caught across
// runs too. Files without it (made by the old script) are trusted.
const SourceXattr = "user.fi-backup.source"

// Dir is one backup directory, for one run: it remembers which source each
// name was claimed for in this run.
type Dir struct {
	Path  string
	P     *logging.Printer
	Tool  qcow2.Tool
	Limit *rate.Limiter // shared by all copies of the run; nil: unlimited

	// StepHook, when set, is called after each step of a change of the
	// directory (a retention merge, a generation) with the step's name; an
	// error stops the change there as a kill would. Tests only.
	StepHook func(step string) error
	// Observe, when set, is told about every chain file a copy handles.
	Observe func(CopyEvent)
	// Bar, when set, gives the progress display's bar of a file copy.
	Bar func(src string, total int64) *progress.Bar

	sh *dirState // shared by the views of For
}

// CopyEvent is one chain file a copy handled.
type CopyEvent struct {
	Domain, Source, Dest string
	Copied               bool   // false: up to date (or merged away)
	Reason               string // the cp -u decision
	Bytes                int64  // data bytes written
	Seconds              float64
}

// dirState is what one run learns about the directory, whatever domain's
// turn (running at once) asks.
type dirState struct {
	cleanOnce sync.Once
	claimsMu  sync.Mutex
	claims    map[string]string // copy → source it holds in this run
	resOnce   sync.Once
	res       time.Duration
	hashMu    sync.Mutex
	hashes    map[string]File // checksums the manifests record, by file name
}

var stateInit sync.Mutex

func (d *Dir) st() *dirState {
	stateInit.Lock()
	defer stateInit.Unlock()
	if d.sh == nil {
		d.sh = &dirState{}
	}
	return d.sh
}

// For is a view of the directory for one domain's turn: its own printer
// and observer, the run's shared state (name claims, probes, checksums).
func (d *Dir) For(p *logging.Printer, observe func(CopyEvent), bar func(src string, total int64) *progress.Bar) *Dir {
	return &Dir{Path: d.Path, P: p, Tool: d.Tool, Limit: d.Limit, StepHook: d.StepHook, Observe: observe, Bar: bar, sh: d.st()}
}

// Exists reports whether the directory (still) exists.
func (d *Dir) Exists() bool {
	st, err := os.Stat(d.Path)
	return err == nil && st.IsDir()
}

// CheckUsable proves the directory exists and takes new files.
func (d *Dir) CheckUsable() error {
	if !d.Exists() {
		return errors.New("it doesn't exist or is not a directory")
	}
	f, err := os.CreateTemp(d.Path, ".fi-backup-probe-*")
	if err != nil {
		return errors.Unwrap(err)
	}
	name := f.Name()
	_ = f.Close()
	return os.Remove(name)
}

// Destination is where a chain file's copy goes: the directory, under the
// file's own basename.
func (d *Dir) Destination(src string) string {
	return filepath.Join(d.Path, filepath.Base(src))
}

// Holder tells which domain uses a file, if any; *chains.Users is one.
type Holder interface {
	Holding(st os.FileInfo) string
}

// Admit checks, before anything is written, that the copies of files (the
// chain files of domain name) may be made: none would land on a disk file
// in use (a directory holding the disks themselves: same inode, or same
// path after resolving links), and no name is claimed by another source
// (B12). holder is asked only when a destination already exists.
func (d *Dir) Admit(name string, files []string, holder func() Holder) error {
	var h Holder
	for _, src := range files {
		dst := d.Destination(src)
		owner := ""
		if st, err := os.Stat(dst); err == nil {
			if h == nil {
				h = holder()
			}
			owner = h.Holding(st)
		}
		if same, _ := samePath(dst, src); same && owner == "" {
			owner = name
		}
		if owner != "" {
			d.P.Err("Backup directory '%s' holds disk files in use: copying '%s' there would overwrite '%s' of domain '%s'. Choose another backup directory", d.Path, src, dst, owner)
			return ErrFailed
		}
		if err := d.claim(dst, src); err != nil {
			d.P.Err("%v", err)
			return ErrFailed
		}
	}
	if need, have, ok := d.room(name, files); !ok {
		d.P.Err("Not enough free space in '%s' for the backup of '%s': it copies up to %s, and %s are free", d.Path, name, human(need), human(have))
		return ErrFailed
	}
	return nil
}

// room checks that the backup file system can take the copies of files
// this run will make: the allocated size of every source whose copy is
// missing or older (cp -u), or merged away but changed since.
func (d *Dir) room(domain string, files []string) (need, have int64, ok bool) {
	merged := d.mergedSources(domain)
	for _, src := range files {
		sst, err := os.Stat(src)
		if err != nil {
			continue // reported when it is copied
		}
		if rec, found := merged[src]; found && rec.current() {
			continue
		}
		var dstInfo os.FileInfo
		if st, err := os.Lstat(d.Destination(src)); err == nil {
			dstInfo = st
		}
		if copyIt, _, err := copyfile.NeedCopy(sst, dstInfo, d.timeResolution()); err == nil && copyIt {
			need += allocated(src)
		}
	}
	var fs syscall.Statfs_t
	if err := syscall.Statfs(d.Path, &fs); err != nil {
		return need, 0, true // unknown: the copy will tell
	}
	have = int64(fs.Bavail) * int64(fs.Bsize)
	return need, have, need <= have
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

// claim refuses a copy of src to dst that would overwrite something else
// (B12): another source claimed dst in this run, or dst records (xattr) that
// it holds the copy of another source.
func (d *Dir) claim(dst, src string) error {
	d.st().claimsMu.Lock()
	defer d.st().claimsMu.Unlock()
	if d.st().claims == nil {
		d.st().claims = map[string]string{}
	}
	if prev, ok := d.st().claims[dst]; ok && prev != src {
		return fmt.Errorf("'%s' and '%s' would both be backed up as '%s': refusing to overwrite one with the other", prev, src, dst)
	}
	if owner := getSource(dst); owner != "" && owner != src {
		return fmt.Errorf("'%s' already holds a copy of '%s': refusing to overwrite it with '%s'", dst, owner, src)
	}
	d.st().claims[dst] = src
	return nil
}

// cleanTemps removes, once per run, the temporary copies interrupted runs
// left in the directory. Copies still being written by another fi-backup
// (another domain sharing the directory) are locked and kept.
func (d *Dir) cleanTemps() {
	d.st().cleanOnce.Do(func() {
		removed, err := copyfile.CleanTemps(d.Path)
		for _, p := range removed {
			d.P.Debug("Removed '%s' left by an interrupted copy", p)
		}
		if err != nil {
			d.P.Warn("Could not remove every leftover temporary copy: %v", err)
		}
	})
}

// timeResolution is how precisely the directory keeps mtimes, probed once
// per run (cp -u compares at that resolution).
func (d *Dir) timeResolution() time.Duration {
	d.st().resOnce.Do(func() {
		res, err := copyfile.TimeResolution(d.Path)
		if err != nil {
			d.P.Debug("Cannot probe the time resolution of '%s' (%v): comparing to the nanosecond", d.Path, err)
			res = time.Nanosecond
		}
		d.st().res = res
		if res > time.Nanosecond {
			d.P.Debug("'%s' keeps modification times to %s: cp -u compares at that resolution", d.Path, res)
		}
	})
	return d.st().res
}

func getSource(path string) string {
	buf := make([]byte, 4096)
	n, err := syscall.Getxattr(path, SourceXattr, buf)
	if err != nil || n <= 0 {
		return ""
	}
	return string(buf[:n])
}

// setSource is best effort: file systems without user xattrs lose only the
// cross-run part of the B12 check.
func setSource(path, src string) {
	_ = syscall.Setxattr(path, SourceXattr, []byte(src), 0)
}
