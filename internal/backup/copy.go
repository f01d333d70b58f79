package backup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fi-backup/fi-backup/internal/copyfile"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// sourceXattr records on each backup copy which host file it was copied
// from, so that two different sources landing on one name (B12) are caught
// across runs too. Files without it (made by the old script) are trusted.
const sourceXattr = "user.fi-backup.source"

// copyChain copies imgs (top first, base last) into the backup directory,
// base first so every copy's parent already exists when its backing
// reference is rewritten. preserve selects cp -up (offline) over cp -u.
func (r *Runner) copyChain(ctx context.Context, domName string, imgs []virt.Image, preserve bool) error {
	r.cleanTemps()
	parentReplaced := false
	for i := len(imgs) - 1; i >= 0; i-- {
		if err := ctx.Err(); err != nil {
			r.P.Err("Copy of '%s' interrupted", imgs[i].Path)
			return err
		}
		var parent *virt.Image
		if i+1 < len(imgs) {
			parent = &imgs[i+1]
		}
		var err error
		parentReplaced, err = r.copyOne(ctx, imgs[i], parent, preserve, parentReplaced)
		if err != nil {
			// A copy whose parent failed would depend on a stale or missing
			// parent: stop this chain here.
			return ErrFailed
		}
	}
	return nil
}

// destination is where a chain file's copy goes: the flat backup
// directory, under the file's own basename.
func (r *Runner) destination(src string) string {
	return filepath.Join(r.BackupDir, filepath.Base(src))
}

// checkDestination refuses a copy of src to dst that would overwrite
// something else (B12): another source claimed dst in this run, or dst
// records (xattr) that it holds the copy of another source.
func (r *Runner) checkDestination(dst, src string) error {
	if prev, ok := r.claim(dst, src); !ok {
		return fmt.Errorf("'%s' and '%s' would both be backed up as '%s': refusing to overwrite one with the other", prev, src, dst)
	}
	if owner := getSource(dst); owner != "" && owner != src {
		return fmt.Errorf("'%s' already holds a copy of '%s': refusing to overwrite it with '%s'", dst, owner, src)
	}
	return nil
}

// copyOne copies one chain file. parentReplaced says the parent's copy got
// new content in this run (its old content kept as a generation): then the
// existing copy of src, whose data only means something on top of the old
// parent, is kept as a generation too and src is copied again, even when src
// itself did not change. replaced reports the same for src.
func (r *Runner) copyOne(ctx context.Context, src virt.Image, parent *virt.Image, preserve, parentReplaced bool) (replaced bool, err error) {
	dst := r.destination(src.Path)
	if !preserve {
		r.P.Verb("Copy backing file '%s' to '%s'", src.Path, dst)
	}
	fail := func(format string, a ...any) (bool, error) {
		r.P.Err(format, a...)
		return false, ErrFailed
	}
	if err := r.checkDestination(dst, src.Path); err != nil {
		return fail("%v", err)
	}
	sst, err := os.Stat(src.Path)
	if err != nil {
		return fail("Unable to copy '%s': %v", src.Path, err)
	}
	dstInfo, err := os.Lstat(dst)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fail("Unable to copy '%s': %v", src.Path, err)
	}
	if err != nil {
		dstInfo = nil
	}
	need, reason, err := copyfile.NeedCopy(sst, dstInfo, r.timeResolution())
	if err != nil {
		return fail("Unable to copy '%s' to '%s': %v", src.Path, dst, err)
	}
	if !need && parentReplaced {
		need, reason = true, "its parent's copy was replaced"
	}
	r.P.Debug("'%s': %s", dst, reason)
	backing := ""
	if parent != nil {
		backing = filepath.Base(parent.Path)
	}
	if !need {
		r.narrowMode(dst, dstInfo, sst)
		return false, r.fixBacking(ctx, dst, backing, parent, preserve)
	}
	start := time.Now()
	st, err := copyfile.Copy(ctx, src.Path, dst, copyfile.Options{
		Preserve: preserve,
		Limit:    r.limiter(),
		Prepare: func(tmp string) error {
			if parent != nil {
				if err := r.tool().Rebase(ctx, tmp, backing, parent.Format); err != nil {
					return err
				}
			}
			setSource(tmp, src.Path)
			return nil
		},
		// The copy about to be replaced holds the data of older restore
		// points (B10): keep it as a generation, unless the new copy is
		// the very same bytes (the source's time moved, its data did not).
		BeforeRename: func(tmp string) error {
			if dstInfo == nil {
				return nil
			}
			same, err := copyfile.SameContent(tmp, dst)
			if err != nil {
				return err
			}
			if same {
				r.P.Debug("'%s': the new copy is identical to the previous one: no generation kept", dst)
				return nil
			}
			replaced = true
			return r.keepGeneration(ctx, dst, src, dstInfo)
		},
	})
	if err != nil {
		if preserve {
			return fail("Unable to cp -up %s: %v", src.Path, err)
		}
		return fail("Unable to copy '%s' to '%s': %v", src.Path, dst, err)
	}
	r.P.Debug("Copied %d bytes of '%s' in %s", st.Bytes, src.Path, fmtDur(time.Since(start)))
	return replaced, nil
}

