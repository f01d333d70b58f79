package backup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/lock"
	"github.com/fi-backup/fi-backup/internal/restore"
	"github.com/fi-backup/fi-backup/internal/snapshot"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// The restore-point commands: --list, --verify, --restore. They read the
// backup directory; --verify and --restore hold the domain's lock while
// they do, so that no backup or merge changes the files under them.

// owner attributes the files of a directory without manifests to the
// defined domains, by their host chains: a copy has its source's basename,
// and the old tool's overlays the stem of the disk's image.
func (r *Runner) owner(ctx context.Context) backupdir.Owner {
	type disk struct{ domain, target string }
	byName, byStem, byPath := map[string]disk{}, map[string]disk{}, map[string]disk{}
	above := map[string]string{} // host path → stamp of the overlay on it
	names, _ := r.hyp.List(virt.ListAll)
	for _, n := range names {
		dom, err := r.hyp.Lookup(n)
		if err != nil {
			continue
		}
		disks, err := dom.Disks()
		_ = dom.Close()
		if err != nil {
			continue
		}
		for _, d := range virt.FileDisks(disks) {
			chain := d.Chain
			if !d.Complete {
				if c, err := r.chains.OfFile(ctx, d.Source); err == nil {
					chain = c
				}
			}
			for i, img := range chain {
				k := disk{n, d.Target}
				byName[filepath.Base(img.Path)] = k
				byStem[stem(filepath.Base(img.Path))] = k
				byPath[img.Path] = k
				if i > 0 && snapshot.IsOverlay(chain[i-1].Path) {
					above[img.Path] = chain[i-1].Path[strings.LastIndex(chain[i-1].Path, ".bimg-")+len(".bimg-"):]
				}
			}
		}
	}
	hostPath := map[string]string{} // basename → host path, for the live-chain lookup
	for p := range byPath {
		hostPath[filepath.Base(p)] = p
	}
	return func(name, source string) backupdir.Origin {
		if k, ok := byPath[source]; ok && source != "" {
			return backupdir.Origin{Domain: k.domain, Target: k.target, Above: above[source]}
		}
		base := strings.SplitN(name, ".gen-", 2)[0]
		if k, ok := byName[base]; ok {
			o := backupdir.Origin{Domain: k.domain, Target: k.target}
			if base == name { // a generation is not what the live chain holds
				o.Above = above[hostPath[base]]
			}
			return o
		}
		if k, ok := byStem[stem(base)]; ok {
			return backupdir.Origin{Domain: k.domain, Target: k.target}
		}
		return backupdir.Origin{}
	}
}

// stem is a file name without its overlay suffix or its last extension:
// what libvirt's overlay naming keeps ("vm" for vm.qcow2, vm.bimg-T).
func stem(name string) string {
	if snapshot.IsOverlay(name) {
		return name[:strings.LastIndex(name, ".bimg-")]
	}
	if i := strings.LastIndexByte(name, '.'); i > 0 {
		return name[:i]
	}
	return name
}

// points lists the restore points of domains (all when empty); bad says
// that a manifest could not be read (it was reported).
func (r *Runner) points(ctx context.Context, domains []string) (pts []backupdir.Point, bad bool) {
	var want []string
	if len(domains) > 0 {
		want = domains
	}
	pts = r.dir.Points(want, r.owner(ctx), func(path string, err error) {
		r.p.Err("Cannot read the manifest '%s': %v", path, err)
		bad = true
	})
	return pts, bad
}

// ListFormat selects --list's output.
type ListFormat string

// List formats.
const (
	ListText ListFormat = "text"
	ListJSON ListFormat = "json"
)

// pointJSON is one line of --list --format=json.
type pointJSON struct {
	Domain      string          `json:"domain"`
	Moment      string          `json:"moment"`
	Time        string          `json:"time"`
	Approximate bool            `json:"approximate,omitempty"`
	Method      string          `json:"method,omitempty"`
	Disks       []pointDiskJSON `json:"disks"`
	Files       []string        `json:"files"`
	OwnBytes    int64           `json:"own_bytes"`
	Quiesced    bool            `json:"quiesced"`
	StateFile   string          `json:"state_file,omitempty"`
	Manifest    bool            `json:"manifest"`
	Broken      string          `json:"broken,omitempty"`
}

type pointDiskJSON struct {
	Target string   `json:"target,omitempty"`
	Name   string   `json:"name"`
	Chain  []string `json:"chain"`
}

// List prints the restore points of domains (every domain found in the
// directory when none), oldest first, one line each (--list).
func (r *Runner) List(ctx context.Context, domains []string, format ListFormat) error {
	pts, bad := r.points(ctx, domains)
	own := r.dir.OwnSize(pts)
	rows := make([]pointJSON, len(pts))
	for i, p := range pts {
		row := pointJSON{Domain: p.Domain, Moment: p.Moment, Time: p.Time.Format("2006-01-02T15:04:05Z07:00"),
			Approximate: p.Approx, Files: p.Files(), OwnBytes: own[i], Manifest: p.Manifest != nil}
		if row.Domain == "" {
			row.Domain = "-"
		}
		if m := p.Manifest; m != nil {
			row.Method, row.Quiesced, row.StateFile = m.Method, m.Quiesced, m.StateFile
		}
		if p.Broken != nil {
			row.Broken = p.Broken.Error()
		}
		for _, d := range p.Disks {
			row.Disks = append(row.Disks, pointDiskJSON{Target: d.Target, Name: d.Name, Chain: d.Chain})
		}
		rows[i] = row
	}
	if format == ListJSON {
		if rows == nil {
			rows = []pointJSON{}
		}
		b, err := json.MarshalIndent(rows, "", "  ")
		if err != nil {
			return err
		}
		r.p.Raw(string(b) + "\n")
		return failedIf(bad)
	}
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "DOMAIN\tMOMENT\tMETHOD\tDISKS\tOWN\tFLAGS\tMANIFEST\tFILES")
	for _, row := range rows {
		var flags []string
		if row.Quiesced {
			flags = append(flags, "quiesced")
		}
		if row.StateFile != "" {
			flags = append(flags, "state")
		}
		if row.Approximate {
			flags = append(flags, "approximate")
		}
		if row.Broken != "" {
			flags = append(flags, "broken")
		}
		if len(flags) == 0 {
			flags = []string{"-"}
		}
		method, manifest := row.Method, "yes"
		if !row.Manifest {
			method, manifest = "-", "no (unverified)"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", row.Domain, row.Moment, method, len(row.Disks),
			humanBytes(row.OwnBytes), strings.Join(flags, ","), manifest, strings.Join(row.Files, ","))
	}
	_ = w.Flush()
	r.p.Raw(b.String())
	return failedIf(bad)
}

