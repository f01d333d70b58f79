package backupdir

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/fi-backup/fi-backup/internal/copyfile"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/snapshot"
	"golang.org/x/time/rate"
)

// Retention (--keep=N) gives up a domain's oldest restore points so that
// the N newest remain, inside the backup directory only (never a host file):
//
//	before:  B ◄── O1 ◄── O2 ◄── O3 ◄── O4 ◄── O5      points T1 (B) … T6 (O5)
//	keep 3:  B' ◄── O3 ◄── O4 ◄── O5                  points T4, T5, T6
//	         B' = B with O1 and O2 committed into it, under B's name and mtime
//
// The layers below the oldest kept point's top are committed into the copy
// of the disk's own image below them (the first file that is not a copy of
// an overlay, as a consolidation chooses its base: never a template below
// it). A commit into a lower file never changes what a chain read through
// the layers above it shows. The kept chains are rebased onto that copy;
// what no kept point needs goes, with the metadata and state files of the
// points given up. One redo record covers it all (see Pending), so a
// kill at any moment leaves every kept point exact and the next run
// finishes the merge.

// MergedSource is a host file whose copy was merged into the copy Into:
// while the host file is unchanged (same size and mtime), it is not copied
// again (without -C the host chain still holds it).
type MergedSource struct {
	Source string `json:"source"`
	Size   int64  `json:"size"`
	MTime  int64  `json:"mtime"` // ns
	Into   string `json:"into"`
}

// retention is what a domain's retention left to remember, in
// DIR/.fi-backup/<domain>/.retention.json (hidden: not a manifest).
type retention struct {
	// Merged are host files not to copy again (see MergedSource).
	Merged []MergedSource `json:"merged,omitempty"`
	// Retired are backup files that stay (a base below kept restore
	// points) but no longer are the top of a restore point of their own:
	// the listing must not show them as points of the old tool.
	Retired []string `json:"retired,omitempty"`
}

// Prune gives up the oldest restore points of domain so that keep remain
// (keep ≥ 1) and reports the moments given up and the disk space freed. owner attributes files
// of points without manifests. Pruning that cannot be done safely (a kept
// point is broken, too little free space to merge) is reported with a
// warning and skipped: nothing is lost, the directory just keeps more.
func (d *Dir) Prune(ctx context.Context, domain string, keep int, owner Owner) (gone []string, freed int64, err error) {
	if keep < 1 {
		return nil, 0, fmt.Errorf("keep must be at least 1, not %d", keep)
	}
	if err := d.FinishPending(domain); err != nil {
		return nil, 0, err
	}
	pts := d.Points([]string{domain}, owner, nil)
	if len(pts) <= keep {
		d.P.Debug("'%s' has %d restore points in '%s': none to prune (--keep=%d)", domain, len(pts), d.Path, keep)
		return nil, 0, nil
	}
	dropped, kept := pts[:len(pts)-keep], pts[len(pts)-keep:]
	for _, pt := range kept {
		if pt.Broken != nil {
			d.P.Warn("Not pruning the restore points of '%s': the kept restore point %s is broken (%v)", domain, pt.Moment, pt.Broken)
			return nil, 0, nil
		}
	}
	p, err := d.plan(domain, dropped, kept)
	if err != nil {
		return nil, 0, err
	}
	if need, have, ok := d.roomToMerge(p); !ok {
		d.P.Warn("Not pruning the restore points of '%s': merging them needs up to %s free in '%s', which has %s", domain, human(need), d.Path, human(have))
		return nil, 0, nil
	}
	before := d.usage()
	for _, pt := range dropped {
		d.P.Info("Pruning restore point %s of '%s' (--keep=%d)", pt.Moment, domain, keep)
		gone = append(gone, pt.Moment)
	}
	if err := d.apply(ctx, domain, p); err != nil {
		return gone, 0, err
	}
	return gone, before - d.usage(), nil
}

