package backupdir

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// A backup file that is renamed, rebased or merged after its restore point
// was recorded (a generation today, a retention merge next) changes what the
// manifests naming it must say. The change and the manifests' rewrite are
// one step that survives a crash: its redo record is written first, in the
// domain's record directory, then the files are changed, then every
// manifest naming them is rewritten, then the record is removed. Whoever
// finds a record (the next run that touches the domain's files, --verify,
// --restore) redoes it to the end; every part of it can be done twice.

// Pending is the redo record of a change to a domain's backup files. Its
// parts are carried out in this order, each of them idempotent.
type Pending struct {
	// Drop are the moments of restore points given up (retention): their
	// manifests go first, so that they are never listed half merged.
	Drop []string `json:"drop,omitempty"`
	// Links are hard links to make: [existing name, new name] (a
	// generation: the same inode under a second name).
	Links [][2]string `json:"links,omitempty"`
	// Merges commit layers into the file below them (retention).
	Merges []Merge `json:"merges,omitempty"`
	// Rebases are backing references to set: file → the name it must
	// reference (with its format).
	Rebases []Rebase `json:"rebases,omitempty"`
	// Renames replace one name by another in every manifest.
	Renames map[string]string `json:"renames,omitempty"`
	// Rehash are files whose bytes changed: their size and checksum are
	// read again.
	Rehash []string `json:"rehash,omitempty"`
	// Unchain are files merged away: they leave every manifest's chains.
	Unchain []string `json:"unchain,omitempty"`
	// Deletes are files (relative to DIR) no kept restore point needs.
	Deletes []string `json:"deletes,omitempty"`
	// Merged records host files whose copies were merged away, so that
	// later runs do not copy them again while they are unchanged.
	Merged []MergedSource `json:"merged,omitempty"`
	// Retired are kept files that no longer top a restore point.
	Retired []string `json:"retired,omitempty"`
}

// Merge commits the layers Chain[:Base] (top first, names in DIR) into
// Chain[Base], whose times are then put back (the next run's cp -u
// decision compares them with its host source). Chain goes down to the
// bottom, so that the chain below the base is opened as it is.
type Merge struct {
	Chain   []string `json:"chain"`
	Base    int      `json:"base"`
	Formats []string `json:"formats"`
	MTime   int64    `json:"mtime"` // the base's, in ns
	ATime   int64    `json:"atime"`
}

// Rebase is one backing reference to set.
type Rebase struct {
	File    string `json:"file"`
	Backing string `json:"backing"`
	Format  string `json:"format"`
}

func (d *Dir) pendingPath(domain string) string {
	return filepath.Join(d.Path, MetaDir, domain, ".pending.json")
}

// apply records p for domain and carries it out.
func (d *Dir) apply(ctx context.Context, domain string, p Pending) error {
	if err := os.MkdirAll(filepath.Join(d.Path, MetaDir, domain), 0o700); err != nil {
		return err
	}
	if err := d.writePending(domain, p); err != nil {
		return err
	}
	return d.redo(ctx, domain, p)
}

func (d *Dir) writePending(domain string, p Pending) error {
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	return writeAtomic(d.pendingPath(domain), b)
}

// FinishPending carries out to the end a change an interrupted run left
// recorded for the domain. The caller holds the domain's lock.
func (d *Dir) FinishPending(domain string) error {
	b, err := os.ReadFile(d.pendingPath(domain))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var p Pending
	if err := json.Unmarshal(b, &p); err != nil {
		return fmt.Errorf("unreadable redo record %s: %w", d.pendingPath(domain), err)
	}
	d.P.Warn("Finishing the change of the backup files of '%s' an interrupted run left (%s)", domain, d.pendingPath(domain))
	return d.redo(context.Background(), domain, p)
}

