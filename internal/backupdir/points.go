package backupdir

import (
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
)

// A restore point is the state of a domain's disks at one moment, as the
// backup directory holds it: for each disk a chain of files, top first.
// Restore point T is topped by the copy of the layer that was active until
// the snapshot bimg-T was taken (the base copy for the first run; the copy
// of vm.bimg-T1 for the run at T2); for an offline copy, T is the time of
// the copy. Points recorded by a manifest are exact; the others (written by
// the old script, or before manifests) are found from the files and their
// backing references, with a moment taken from the snapshot names around
// them, or from the top copy's mtime (then marked approximate).

// Point is one restore point.
type Point struct {
	Domain   string
	Moment   string // YYYYMMDD-HHMMSS
	Time     time.Time
	Approx   bool      // the moment is a file's mtime, not a snapshot's
	Manifest *Manifest // nil for a point found from the files alone
	Disks    []PointDisk
	Broken   error // the files cannot form the point (a missing link)
}

// PointDisk is one disk of a restore point.
type PointDisk struct {
	Target string   // vda, ... ("" when unknown)
	Name   string   // the file name a restore gives it
	Chain  []string // backup files, relative to DIR, top first
	Format []string // their formats
}

// Files lists every backup file the point needs, each once.
func (p *Point) Files() []string {
	if p.Manifest != nil {
		return p.Manifest.Files()
	}
	seen := map[string]bool{}
	var out []string
	for _, d := range p.Disks {
		for _, f := range d.Chain {
			if !seen[f] {
				seen[f] = true
				out = append(out, f)
			}
		}
	}
	return out
}

// Owner attributes a backup file of a directory without manifests to the
// domain and disk whose host chain it comes from: name is its name in DIR,
// source the host path it records (xattr), if any.
type Owner func(name, source string) Origin

// Origin is where a backup file comes from ("" where unknown).
type Origin struct {
	Domain, Target string
	// Above is the snapshot stamp (YYYYMMDD-HHMMSS) of the overlay that
	// sits on the file's source in the domain's live chain: the snapshot
	// that froze it.
	Above string
}

// Points lists the restore points of the given domains (all when nil),
// oldest first. Manifests that cannot be read are reported through bad.
func (d *Dir) Points(domains []string, owner Owner, bad func(path string, err error)) []Point {
	want := func(dom string) bool {
		if domains == nil {
			return true
		}
		for _, w := range domains {
			if w == dom {
				return true
			}
		}
		return false
	}
	var pts []Point
	covered := d.retired()
	for _, dom := range d.ManifestDomains() {
		for _, m := range d.Manifests(dom, bad) {
			for _, disk := range m.Disks {
				if len(disk.Chain) > 0 {
					covered[disk.Chain[0].Name] = true
				}
				for _, f := range disk.Chain {
					if f.Copied {
						covered[f.Name] = true
					}
				}
			}
			if !want(dom) {
				continue
			}
			p := Point{Domain: dom, Moment: m.Moment, Manifest: m}
			p.Time, _ = m.When()
			for _, disk := range m.Disks {
				if !disk.BackedUp {
					continue
				}
				pd := PointDisk{Target: disk.Target, Name: disk.Name}
				for _, f := range disk.Chain {
					pd.Chain = append(pd.Chain, f.Name)
					pd.Format = append(pd.Format, f.Format)
				}
				p.Disks = append(p.Disks, pd)
			}
			pts = append(pts, p)
		}
	}
	for _, p := range d.legacyPoints(covered, owner) {
		if want(p.Domain) {
			pts = append(pts, p)
		}
	}
	sort.SliceStable(pts, func(i, j int) bool {
		if pts[i].Domain != pts[j].Domain {
			return pts[i].Domain < pts[j].Domain
		}
		return pts[i].Time.Before(pts[j].Time)
	})
	return pts
}

// candidate is a backup file of the directory seen without a manifest.
type candidate struct {
	name    string
	parent  string // its backing file's name in DIR, "" for none
	broken  error  // its backing file is not in DIR
	format  string
	mtime   time.Time
	domain  string
	target  string
	overlay string // the snapshot stamp in its name (YYYYMMDD-HHMMSS), if any
	above   string // the stamp of the host overlay on its source, if known
}