// narrowMode keeps an up-to-date copy from staying more readable than its
// source after the source's mode was narrowed (chmod leaves the mtime, so
// no copy happens).
func (r *Runner) narrowMode(dst string, dstInfo, src os.FileInfo) {
	if extra := dstInfo.Mode().Perm() &^ src.Mode().Perm(); extra != 0 {
		if err := os.Chmod(dst, dstInfo.Mode().Perm()&src.Mode().Perm()); err != nil {
			r.P.Warn("Could not narrow the mode of '%s' to its source's (%04o): %v", dst, src.Mode().Perm(), err)
		}
	}
}

// fixBacking makes an up-to-date copy made by the old script, which
// records its parent's absolute host path, reference its parent copy by
// relative name. Relative references (this tool's, including the ones to
// kept generations) are never touched.
func (r *Runner) fixBacking(ctx context.Context, dst, backing string, parent *virt.Image, preserve bool) error {
	if parent == nil {
		return nil
	}
	cur, err := qcow2.BackingFile(dst)
	if err != nil {
		r.P.Warn("Cannot read the backing reference of '%s': %v", dst, err)
		return nil
	}
	if cur != parent.Path {
		return nil
	}
	st, err := os.Stat(dst)
	if err != nil {
		r.P.Warn("Cannot read the backing reference of '%s': %v", dst, err)
		return nil
	}
	if err := r.tool().Rebase(ctx, dst, backing, parent.Format); err != nil {
		r.P.Err("Unable to point '%s' at '%s': %v", dst, backing, err)
		return ErrFailed
	}
	if preserve { // cp -p semantics: the rewrite must not move the timestamp
		r.keepTimes(dst, st)
	}
	return nil
}

// keepTimes puts back a file's times after its header was rewritten.
func (r *Runner) keepTimes(path string, st os.FileInfo) {
	if err := os.Chtimes(path, atime(st), st.ModTime()); err != nil {
		r.P.Warn("Could not keep the time of '%s': %v", path, err)
	}
}

func atime(st os.FileInfo) time.Time {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return time.Unix(s.Atim.Sec, s.Atim.Nsec)
	}
	return st.ModTime()
}

