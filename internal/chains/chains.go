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
	"sync"
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
	// Cache, when set, keeps the chains Others read, for the rest of a
	// run: with -C over N domains each domain's chain is then read once,
	// not once for every other domain. nil: every call reads again.
	Cache *Cache
}

// Cache holds the chains of the domains read in one run. A domain's entry
// must be dropped (Forget) whenever its chain may change: the run does
// that at the start and at the end of each domain's turn, so a turn that
// deletes files of its domain reads that domain's own chain afresh, and
// every later turn sees its chain as the turn left it. Domains whose chain
// could not be read completely are not kept: they are read again (and
// named again) each time. Safe for concurrent turns.
type Cache struct {
	mu    sync.Mutex
	paths map[string][]string
}

// NewCache returns an empty cache.
func NewCache() *Cache { return &Cache{paths: map[string][]string{}} }

// Forget drops what the cache holds of dom.
func (c *Cache) Forget(dom string) {
	if c == nil {
		return
	}
	c.mu.Lock()
	delete(c.paths, dom)
	c.mu.Unlock()
}

func (c *Cache) get(dom string) ([]string, bool) {
	if c == nil {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.paths[dom]
	return p, ok
}

func (c *Cache) put(dom string, paths []string) {
	if c == nil {
		return
	}
	c.mu.Lock()
	c.paths[dom] = paths
	c.mu.Unlock()
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
		paths, ok := r.Cache.get(n)
		if !ok {
			var err error
			paths, err = r.read(ctx, n)
			if err != nil {
				if warn {
					r.P.Warn("Cannot read the backing chain of domain '%s': %v", n, err)
				}
				u.unreadable = append(u.unreadable, "domain '"+n+"'")
			} else {
				r.Cache.put(n, paths)
			}
		}
		for _, p := range paths {
			u.byPath[p] = n
		}
	}
	return u
}

// read lists the files of domain n's chains. With an error, what it lists
// is still used; the rest is unknown.
func (r Reader) read(ctx context.Context, n string) ([]string, error) {
	dom, err := r.Hyp.Lookup(n)
	if errors.Is(err, virt.ErrNoDomain) {
		return nil, nil // undefined meanwhile
	}
	if err != nil {
		return nil, errors.New(virt.Describe(err))
	}
	disks, err := dom.Disks()
	_ = dom.Close()
	if err != nil {
		return nil, errors.New(virt.Describe(err))
	}
	var (
		failed error
		paths  []string
	)
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
		paths = append(paths, virt.Paths(chain)...)
	}
	return paths, failed
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
