package backupdir

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fi-backup/fi-backup/internal/copyfile"
	"github.com/fi-backup/fi-backup/internal/progress"
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
	unlock := d.lockDomain(domain)
	err := d.FinishPending(domain)
	unlock()
	if err != nil {
		d.P.Err("Cannot bring the manifests of '%s' up to date: %v", d.Path, err)
		return nil, ErrFailed
	}
	merged := d.mergedSources(domain)
	var files []File // base first
	var below *File
	parentReplaced := false
	for i := len(imgs) - 1; i >= 0; i-- {
		if err := ctx.Err(); err != nil {
			d.P.Err("Copy of '%s' interrupted", imgs[i].Path)
			return nil, err
		}
		if rec, ok := merged[imgs[i].Path]; ok && below != nil && !parentReplaced && rec.Into == below.Name && rec.current() {
			d.P.Debug("'%s' was merged into '%s' by --keep and has not changed: not copied again", imgs[i].Path, rec.Into)
			d.observe(CopyEvent{Domain: domain, Source: imgs[i].Path, Dest: filepath.Join(d.Path, rec.Into), Reason: "merged into " + rec.Into + " by --keep"})
			continue
		}
		var parent *virt.Image
		if i+1 < len(imgs) {
			parent = &imgs[i+1]
		}
		f, replaced, err := d.copyOne(ctx, domain, imgs[i], parent, below, preserve, parentReplaced)
		if err != nil {
			return nil, ErrFailed
		}
		files = append(files, f)
		below, parentReplaced = &files[len(files)-1], replaced
	}
	unlock = d.lockDomain(domain)
	d.forgetStaleMerged(domain)
	unlock()
	for i, j := 0, len(files)-1; i < j; i, j = i+1, j-1 {
		files[i], files[j] = files[j], files[i]
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

// copyOne copies one chain file: parent is its backing file on the host,
// below the copy its copy must reference (the parent's, or the file the
// parent was merged into by --keep). parentReplaced says the copy below got
// new content in this run (its old content kept as a generation): then the
// existing copy of src, whose data only means something on top of the old
// one, is kept as a generation too and src is copied again, even when src
// itself did not change. So is a copy that references another file than
// below. replaced reports the same for src.
func (d *Dir) copyOne(ctx context.Context, domain string, src virt.Image, parent *virt.Image, below *File, preserve, parentReplaced bool) (f File, replaced bool, err error) {
	dst := d.Destination(src.Path)
	name := filepath.Base(dst)
	if !preserve {
		d.P.Verb("Copy backing file '%s' to '%s'", src.Path, dst)
	}
	fail := func(format string, a ...any) (File, bool, error) {
		d.P.Err(format, a...)
		return File{}, false, ErrFailed
	}
	done := func(replaced bool, sum string) (File, bool, error) {
		f, err := d.describe(name, src, sum)
		if err != nil {
			return fail("Unable to read the copy '%s': %v", dst, err)
		}
		return f, replaced, nil
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
	backing, backingFormat := "", ""
	if below != nil {
		backing, backingFormat = below.Name, below.Format
	}
	if !need && parent != nil {
		if cur, err := qcow2.BackingFile(dst); err == nil && cur != backing && cur != parent.Path {
			need, reason = true, fmt.Sprintf("its copy references '%s', not '%s'", cur, backing)
		}
	}
	d.P.Debug("'%s': %s", dst, reason)
	if !need {
		d.observe(CopyEvent{Domain: domain, Source: src.Path, Dest: dst, Reason: reason})
		d.narrowMode(dst, dstInfo, sst)
		if err := d.fixBacking(ctx, dst, backing, backingFormat, parent, preserve); err != nil {
			return File{}, false, err
		}
		return done(false, "")
	}
	start := time.Now()
	var bar *progress.Bar
	if d.Bar != nil {
		bar = d.Bar(src.Path, allocated(src.Path))
		defer bar.Done()
	}
	prepareHead := int64(qcow2.HeadMax)
	if backing != "" && backingFormat == "" {
		prepareHead = 0 // left to qemu-img: see setBacking
	}
	st, err := copyfile.Copy(ctx, src.Path, dst, copyfile.Options{
		Preserve: preserve,
		Limit:    d.Limit,
		// The manifest's checksum, taken while the copy is fsynced
		// instead of reading the copy again afterwards.
		Hash: true,
		Progress: func(done int64) {
			bar.Set(done, 0)
		},
		// Prepare rewrites the header cluster at most (natively; qemu-img
		// may store bitmaps anew past it): the hash follows the copy from
		// the moment it is done.
		PrepareHead: prepareHead,
		Prepare: func(tmp string) error {
			if below != nil {
				if err := d.setBacking(ctx, tmp, backing, backingFormat); err != nil {
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
			defer d.lockDomain(domain)()
			return d.keepGeneration(ctx, domain, dst, src, dstInfo)
		},
	})
	if err != nil {
		if preserve {
			return fail("Unable to cp -up %s: %v", src.Path, err)
		}
		return fail("Unable to copy '%s' to '%s': %v", src.Path, dst, err)
	}
	took := time.Since(start).Seconds()
	d.P.Debug("Copied %d bytes of '%s' in %.3fs", st.Bytes, src.Path, took)
	d.observe(CopyEvent{Domain: domain, Source: src.Path, Dest: dst, Copied: true, Reason: reason, Bytes: st.Bytes, Seconds: took})
	f, replaced, err = done(replaced, st.SHA256)
	f.Copied = err == nil
	return f, replaced, err
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
func (d *Dir) fixBacking(ctx context.Context, dst, backing, format string, parent *virt.Image, preserve bool) error {
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
	if err := d.setBacking(ctx, dst, backing, format); err != nil {
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

// setBacking rewrites a copy's backing reference as qemu-img rebase -u
// does, natively (qcow2.SetBacking writes the same bytes, without a
// process per copy). A reference without a format is left to qemu-img,
// which probes the backing file's format itself.
func (d *Dir) setBacking(ctx context.Context, path, backing, format string) error {
	if backing != "" && format == "" {
		return d.Tool.Rebase(ctx, path, backing, format)
	}
	return qcow2.SetBacking(path, backing, format)
}

func backingOf(path string) (string, error) { return qcow2.BackingFile(path) }

func (d *Dir) observe(ev CopyEvent) {
	if d.Observe != nil {
		d.Observe(ev)
	}
}