// keepGeneration saves the copy at dst, which is about to be replaced by a
// newer version of its source (after a blockcommit the base changes, B10),
// under a generation name, and points every backup file that depends on it
// at that name. Each step leaves a consistent directory: the hard link adds
// a second name for the same data, each rebase swaps one reference to an
// identical file, and only then does the new copy replace dst.
func (r *Runner) keepGeneration(ctx context.Context, dst string, src virt.Image, old os.FileInfo) error {
	gen, err := generationName(dst, old)
	if err != nil {
		return err
	}
	if err := os.Link(dst, gen); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	r.P.Info("Keeping the previous copy of '%s' as '%s' for the restore points that depend on it", filepath.Base(dst), filepath.Base(gen))
	deps, err := dependants(r.BackupDir, filepath.Base(dst), src.Path)
	if err != nil {
		return err
	}
	for _, dep := range deps {
		st, _ := os.Stat(dep)
		if err := r.tool().Rebase(ctx, dep, filepath.Base(gen), src.Format); err != nil {
			return err
		}
		if st != nil { // keep the dependant's time so cp -u decisions do not change
			r.keepTimes(dep, st)
		}
		r.P.Debug("'%s' now depends on '%s'", dep, gen)
	}
	return nil
}

// generationName is dst + ".gen-<mtime of the old copy>"; a name already
// taken by another file gets a counter.
func generationName(dst string, old os.FileInfo) (string, error) {
	base := dst + ".gen-" + old.ModTime().Format(virt.TimestampLayout)
	name := base
	for i := 1; i < 1000; i++ {
		st, err := os.Lstat(name)
		if errors.Is(err, os.ErrNotExist) || (err == nil && os.SameFile(st, old)) {
			return name, nil
		}
		name = fmt.Sprintf("%s.%d", base, i)
	}
	return "", fmt.Errorf("no free generation name for %s", dst)
}

// dependants lists the qcow2 files in dir whose backing reference is name
// (relative, as this tool writes it) or the host path srcPath (as copies
// made by the old script record it).
func dependants(dir, name, srcPath string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if !e.Type().IsRegular() || copyfile.IsTemp(e.Name()) {
			continue
		}
		p := filepath.Join(dir, e.Name())
		b, err := qcow2.BackingFile(p)
		if err != nil {
			continue
		}
		if b == name || b == srcPath {
			out = append(out, p)
		}
	}
	return out, nil
}

// cleanTemps removes, once per run, the temporary copies interrupted runs
// left in the backup directory. Copies still being written by another
// fi-backup (another domain sharing the directory) are locked and kept.
func (r *Runner) cleanTemps() {
	r.cleanOnce.Do(func() {
		removed, err := copyfile.CleanTemps(r.BackupDir)
		for _, p := range removed {
			r.P.Debug("Removed '%s' left by an interrupted copy", p)
		}
		if err != nil {
			r.P.Warn("Could not remove every leftover temporary copy: %v", err)
		}
	})
}

// timeResolution is how precisely the backup directory keeps mtimes,
// probed once per run (cp -u compares at that resolution).
func (r *Runner) timeResolution() time.Duration {
	r.resOnce.Do(func() {
		res, err := copyfile.TimeResolution(r.BackupDir)
		if err != nil {
			r.P.Debug("Cannot probe the time resolution of '%s' (%v): comparing to the nanosecond", r.BackupDir, err)
			res = time.Nanosecond
		}
		r.res = res
		if res > time.Nanosecond {
			r.P.Debug("'%s' keeps modification times to %s: cp -u compares at that resolution", r.BackupDir, res)
		}
	})
	return r.res
}

func getSource(path string) string {
	buf := make([]byte, 4096)
	n, err := syscall.Getxattr(path, sourceXattr, buf)
	if err != nil || n <= 0 {
		return ""
	}
	return string(buf[:n])
}

// setSource is best effort: filesystems without user xattrs lose only the
// cross-run part of the B12 check.
func setSource(path, src string) {
	_ = syscall.Setxattr(path, sourceXattr, []byte(src), 0)
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// checkWritableDir proves dir exists and takes new files.
func checkWritableDir(dir string) error {
	if !isDir(dir) {
		return errors.New("it doesn't exist or is not a directory")
	}
	f, err := os.CreateTemp(dir, ".fi-backup-probe-*")
	if err != nil {
		return errors.Unwrap(err)
	}
	name := f.Name()
	_ = f.Close()
	return os.Remove(name)
}
