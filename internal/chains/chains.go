// Package chains knows which backing-chain files the defined domains of the
// host use, so that nothing another domain needs is written into, copied
// over or deleted. Running domains describe their chains in the live XML;
// shut-off ones are asked to qemu-img. A chain that cannot be read is named,
// and everything is then treated as possibly in use (fail closed).
package chains

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"

	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// Reader reads chains.
type Reader struct {
	P    *logging.Printer
	Hyp  virt.Hypervisor
	Tool qcow2.Tool
}

// Users maps the files in the chains of some domains to a domain using
// each. Unreadable names the domains whose chains could not be read
// completely: what they use beyond what is listed is unknown.
type Users struct {
	byPath     map[string]string
	byID       map[fileID]string
	unreadable []string
}

// Of is a domain using path, or "".
func (u *Users) Of(path string) string { return u.byPath[path] }

// Complete reports whether every chain could be read.
func (u *Users) Complete() bool { return len(u.unreadable) == 0 }

// Why says which chains could not be read.
func (u *Users) Why() string {
	return "the backing chain of " + strings.Join(u.unreadable, ", ") + " could not be read"
}

// Holding returns the domain using the file st describes, whatever the path
// it is reached by (same device and inode), or "".
func (u *Users) Holding(st os.FileInfo) string {
	if u.byID == nil {
		u.byID = map[fileID]string{}
		for p, dom := range u.byPath {
			if s, err := os.Stat(p); err == nil {
				u.byID[idOf(s)] = dom
			}
		}
	}
	return u.byID[idOf(st)]
}

// Add records that dom uses paths (for a domain whose chains the caller
// knows already).
func (u *Users) Add(dom string, paths ...string) {
	if u.byPath == nil {
		u.byPath = map[string]string{}
	}
	for _, p := range paths {
		u.byPath[p] = dom
	}
	u.byID = nil
}

type fileID struct{ dev, ino uint64 }

func idOf(st os.FileInfo) fileID {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return fileID{dev: s.Dev, ino: s.Ino}
	}
	return fileID{}
}

// Others reads the chains of every defined domain but self. With warn,
// each domain whose chain cannot be read is named in a [WAR] (where the
// caller is about to refuse something because of it).
func (r Reader) Others(ctx context.Context, self string, warn bool) *Users {
	u := &Users{byPath: map[string]string{}}
	names, err := r.Hyp.List(virt.ListAll)
	if err != nil {
		if warn {
			r.P.Warn("Cannot list domains to check shared backing files: %s", virt.Describe(err))
		}
		u.unreadable = append(u.unreadable, "every other domain")
		return u
	}
	for _, n := range names {
		if n == self {
			continue
		}
		if err := r.add(ctx, u, n); err != nil {
			if warn {
				r.P.Warn("Cannot read the backing chain of domain '%s': %v", n, err)
			}
			u.unreadable = append(u.unreadable, "domain '"+n+"'")
		}
	}
	return u
}

func (r Reader) add(ctx context.Context, u *Users, n string) error {
	dom, err := r.Hyp.Lookup(n)
	if errors.Is(err, virt.ErrNoDomain) {
		return nil // undefined meanwhile
	}
	if err != nil {
		return errors.New(virt.Describe(err))
	}
	disks, err := dom.Disks()
	_ = dom.Close()
	if err != nil {
		return errors.New(virt.Describe(err))
	}
	var failed error
	for _, d := range virt.FileDisks(disks) {
		chain := d.Chain
		if !d.Complete { // inactive XML: ask qemu-img
			c, err := r.OfFile(ctx, d.Source)
			if err != nil {
				// What is listed is still taken as used; the rest of the
				// chain is unknown.
				failed = fmt.Errorf("disk '%s': %v", d.Target, err)
			}
			chain = append(chain, c...)
		}
		for _, img := range chain {
			u.byPath[img.Path] = n
		}
	}
	return failed
}

// OfFile walks the backing chain of an image file that no running domain
// describes (a shut-off domain's disk), top first. A missing link is an
// error, never a shorter chain. The walk reads the headers itself, without
// a qemu-img process, unless the chain holds a format or protocol only
// qemu-img reads.
func (r Reader) OfFile(ctx context.Context, path string) ([]virt.Image, error) {
	c, err := qcow2.Chain(path)
	if errors.Is(err, qcow2.ErrUnsupported) {
		c, err = r.Tool.Chain(ctx, path)
	}
	if err != nil {
		return nil, err
	}
	imgs := make([]virt.Image, len(c))
	for i, img := range c {
		imgs[i] = virt.Image{Path: img.Path, Format: img.Format}
	}
	return imgs, nil
}