// plan is the redo record that gives up dropped and keeps kept exact.
func (d *Dir) plan(domain string, dropped, kept []Point) (Pending, error) {
	var p Pending
	needed := map[string]bool{}
	for _, pt := range kept {
		for _, f := range pt.Files() {
			needed[f] = true
		}
	}
	// The kept chains, and per merge target (see mergeTarget) the oldest
	// kept chain above it: kept points are oldest first.
	var chains [][]string
	oldest := map[string][]string{}
	at := map[string]int{}
	formats := map[string]string{}
	for _, pt := range kept {
		for _, disk := range pt.Disks {
			c := disk.Chain
			if len(c) == 0 {
				continue
			}
			chains = append(chains, c)
			for i, f := range c {
				formats[f] = disk.Format[i]
			}
			if t := mergeTarget(c); t >= 2 && oldest[c[t]] == nil {
				oldest[c[t]], at[c[t]] = c, t
			}
		}
	}
	targets := make([]string, 0, len(oldest))
	for b := range oldest {
		targets = append(targets, b)
	}
	sort.Strings(targets)
	sources := d.sources(domain)
	others := d.namedByOthers(domain)
	for _, b := range targets {
		c, t := oldest[b], at[b]
		middle := c[1:t]
		if !allContain(containing(chains, b), middle) {
			continue // another kept chain reads the target without these layers
		}
		if others[b] {
			d.P.Warn("Not merging into '%s': a restore point of another domain needs it", b)
			continue
		}
		if formats[b] != "qcow2" && formats[b] != "raw" {
			continue
		}
		st, err := os.Stat(filepath.Join(d.Path, b))
		if err != nil {
			return p, err
		}
		m := Merge{Chain: c[1:], Base: t - 1, MTime: st.ModTime().UnixNano(), ATime: atime(st).UnixNano()}
		for _, f := range m.Chain {
			m.Formats = append(m.Formats, formats[f])
		}
		p.Merges = append(p.Merges, m)
		p.Rebases = append(p.Rebases, Rebase{File: c[0], Backing: b, Format: formats[b]})
		p.Rehash = append(p.Rehash, b, c[0])
		for _, f := range middle {
			p.Unchain = append(p.Unchain, f)
			delete(needed, f)
			if src, ok := sources[f]; ok {
				if sst, err := os.Stat(src); err == nil {
					p.Merged = append(p.Merged, MergedSource{Source: src, Size: sst.Size(), MTime: sst.ModTime().UnixNano(), Into: b})
				}
			}
		}
	}
	seen := map[string]bool{}
	del := func(f string) {
		if !needed[f] && !seen[f] {
			seen[f] = true
			p.Deletes = append(p.Deletes, f)
		}
	}
	for _, f := range p.Unchain {
		del(f)
	}
	for _, pt := range dropped {
		for _, f := range pt.Files() {
			del(f)
		}
		for _, disk := range pt.Disks {
			if len(disk.Chain) > 0 && needed[disk.Chain[0]] {
				p.Retired = append(p.Retired, disk.Chain[0])
			}
		}
		if m := pt.Manifest; m != nil {
			p.Drop = append(p.Drop, m.Moment)
			if m.StateFile != "" && !filepath.IsAbs(m.StateFile) {
				del(m.StateFile) // one outside DIR is the admin's to delete
			}
		}
	}
	return p, nil
}

// namedByOthers is the set of backup files a manifest of another domain
// names.
func (d *Dir) namedByOthers(domain string) map[string]bool {
	out := map[string]bool{}
	for _, dom := range d.ManifestDomains() {
		if dom == domain {
			continue
		}
		for _, m := range d.Manifests(dom, nil) {
			for _, f := range m.Files() {
				out[f] = true
			}
		}
	}
	return out
}

// roomToMerge checks that the file system can take the merges of p: each
// base grows by at most the allocated size of the layers merged into it,
// and a base with other hard links is copied first.
func (d *Dir) roomToMerge(p Pending) (need, have int64, ok bool) {
	for _, m := range p.Merges {
		for _, f := range m.Chain[:m.Base] {
			need += allocated(filepath.Join(d.Path, f))
		}
		base := filepath.Join(d.Path, m.Chain[m.Base])
		if st, err := os.Stat(base); err == nil {
			if s, ok := st.Sys().(*syscall.Stat_t); ok && s.Nlink > 1 {
				need += allocated(base)
			}
		}
	}
	if need == 0 {
		return 0, 0, true
	}
	var fs syscall.Statfs_t
	if err := syscall.Statfs(d.Path, &fs); err != nil {
		return need, 0, true // unknown: let the merge tell
	}
	have = int64(fs.Bavail) * int64(fs.Bsize)
	return need, have, need <= have
}

// usage is the disk space the directory's files take.
func (d *Dir) usage() int64 {
	var total int64
	filepath.WalkDir(d.Path, func(path string, e os.DirEntry, err error) error {
		if err == nil && e.Type().IsRegular() {
			total += allocated(path)
		}
		return nil
	})
	return total
}

