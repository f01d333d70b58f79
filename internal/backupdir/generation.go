package backupdir

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/fi-backup/fi-backup/internal/copyfile"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/snapshot"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// When a copied file changes on the host (the base after a blockcommit),
// the old tool copied it over its old copy, and every older restore point
// built on that copy silently became garbage (B10). The previous copy is
// kept instead:
//
//	before:  vm.qcow2(old) ◄── vm.bimg-T1 ◄── vm.bimg-T2
//	1. link   vm.qcow2 → vm.qcow2.gen-<mtime of the old copy>   (same inode)
//	2. rebase vm.bimg-T1: backing "vm.qcow2" → "vm.qcow2.gen-…"
//	3. rename the new copy over vm.qcow2
//	after:   vm.qcow2.gen-… ◄── vm.bimg-T1 ◄── vm.bimg-T2;  vm.qcow2(new)
//
// Each step leaves a consistent directory: after 1 both names hold the same
// data, each rebase in 2 swaps a reference between two identical files, 3
// is atomic.

// keepGeneration saves the copy at dst, which is about to be replaced by a
// newer version of its source, under a generation name, points every
// backup file that depends on it at that name, and rewrites the manifests
// that name it or its dependants — one step that survives a crash (see
// Pending). A copy nothing needs (no dependant, no manifest naming it, in a
// directory where the domain's restore points have manifests) is simply
// replaced.
func (d *Dir) keepGeneration(ctx context.Context, domain, dst string, src virt.Image, old os.FileInfo) error {
	name := filepath.Base(dst)
	deps, err := dependants(d.Path, name, src.Path)
	if err != nil {
		return err
	}
	if len(deps) == 0 && !d.named(domain, name) {
		d.P.Debug("'%s': no restore point needs the previous copy: no generation kept", dst)
		return nil
	}
	gen, err := generationName(dst, old)
	if err != nil {
		return err
	}
	d.P.Info("Keeping the previous copy of '%s' as '%s' for the restore points that depend on it", name, filepath.Base(gen))
	p := Pending{Links: [][2]string{{name, filepath.Base(gen)}}, Renames: map[string]string{name: filepath.Base(gen)}}
	for _, dep := range deps {
		p.Rebases = append(p.Rebases, Rebase{File: filepath.Base(dep), Backing: filepath.Base(gen), Format: src.Format})
		p.Rehash = append(p.Rehash, filepath.Base(dep))
		d.P.Debug("'%s' now depends on '%s'", dep, gen)
	}
	return d.apply(ctx, domain, p)
}

// named reports whether a restore point of the domain needs the file: a
// manifest names it, or the domain has no manifest at all (a directory of
// the old tool, whose every copy was a restore point).
func (d *Dir) named(domain, name string) bool {
	ms := d.Manifests(domain, nil)
	if len(ms) == 0 {
		return true
	}
	for _, m := range ms {
		for _, f := range m.Files() {
			if f == name {
				return true
			}
		}
	}
	return false
}

// generationName is dst + ".gen-<mtime of the old copy>"; a name already
// taken by another file gets a counter.
func generationName(dst string, old os.FileInfo) (string, error) {
	base := dst + ".gen-" + old.ModTime().Format(snapshot.TimestampLayout)
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
