package backupdir

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fi-backup/fi-backup/internal/copyfile"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// CopyChain copies a chain (top first, base last) into the directory, base
// first, so every copy's parent already exists when its backing reference
// is rewritten, and an interrupted run leaves a consistent prefix. preserve
// selects cp -up (offline: mode, owner and times kept) over cp -u. The
// first failure stops the chain: a copy above it would depend on a stale or
// missing parent. It returns the copies that hold the chain now, top first,
// as a manifest records them.
func (d *Dir) CopyChain(ctx context.Context, domain string, imgs []virt.Image, preserve bool) ([]File, error) {
	d.cleanTemps()
	if err := d.FinishPending(domain); err != nil {
		d.P.Err("Cannot bring the manifests of '%s' up to date: %v", d.Path, err)
		return nil, ErrFailed
	}
	files := make([]File, len(imgs))
	parentReplaced := false
	for i := len(imgs) - 1; i >= 0; i-- {
		if err := ctx.Err(); err != nil {
			d.P.Err("Copy of '%s' interrupted", imgs[i].Path)
			return nil, err
		}
		var parent *virt.Image
		if i+1 < len(imgs) {
			parent = &imgs[i+1]
		}
		var err error
		parentReplaced, files[i], err = d.copyOne(ctx, domain, imgs[i], parent, preserve, parentReplaced)
		if err != nil {
			return nil, ErrFailed
		}
	}
	return files, nil
}

// describe is what a manifest records of the copy name of src.
func (d *Dir) describe(name string, src virt.Image, sum string) (File, error) {
	p := filepath.Join(d.Path, name)
	format, vsize, err := qcow2.VirtualSize(p)
	if err != nil {
		return File{}, err
	}
	st, err := os.Stat(p)
	if err != nil {
		return File{}, err
	}
	if sum == "" {
		if sum, _, err = d.fileHash(name); err != nil {
			return File{}, err
		}
	}
	if src.Format != "" {
		format = src.Format
	}
	return File{Name: name, Source: src.Path, Size: st.Size(), VirtualSize: vsize, Format: format, SHA256: sum}, nil
}

// copyOne copies one chain file. parentReplaced says the parent's copy got
// new content in this run (its old content kept as a generation): then the
// existing copy of src, whose data only means something on top of the old
// parent, is kept as a generation too and src is copied again, even when src
// itself did not change. replaced reports the same for src.
func (d *Dir) copyOne(ctx context.Context, domain string, src virt.Image, parent *virt.Image, preserve, parentReplaced bool) (replaced bool, f File, err error) {
	dst := d.Destination(src.Path)
	name := filepath.Base(dst)
	if !preserve {
		d.P.Verb("Copy backing file '%s' to '%s'", src.Path, dst)
	}
	fail := func(format string, a ...any) (bool, File, error) {
		d.P.Err(format, a...)
		return false, File{}, ErrFailed
	}
	done := func(replaced bool, sum string) (bool, File, error) {
		f, err := d.describe(name, src, sum)
		if err != nil {
			return fail("Unable to read the copy '%s': %v", dst, err)
		}
		return replaced, f, nil
	}
	if err := d.claim(dst, src.Path); err != nil {
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
	need, reason, err := copyfile.NeedCopy(sst, dstInfo, d.timeResolution())
	if err != nil {
		return fail("Unable to copy '%s' to '%s': %v", src.Path, dst, err)
	}
	if !need && parentReplaced {
		need, reason = true, "its parent's copy was replaced"
	}
	d.P.Debug("'%s': %s", dst, reason)
	backing := ""
	if parent != nil {
		backing = filepath.Base(parent.Path)
	}
	if !need {
		d.narrowMode(dst, dstInfo, sst)
		if err := d.fixBacking(ctx, dst, backing, parent, preserve); err != nil {
			return false, File{}, err
		}
		return done(false, "")
	}
	start := time.Now()
	st, err := copyfile.Copy(ctx, src.Path, dst, copyfile.Options{
		Preserve: preserve,
		Limit:    d.Limit,
		Prepare: func(tmp string) error {
			if parent != nil {
				if err := d.setBacking(ctx, tmp, backing, parent.Format); err != nil {
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
				d.P.Debug("'%s': the new copy is identical to the previous one: no generation kept", dst)
				return nil
			}
			replaced = true
			return d.keepGeneration(ctx, domain, dst, src, dstInfo)
		},
	})
	if err != nil {
		if preserve {
			return fail("Unable to cp -up %s: %v", src.Path, err)
		}
		return fail("Unable to copy '%s' to '%s': %v", src.Path, dst, err)
	}
	d.P.Debug("Copied %d bytes of '%s' in %.3fs", st.Bytes, src.Path, time.Since(start).Seconds())
	sum, err := hashFile(dst)
	if err != nil {
		return fail("Unable to read the copy '%s': %v", dst, err)
	}
	return done(replaced, sum)
}

// narrowMode keeps an up-to-date copy from staying more readable than its
// source after the source's mode was narrowed (chmod leaves the mtime, so
// no copy happens).
func (d *Dir) narrowMode(dst string, dstInfo, src os.FileInfo) {
	if extra := dstInfo.Mode().Perm() &^ src.Mode().Perm(); extra != 0 {
		if err := os.Chmod(dst, dstInfo.Mode().Perm()&src.Mode().Perm()); err != nil {
			d.P.Warn("Could not narrow the mode of '%s' to its source's (%04o): %v", dst, src.Mode().Perm(), err)
		}
	}
}

// fixBacking makes an up-to-date copy made by the old script, which
// records its parent's absolute host path, reference its parent copy by
// relative name. Relative references (this tool's, including the ones to
// kept generations) are never touched.
func (d *Dir) fixBacking(ctx context.Context, dst, backing string, parent *virt.Image, preserve bool) error {
	if parent == nil {
		return nil
	}
	cur, err := qcow2.BackingFile(dst)
	if err != nil {
		d.P.Warn("Cannot read the backing reference of '%s': %v", dst, err)
		return nil
	}
	if cur != parent.Path {
		return nil
	}
	st, err := os.Stat(dst)
	if err != nil {
		d.P.Warn("Cannot read the backing reference of '%s': %v", dst, err)
		return nil
	}
	if err := d.setBacking(ctx, dst, backing, parent.Format); err != nil {
		d.P.Err("Unable to point '%s' at '%s': %v", dst, backing, err)
		return ErrFailed
	}
	if preserve { // cp -p semantics: the rewrite must not move the timestamp
		d.keepTimes(dst, st)
	}
	return nil
}

// keepTimes puts back a file's times after its header was rewritten.
func (d *Dir) keepTimes(path string, st os.FileInfo) {
	if err := os.Chtimes(path, atime(st), st.ModTime()); err != nil {
		d.P.Warn("Could not keep the time of '%s': %v", path, err)
	}
}

func atime(st os.FileInfo) time.Time {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return time.Unix(s.Atim.Sec, s.Atim.Nsec)
	}
	return st.ModTime()
}

// setBacking rewrites a copy's backing reference (qemu-img rebase -u).
func (d *Dir) setBacking(ctx context.Context, path, backing, format string) error {
	return d.Tool.Rebase(ctx, path, backing, format)
}

func backingOf(path string) (string, error) { return qcow2.BackingFile(path) }