func failedIf(bad bool) error {
	if bad {
		return ErrFailed
	}
	return nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ci", float64(n)/float64(div), "KMGTPE"[exp])
}

// domainsIn are the domains the directory holds restore points of.
func domainsIn(pts []backupdir.Point) []string {
	seen := map[string]bool{}
	var out []string
	for _, p := range pts {
		if p.Domain != "" && !seen[p.Domain] {
			seen[p.Domain] = true
			out = append(out, p.Domain)
		}
	}
	return out
}

// withLock runs fn holding the domain's lock (the old lock message on
// contention), after finishing any change of its backup files a killed
// run left half done.
func (r *Runner) withLock(name, what string, fn func() error) error {
	l, err := lock.TryLock(r.lockDir, name)
	if err != nil {
		if errors.Is(err, lock.ErrLocked) {
			r.p.Err("Another instance of %s is already running on '%s'! Skipping %s of '%s'", r.prog, name, what, name)
		} else {
			r.p.Err("Cannot lock domain '%s': %v. Skipping %s of '%s'", name, err, what, name)
		}
		return ErrFailed
	}
	defer func() { _ = l.Unlock() }()
	if err := r.dir.FinishPending(name); err != nil {
		r.p.Err("Cannot bring the manifests of '%s' up to date: %v", name, err)
		return ErrFailed
	}
	return fn()
}

// Verify checks every restore point of domains (every domain found in the
// directory when none): one line per point, then a summary (--verify).
func (r *Runner) Verify(ctx context.Context, domains []string) error {
	if len(domains) == 0 {
		pts, _ := r.points(ctx, nil)
		domains = domainsIn(pts)
	}
	checker := r.dir.Checker(ctx)
	total, bad := 0, 0
	failed := false
	for _, name := range domains {
		if ctx.Err() != nil {
			break
		}
		err := r.withLock(name, "verification", func() error {
			pts, badManifest := r.points(ctx, []string{name})
			if badManifest {
				bad++
			}
			if len(pts) == 0 {
				r.p.Err("No restore point of '%s' in '%s'", name, r.dir.Path)
				return ErrFailed
			}
			for i := range pts {
				p := &pts[i]
				total++
				problems := checker.Verify(p)
				if len(problems) > 0 {
					bad++
					var msgs []string
					for _, pr := range problems {
						msgs = append(msgs, pr.String())
					}
					r.p.Err("Restore point %s of '%s' does not verify: %s", p.Moment, name, strings.Join(msgs, "; "))
					continue
				}
				if p.Manifest == nil {
					r.p.Warn("Restore point %s of '%s' has no manifest (written before manifests): its structure is sound, its contents cannot be verified", p.Moment, name)
					continue
				}
				r.p.Info("Restore point %s of '%s' verified (%d files)", p.Moment, name, len(p.Files()))
			}
			return nil
		})
		if err != nil {
			failed = true
		}
	}
	if bad > 0 {
		r.p.Err("%d of %d restore points (or their manifests) do not verify", bad, total)
		return ErrFailed
	}
	r.p.Info("%d restore points verified", total)
	if failed {
		return ErrFailed
	}
	return nil
}

// Restore writes the restore point of domain at moment ("latest": the
// newest) into target (--restore): it is verified first, and refused when
// any file it needs does not verify.
func (r *Runner) Restore(ctx context.Context, domain, moment, target string) error {
	return r.withLock(domain, "restore", func() error {
		pts, _ := r.points(ctx, []string{domain})
		p, err := backupdir.Select(pts, domain, moment)
		if err != nil {
			r.p.Err("Cannot restore: %v", err)
			return ErrFailed
		}
		if problems := r.dir.Checker(ctx).Verify(p); len(problems) > 0 {
			for _, pr := range problems {
				r.p.Err("Restore point %s of '%s' does not verify: %s", p.Moment, domain, pr)
			}
			r.p.Err("Not restoring a restore point that does not verify")
			return ErrFailed
		}
		if p.Manifest == nil {
			r.p.Warn("Restore point %s of '%s' has no manifest: its contents cannot be verified before the restore", p.Moment, domain)
		}
		job := &restore.Job{P: r.p, Dir: r.dir, Point: p, Target: target, Rate: r.cfg.RateLimit,
			Definition: func() (string, error) {
				dom, err := r.hyp.Lookup(domain)
				if err != nil {
					return "", err
				}
				defer dom.Close()
				return dom.Definition()
			}}
		if err := job.Run(ctx); err != nil {
			return ErrFailed
		}
		return nil
	})
}