// legacyPoints finds the restore points no manifest records, from the
// files themselves: every copy the old tool made was the top of a restore
// point when it was made.
func (d *Dir) legacyPoints(covered map[string]bool, owner Owner) []Point {
	entries, err := os.ReadDir(d.Path)
	if err != nil {
		return nil
	}
	files := map[string]*candidate{}
	for _, e := range entries {
		n := e.Name()
		if !e.Type().IsRegular() || strings.HasPrefix(n, ".") || copyfile.IsTemp(n) || isStateFile(n) {
			continue
		}
		c := &candidate{name: n}
		p := filepath.Join(d.Path, n)
		format, _, err := qcow2.VirtualSize(p)
		if err != nil {
			continue
		}
		c.format = format
		if format == "qcow2" {
			ref, err := qcow2.BackingFile(p)
			if err != nil {
				continue
			}
			if ref != "" {
				c.parent = filepath.Base(ref) // relative (ours) or the host path (the old tool's)
				if filepath.IsAbs(ref) || !strings.Contains(ref, "/") {
					if _, err := os.Stat(filepath.Join(d.Path, c.parent)); err != nil {
						c.broken = fmt.Errorf("'%s' needs '%s', which is not in the backup directory", n, ref)
					}
				} else {
					c.broken = fmt.Errorf("'%s' needs '%s', outside the backup directory", n, ref)
				}
			}
		}
		if st, err := e.Info(); err == nil {
			c.mtime = st.ModTime()
		}
		var origin Origin
		if owner != nil {
			origin = owner(n, getSource(p))
		}
		c.domain, c.target, c.above = origin.Domain, origin.Target, origin.Above
		base := strings.SplitN(n, ".gen-", 2)[0]
		if snapshot.IsOverlay(base) {
			c.overlay = base[strings.LastIndex(base, ".bimg-")+len(".bimg-"):]
		}
		if format == "raw" && c.domain == "" {
			continue // a raw file no domain's disk explains: not a copy
		}
		files[n] = c
	}
	children := map[string][]*candidate{}
	for _, c := range files {
		if c.parent != "" {
			children[c.parent] = append(children[c.parent], c)
		}
	}
	type key struct{ domain, moment string }
	byKey := map[key]*Point{}
	var order []key
	for _, c := range files {
		if covered[c.name] {
			continue
		}
		// The moment of the point c tops: the snapshot that froze it,
		// named by the overlay written on top of it.
		moment, approx := "", false
		for _, ch := range children[c.name] {
			if ch.overlay != "" && (moment == "" || ch.overlay < moment) {
				moment = ch.overlay
			}
		}
		if moment == "" {
			moment = c.above
		}
		if moment == "" {
			moment, approx = c.mtime.Format(snapshot.TimestampLayout), true
		}
		pd := PointDisk{Target: c.target}
		var broken error
		seen := map[string]bool{}
		for cur := c; cur != nil; cur = files[cur.parent] {
			if seen[cur.name] {
				broken = fmt.Errorf("'%s' is its own backing file", cur.name)
				break
			}
			seen[cur.name] = true
			pd.Chain = append(pd.Chain, cur.name)
			pd.Format = append(pd.Format, cur.format)
			if cur.broken != nil {
				broken = cur.broken
				break
			}
			if cur.parent == "" {
				break
			}
			if files[cur.parent] == nil {
				broken = fmt.Errorf("'%s' needs '%s', which is not a usable image in the backup directory", cur.name, cur.parent)
				break
			}
		}
		pd.Name = strings.SplitN(pd.Chain[len(pd.Chain)-1], ".gen-", 2)[0]
		for _, n := range pd.Chain {
			base := strings.SplitN(n, ".gen-", 2)[0]
			if !snapshot.IsOverlay(base) {
				pd.Name = base
				break
			}
		}
		k := key{c.domain, moment}
		p := byKey[k]
		if p == nil {
			p = &Point{Domain: c.domain, Moment: moment, Approx: approx}
			p.Time, _ = time.ParseInLocation(snapshot.TimestampLayout, moment, time.Local)
			byKey[k] = p
			order = append(order, k)
		}
		p.Disks = append(p.Disks, pd)
		if broken != nil && p.Broken == nil {
			p.Broken = broken
		}
	}
	out := make([]Point, 0, len(order))
	for _, k := range order {
		p := byKey[k]
		sort.Slice(p.Disks, func(i, j int) bool { return p.Disks[i].Target+p.Disks[i].Name < p.Disks[j].Target+p.Disks[j].Name })
		out = append(out, *p)
	}
	return out
}

func isStateFile(name string) bool {
	return strings.Contains(name, ".statefile-") && strings.HasSuffix(name, ".gz")
}

// Select picks a domain's restore point by moment ("latest": the newest).
func Select(pts []Point, domain, moment string) (*Point, error) {
	var found *Point
	for i := range pts {
		p := &pts[i]
		if p.Domain != domain {
			continue
		}
		if moment == "latest" || p.Moment == moment {
			found = p // oldest first: the last one wins
		}
	}
	if found == nil {
		if moment == "latest" {
			return nil, fmt.Errorf("no restore point of '%s' in the backup directory", domain)
		}
		return nil, fmt.Errorf("no restore point of '%s' at %s", domain, moment)
	}
	return found, nil
}

// OwnSize is the space each point alone holds: the allocated size of the
// files no other point (of any domain) needs.
func (d *Dir) OwnSize(pts []Point) []int64 {
	users := map[string]int{}
	for i := range pts {
		for _, f := range pts[i].Files() {
			users[f]++
		}
	}
	out := make([]int64, len(pts))
	for i := range pts {
		for _, f := range pts[i].Files() {
			if users[f] == 1 {
				out[i] += allocated(filepath.Join(d.Path, f))
			}
		}
	}
	return out
}

// allocated is the disk space a file takes (its blocks, holes excluded).
func allocated(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return s.Blocks * 512
	}
	return st.Size()
}

// errNoFile marks a file a point needs that is not there.
var errNoFile = errors.New("missing")
