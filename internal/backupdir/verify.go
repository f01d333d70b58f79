package backupdir

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/fi-backup/fi-backup/internal/copyfile"
	"github.com/fi-backup/fi-backup/internal/qcow2"
)

// Checker verifies restore points, reading each file once however many
// points share it.
type Checker struct {
	d      *Dir
	ctx    context.Context
	sums   map[string]sumResult
	checks map[string]error
}

type sumResult struct {
	sum  string
	size int64
	err  error
}

// Checker returns a checker for this directory.
func (d *Dir) Checker(ctx context.Context) *Checker {
	return &Checker{d: d, ctx: ctx, sums: map[string]sumResult{}, checks: map[string]error{}}
}

// Problem is one reason a restore point does not verify.
type Problem struct {
	File string // relative to DIR; "" for the point as a whole
	Err  error
}

func (p Problem) String() string {
	if p.File == "" {
		return p.Err.Error()
	}
	return fmt.Sprintf("'%s': %v", p.File, p.Err)
}

// Verify checks a restore point: every file it needs exists, its SHA-256
// and size are what the manifest recorded, qemu-img check passes, every
// backing reference resolves inside the directory to the file the manifest
// names, and virtual sizes agree. A point without a manifest gets the
// checks that need none (structure, qemu-img check).
func (c *Checker) Verify(p *Point) []Problem {
	var out []Problem
	bad := func(file string, format string, a ...any) {
		out = append(out, Problem{File: file, Err: fmt.Errorf(format, a...)})
	}
	if p.Broken != nil {
		out = append(out, Problem{Err: p.Broken})
	}
	if m := p.Manifest; m != nil {
		for _, disk := range m.Disks {
			for i, f := range disk.Chain {
				below := ""
				if i+1 < len(disk.Chain) {
					below = disk.Chain[i+1].Name
				}
				out = append(out, c.file(f, below, true)...)
			}
		}
		if m.NVRAM != nil {
			out = append(out, c.file(*m.NVRAM, "", false)...)
		}
		if m.XML != "" {
			if _, err := os.Stat(filepath.Join(c.d.Path, m.XML)); err != nil {
				bad(m.XML, "the domain definition is missing")
			}
		}
		if m.StateFile != "" && !filepath.IsAbs(m.StateFile) {
			if _, err := os.Stat(filepath.Join(c.d.Path, m.StateFile)); err != nil {
				bad(m.StateFile, "the state file is missing")
			}
		}
		return out
	}
	for _, disk := range p.Disks {
		for i, name := range disk.Chain {
			below := ""
			if i+1 < len(disk.Chain) {
				below = disk.Chain[i+1]
			}
			out = append(out, c.structure(name, disk.Format[i], below, false)...)
		}
	}
	return out
}

// file checks one file a manifest names.
func (c *Checker) file(f File, below string, image bool) []Problem {
	r, ok := c.sums[f.Name]
	if !ok {
		p := filepath.Join(c.d.Path, f.Name)
		st, err := os.Stat(p)
		if err == nil {
			r.size = st.Size()
			r.sum, err = copyfile.HashFile(p)
		}
		r.err = err
		c.sums[f.Name] = r
	}
	var out []Problem
	switch {
	case os.IsNotExist(r.err):
		return []Problem{{File: f.Name, Err: fmt.Errorf("missing")}}
	case r.err != nil:
		return []Problem{{File: f.Name, Err: r.err}}
	case r.size != f.Size:
		out = append(out, Problem{File: f.Name, Err: fmt.Errorf("is %d bytes, the manifest says %d", r.size, f.Size)})
	case r.sum != f.SHA256:
		out = append(out, Problem{File: f.Name, Err: fmt.Errorf("SHA-256 %s differs from the manifest's %s", r.sum, f.SHA256)})
	}
	if !image {
		return out
	}
	out = append(out, c.structure(f.Name, f.Format, below, true)...)
	if f.VirtualSize != 0 {
		if _, vs, err := qcow2.VirtualSize(filepath.Join(c.d.Path, f.Name)); err == nil && vs != f.VirtualSize {
			out = append(out, Problem{File: f.Name, Err: fmt.Errorf("virtual size %d differs from the manifest's %d", vs, f.VirtualSize)})
		}
	}
	return out
}

// structure checks an image's own consistency (qemu-img check) and that
// its backing reference names below (relative, as this tool writes it; or,
// for the old tool's copies, a host path with that basename).
func (c *Checker) structure(name, format, below string, exact bool) []Problem {
	p := filepath.Join(c.d.Path, name)
	var out []Problem
	err, ok := c.checks[name]
	if !ok {
		err = c.d.Tool.Check(c.ctx, p, format)
		c.checks[name] = err
	}
	if err != nil {
		out = append(out, Problem{File: name, Err: fmt.Errorf("qemu-img check failed: %v", err)})
	}
	if format == "raw" {
		if below != "" {
			out = append(out, Problem{File: name, Err: fmt.Errorf("a raw image cannot have '%s' below it", below)})
		}
		return out
	}
	ref, err := qcow2.BackingFile(p)
	switch {
	case err != nil:
		out = append(out, Problem{File: name, Err: err})
	case below == "" && ref != "":
		out = append(out, Problem{File: name, Err: fmt.Errorf("references '%s', but is the bottom of its chain", ref)})
	case below != "" && ref != below && (exact || filepath.Base(ref) != below):
		out = append(out, Problem{File: name, Err: fmt.Errorf("references '%s' instead of '%s'", ref, below)})
	}
	return out
}