func human(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// mergeTarget is the index of the file a chain's increments are merged
// into, as a consolidation would (blockjob.Base): the first file below the
// top that is not an increment — not a copy of a .bimg- overlay, not a
// .cbt- file — so the disk's own image, never a template below it; or the
// bottom when all are increments. A --cbt chain is all .cbt- files down to
// its full backup at the bottom, which has no backing file: its increments
// are merged into that full file.
func mergeTarget(chain []string) int {
	for i := 1; i < len(chain); i++ {
		base := strings.SplitN(chain[i], ".gen-", 2)[0]
		if !snapshot.IsOverlay(base) && !IsCBT(base) {
			return i
		}
	}
	return len(chain) - 1
}

// containing lists the chains that hold file.
func containing(chains [][]string, file string) [][]string {
	var out [][]string
	for _, c := range chains {
		for _, f := range c {
			if f == file {
				out = append(out, c)
				break
			}
		}
	}
	return out
}

// allContain reports whether every chain holds all of files.
func allContain(chains [][]string, files []string) bool {
	for _, c := range chains {
		in := map[string]bool{}
		for _, f := range c {
			in[f] = true
		}
		for _, f := range files {
			if !in[f] {
				return false
			}
		}
	}
	return true
}

// sources maps the domain's backup files to the host files they were
// copied from, as the manifests record them.
func (d *Dir) sources(domain string) map[string]string {
	out := map[string]string{}
	for _, m := range d.Manifests(domain, nil) {
		for _, disk := range m.Disks {
			for _, f := range disk.Chain {
				if f.Source != "" {
					out[f.Name] = f.Source
				}
			}
		}
	}
	return out
}

// mergeAll carries out the merges of a prune.
func (d *Dir) mergeAll(ctx context.Context, merges []Merge) error {
	for _, m := range merges {
		if err := d.merge(ctx, m); err != nil {
			return err
		}
	}
	return nil
}

// merge commits the layers of m.Chain into its base, reading only files of
// the directory (the chain is named to qemu-img explicitly, whatever the
// headers say), then puts the base's times back. Done twice, it writes the
// same data again.
func (d *Dir) merge(ctx context.Context, m Merge) error {
	base := filepath.Join(d.Path, m.Chain[m.Base])
	if err := d.private(ctx, base); err != nil {
		return err
	}
	if err := d.relativeBacking(ctx, m, base); err != nil {
		return err
	}
	chain := make([]qcow2.Image, len(m.Chain))
	for i, f := range m.Chain {
		chain[i] = qcow2.Image{Path: f, Format: m.Formats[i]}
	}
	d.P.Debug("Committing %v into '%s'", m.Chain[:m.Base], base)
	if err := d.Tool.CommitIn(ctx, d.Path, chain, m.Base, d.bytesPerSecond()); err != nil {
		return err
	}
	return os.Chtimes(base, time.Unix(0, m.ATime), time.Unix(0, m.MTime))
}

// relativeBacking makes a merge target copied by the old tool, whose
// header names its parent by the host path, name the parent's copy in DIR
// by its relative name (as this tool's copies do): the merge reads only the
// directory, and QEMU finds the target by the name its parent references.
func (d *Dir) relativeBacking(ctx context.Context, m Merge, base string) error {
	if m.Base+1 >= len(m.Chain) {
		return nil
	}
	parent := m.Chain[m.Base+1]
	cur, err := backingOf(base)
	if err != nil || cur == parent || filepath.Base(cur) != parent {
		return nil
	}
	st, err := os.Stat(base)
	if err != nil {
		return err
	}
	if err := d.setBacking(ctx, base, parent, m.Formats[m.Base+1]); err != nil {
		return err
	}
	d.keepTimes(base, st)
	return nil
}

// withoutMerges is what remains of a prune whose merges failed: the kept
// points keep reading the layers that were to be merged (a partly merged
// base is invisible under them), so those stay, and only what no kept
// point needs goes. The base's checksum is read again all the same.
func (p Pending) withoutMerges() Pending {
	keep := map[string]bool{}
	for _, m := range p.Merges {
		for _, f := range m.Chain[:m.Base] {
			keep[f] = true
		}
	}
	q := p
	// A prune's rebases are those of the merges' tops.
	q.Merges, q.Unchain, q.Merged, q.Rebases, q.Deletes = nil, nil, nil, nil, nil
	for _, f := range p.Deletes {
		if !keep[f] {
			q.Deletes = append(q.Deletes, f)
		}
	}
	return q
}

// private makes sure a file about to be changed in place has no other
// name: a hard link (a generation in the making) would see the change too.
// It is copied, and the copy renamed over the name.
func (d *Dir) private(ctx context.Context, path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if s, ok := st.Sys().(*syscall.Stat_t); !ok || s.Nlink <= 1 {
		return nil
	}
	d.P.Debug("'%s' has other names: copying it before it changes", path)
	_, err = copyfile.Unshare(ctx, path, copyfile.Options{Preserve: true, Limit: d.Limit})
	return err
}

// bytesPerSecond is the run's rate limit for qemu-img (0: none).
func (d *Dir) bytesPerSecond() int64 {
	if d.Limit == nil || d.Limit.Limit() == rate.Inf {
		return 0
	}
	return int64(d.Limit.Limit())
}

// dropMeta removes a restore point's records (manifest first).
func (d *Dir) dropMeta(domain, moment string) error {
	for _, suffix := range []string{".json", ".sha256", ".xml", ".nvram"} {
		if err := os.Remove(d.MetaPath(domain, moment, suffix)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	d.forgetHashes()
	return nil
}

func (d *Dir) retentionPath(domain string) string {
	return filepath.Join(d.Path, MetaDir, domain, ".retention.json")
}

// readRetention reads what retention remembers of domain.
func (d *Dir) readRetention(domain string) retention {
	var r retention
	b, err := os.ReadFile(d.retentionPath(domain))
	if err != nil {
		return r
	}
	if json.Unmarshal(b, &r) != nil {
		d.P.Warn("Ignoring '%s': not a retention record", d.retentionPath(domain))
		return retention{}
	}
	return r
}

func (d *Dir) writeRetention(domain string, r retention) error {
	sort.Slice(r.Merged, func(i, j int) bool { return r.Merged[i].Source < r.Merged[j].Source })
	sort.Strings(r.Retired)
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return writeAtomic(d.retentionPath(domain), append(b, '\n'))
}

// mergedSources maps the host files whose copies were merged away to
// their records.
func (d *Dir) mergedSources(domain string) map[string]MergedSource {
	out := map[string]MergedSource{}
	for _, m := range d.readRetention(domain).Merged {
		out[m.Source] = m
	}
	return out
}

// current reports whether the host file is as it was when its copy was
// merged away.
func (m MergedSource) current() bool {
	st, err := os.Stat(m.Source)
	return err == nil && st.Size() == m.Size && st.ModTime().UnixNano() == m.MTime
}

// forgetStaleMerged drops the records of host files that changed or went
// away (consolidated): a copy of them is never skipped again.
func (d *Dir) forgetStaleMerged(domain string) {
	r := d.readRetention(domain)
	var keep []MergedSource
	for _, m := range r.Merged {
		if m.current() {
			keep = append(keep, m)
		}
	}
	if len(keep) == len(r.Merged) {
		return
	}
	r.Merged = keep
	if err := d.writeRetention(domain, r); err != nil {
		d.P.Warn("Could not update '%s': %v", d.retentionPath(domain), err)
	}
}

// remember adds a finished prune's records, and applies renames (a
// generation) to the retired names.
func (d *Dir) remember(domain string, merged []MergedSource, retired []string, renames map[string]string) error {
	r := d.readRetention(domain)
	if len(merged) == 0 && len(retired) == 0 && !anyRenamed(r.Retired, renames) {
		return nil
	}
	bySource := map[string]int{}
	for i, m := range r.Merged {
		bySource[m.Source] = i
	}
	for _, m := range merged {
		if i, ok := bySource[m.Source]; ok {
			r.Merged[i] = m
		} else {
			r.Merged = append(r.Merged, m)
		}
	}
	set := map[string]bool{}
	for _, n := range append(r.Retired, retired...) {
		if to, ok := renames[n]; ok {
			n = to
		}
		set[n] = true
	}
	r.Retired = r.Retired[:0]
	for n := range set {
		r.Retired = append(r.Retired, n)
	}
	return d.writeRetention(domain, r)
}

func anyRenamed(names []string, renames map[string]string) bool {
	for _, n := range names {
		if _, ok := renames[n]; ok {
			return true
		}
	}
	return false
}

// retired is the set of files, over all domains, that are no longer the
// top of a restore point.
func (d *Dir) retired() map[string]bool {
	out := map[string]bool{}
	for _, dom := range d.ManifestDomains() {
		for _, n := range d.readRetention(dom).Retired {
			out[n] = true
		}
	}
	return out
}