func (d *Dir) redo(ctx context.Context, domain string, p Pending) error {
	for _, moment := range p.Drop {
		if err := d.dropMeta(domain, moment); err != nil {
			return err
		}
		if err := d.step("drop"); err != nil {
			return err
		}
	}
	for _, l := range p.Links {
		from, to := filepath.Join(d.Path, l[0]), filepath.Join(d.Path, l[1])
		if _, err := os.Lstat(to); err == nil {
			continue
		}
		if err := os.Link(from, to); err != nil {
			return err
		}
		if err := d.step("link"); err != nil {
			return err
		}
	}
	if len(p.Merges) > 0 {
		if err := d.mergeAll(ctx, p.Merges); err != nil {
			if ctx.Err() != nil {
				return err // interrupted: the next run redoes the merge
			}
			d.P.Warn("Could not merge the oldest restore points of '%s' (%v): the files of the kept ones stay as they are", domain, err)
			p = p.withoutMerges()
		} else {
			p.Merges = nil
		}
		// Done (or given up) once: a redo does not merge again.
		if err := d.writePending(domain, p); err != nil {
			return err
		}
		if err := d.step("merge"); err != nil {
			return err
		}
	}
	for _, rb := range p.Rebases {
		path := filepath.Join(d.Path, rb.File)
		if cur, err := backingOf(path); err == nil && cur == rb.Backing {
			continue
		}
		st, err := os.Stat(path)
		if err != nil {
			return err
		}
		if err := d.setBacking(ctx, path, rb.Backing, rb.Format); err != nil {
			return err
		}
		d.keepTimes(path, st) // cp -u decisions must not change
		if err := d.step("rebase"); err != nil {
			return err
		}
	}
	if err := d.rewriteManifests(domain, p.Renames, p.Rehash, p.Unchain); err != nil {
		return err
	}
	if err := d.step("manifests"); err != nil {
		return err
	}
	for _, f := range p.Deletes {
		f = filepath.Join(d.Path, f)
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if err := d.step("delete"); err != nil {
			return err
		}
	}
	if err := d.remember(domain, p.Merged, p.Retired, p.Renames); err != nil {
		return err
	}
	if err := d.step("remember"); err != nil {
		return err
	}
	if err := os.Remove(d.pendingPath(domain)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return syncDir(d.Path)
}

// rewriteManifests applies renames, fresh checksums of the rehash files
// and the removal of merged-away files to every manifest of the domain that
// names them.
func (d *Dir) rewriteManifests(domain string, renames map[string]string, rehash, unchain []string) error {
	gone := map[string]bool{}
	for _, n := range unchain {
		gone[n] = true
	}
	fresh := map[string]File{}
	for _, name := range rehash {
		p := filepath.Join(d.Path, name)
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		sum, err := hashFile(p)
		if err != nil {
			return err
		}
		fresh[name] = File{Size: st.Size(), SHA256: sum}
	}
	update := func(f *File) bool {
		changed := false
		if to, ok := renames[f.Name]; ok {
			f.Name, changed = to, true
		}
		if nf, ok := fresh[f.Name]; ok && (nf.SHA256 != f.SHA256 || nf.Size != f.Size) {
			f.Size, f.SHA256, changed = nf.Size, nf.SHA256, true
		}
		return changed
	}
	for _, m := range d.Manifests(domain, nil) {
		changed := false
		for i := range m.Disks {
			kept := m.Disks[i].Chain[:0]
			for j := range m.Disks[i].Chain {
				f := m.Disks[i].Chain[j]
				if gone[f.Name] {
					changed = true
					continue
				}
				if update(&f) {
					changed = true
				}
				kept = append(kept, f)
			}
			m.Disks[i].Chain = kept
		}
		if m.NVRAM != nil && update(m.NVRAM) {
			changed = true
		}
		if changed {
			if err := d.WriteManifest(m); err != nil {
				return err
			}
		}
	}
	d.forgetHashes()
	return nil
}

func (d *Dir) forgetHashes() {
	d.st().hashMu.Lock()
	d.st().hashes = nil
	d.st().hashMu.Unlock()
}

// step lets a test stop a change after each of its steps, as a kill would.
func (d *Dir) step(name string) error {
	if d.StepHook == nil {
		return nil
	}
	return d.StepHook(name)
}
