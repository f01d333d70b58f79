// Package virttest has an in-memory virt.Hypervisor for unit tests of the
// logic above libvirt (option handling, domain selection, exit codes). It
// cannot snapshot or run block jobs: those are tested against a real
// libvirtd in the integration tests.
package virttest

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"

	"github.com/fi-backup/fi-backup/internal/virt"
)

// Fake is a scripted hypervisor.
type Fake struct {
	mu       sync.Mutex
	Lib      string // libvirt version, e.g. "9.0.0"
	QEMU     string // hypervisor version
	States   map[string]virt.State
	IDs      map[string]int // IDs of active domains, for List's order
	Disks    map[string][]virt.Disk
	XML      map[string]string // definitions; a minimal one when absent
	Snapshot func(name string, spec virt.SnapshotSpec) error
	// Optional scripts of the block-job and monitor calls; without them
	// the calls report no job, or fail as unsupported.
	JobInfo  func(name, target string) (virt.JobInfo, error)
	AbortJob func(name, target string) error
	QMP      func(name, cmd string) (string, error)
	Resume   func(name string) error
	open     int
	Closed   bool
}

var _ virt.Hypervisor = (*Fake)(nil)

// New returns a Fake with current versions and the given domain states.
func New(states map[string]virt.State) *Fake {
	return &Fake{Lib: "9.0.0", QEMU: "7.2.22", States: states, Disks: map[string][]virt.Disk{}}
}

// OpenDomains is the number of looked-up domains not yet closed.
func (f *Fake) OpenDomains() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.open
}

func (f *Fake) LibVersion() (string, error)        { return f.Lib, nil }
func (f *Fake) HypervisorVersion() (string, error) { return f.QEMU, nil }

func (f *Fake) Close() error {
	f.Closed = true
	return nil
}

func (f *Fake) List(filter virt.Filter) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for n, s := range f.States {
		switch {
		case filter == virt.ListAll,
			filter == virt.ListRunning && s == virt.StateRunning,
			filter == virt.ListShutoffPaused && (s == virt.StateShutoff || s == virt.StatePaused):
			out = append(out, n)
		}
	}
	// libvirt's (virsh's) order: active domains by ID, then the others by name.
	sort.Slice(out, func(i, j int) bool {
		a, b := f.IDs[out[i]], f.IDs[out[j]]
		switch {
		case a > 0 && b > 0:
			return a < b
		case (a > 0) != (b > 0):
			return a > 0
		}
		return strings.ToLower(out[i]) < strings.ToLower(out[j])
	})
	return out, nil
}

func (f *Fake) Lookup(name string) (virt.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.States[name]; !ok {
		return nil, &virt.Error{Op: "look up domain", Code: 42, Kind: virt.ErrNoDomain,
			Msg: "Domain not found: no domain with matching name '" + name + "'"}
	}
	f.open++
	return &domain{f: f, name: name}, nil
}

type domain struct {
	f    *Fake
	name string
}

var errUnsupported = errors.New("not supported by the fake hypervisor")

func (d *domain) Name() string { return d.name }
func (d *domain) State() (virt.State, error) {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	return d.f.States[d.name], nil
}
func (d *domain) Disks() ([]virt.Disk, error) {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	return d.f.Disks[d.name], nil
}
func (d *domain) Definition() (string, error) {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	if x, ok := d.f.XML[d.name]; ok {
		return x, nil
	}
	return "<domain type='qemu'><name>" + d.name + "</name></domain>", nil
}
func (d *domain) UUID() (string, error) {
	return "00000000-0000-4000-8000-" + fmt.Sprintf("%012x", len(d.name)), nil
}
func (d *domain) Redefine(xml string) error {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	if d.f.XML == nil {
		d.f.XML = map[string]string{}
	}
	d.f.XML[d.name] = xml
	return nil
}
func (d *domain) Snapshot(spec virt.SnapshotSpec) error {
	if d.f.Snapshot != nil {
		return d.f.Snapshot(d.name, spec)
	}
	return errUnsupported
}
func (d *domain) WatchJobs() (<-chan virt.JobEvent, func(), error) {
	return nil, nil, errUnsupported
}
func (d *domain) StartJob(virt.JobKind, string, string, uint64) error { return errUnsupported }
func (d *domain) JobInfo(target string) (virt.JobInfo, error) {
	if d.f.JobInfo != nil {
		return d.f.JobInfo(d.name, target)
	}
	return virt.JobInfo{}, nil
}
func (d *domain) Pivot(string) error { return errUnsupported }
func (d *domain) AbortJob(target string) error {
	if d.f.AbortJob != nil {
		return d.f.AbortJob(d.name, target)
	}
	return errUnsupported
}
func (d *domain) Resume() error {
	if d.f.Resume != nil {
		return d.f.Resume(d.name)
	}
	return errUnsupported
}
func (d *domain) QMP(cmd string) (string, error) {
	if d.f.QMP != nil {
		return d.f.QMP(d.name, cmd)
	}
	return "", errUnsupported
}
func (d *domain) QMPWithFile(string, *os.File) (string, error) { return "", errUnsupported }
func (d *domain) Close() error {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	d.f.open--
	return nil
}
