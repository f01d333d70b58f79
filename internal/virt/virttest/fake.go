// Package virttest has an in-memory virt.Hypervisor for unit tests of the
// logic above libvirt (option handling, domain selection, exit codes, the
// decisions of --cbt). It cannot snapshot or run block jobs, and its backup
// jobs write no data: those are tested against a real libvirtd in the
// integration tests. Its checkpoints and backup jobs follow libvirt's rules
// as far as the tool can tell (see Backup).
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

	Backup Backups // checkpoints and backup jobs
}

// Backups is the fake's checkpoint and backup-job state, as libvirt 9.0
// keeps it: BeginBackup refuses an incremental backup from a checkpoint
// that is missing or broken (Broken), and otherwise creates the new
// checkpoint — which stays even when the job then fails or is aborted.
// A job ends as End says; AbortBackup ends it with libvirt's "Operation
// canceled" (unless FinishOnAbort: the abort raced with the job's end).
type Backups struct {
	Checkpoints map[string][]virt.Checkpoint // per domain, oldest first
	Broken      map[string]bool              // checkpoint names whose bitmaps are inconsistent
	// Begin, when set, is called first; an error fails the start (nothing
	// is created).
	Begin func(name string, spec virt.BackupSpec) error
	// End is how a started job ends by itself: an event, or nil for a job
	// that runs until it is aborted. Without End, jobs succeed at once.
	End           func(name string, spec virt.BackupSpec) *virt.BackupEvent
	FinishOnAbort bool
	NoAgent       bool  // FSFreeze fails as without a guest agent
	ThawErr       error // FSThaw fails
	Frozen        map[string]bool
	Specs         []virt.BackupSpec // every backup begun
	Speeds        map[string]uint64 // target → bandwidth set
	Deleted       []string          // checkpoints deleted (with "(metadata)" when metadata only)
	DeleteErr     map[string]error  // a checkpoint whose (full) deletion fails
	// NoEvent: jobs end without a job-completed event (libvirt sometimes
	// sends none); their end is only in LastJobEnd.
	NoEvent  bool
	jobs     map[string]*virt.BackupSpec
	watchers map[string][]chan virt.BackupEvent
	ends     map[string]virt.BackupEnd
	endCount uint64
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

func (d *domain) running() error {
	if s := d.f.States[d.name]; s != virt.StateRunning && s != virt.StatePaused {
		return &virt.Error{Op: "backup", Code: 55, Kind: virt.ErrNotRunning, Msg: "Requested operation is not valid: domain is not running"}
	}
	return nil
}

func (d *domain) Checkpoints() ([]virt.Checkpoint, error) {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	return append([]virt.Checkpoint(nil), d.f.Backup.Checkpoints[d.name]...), nil
}

func (d *domain) Checkpoint(name string) (virt.Checkpoint, error) {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	for _, c := range d.f.Backup.Checkpoints[d.name] {
		if c.Name == name {
			return c, nil
		}
	}
	return virt.Checkpoint{}, noCheckpoint(name)
}

func (d *domain) DeleteCheckpoint(name string, metadataOnly bool) error {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	b := &d.f.Backup
	cps := b.Checkpoints[d.name]
	for i, c := range cps {
		if c.Name != name {
			continue
		}
		if !metadataOnly {
			if err := d.running(); err != nil {
				return &virt.Error{Op: "delete checkpoint", Code: 84, Msg: "Operation not supported: cannot delete checkpoint for inactive domain"}
			}
			if err := b.DeleteErr[name]; err != nil {
				return err
			}
		}
		b.Checkpoints[d.name] = append(cps[:i:i], cps[i+1:]...)
		if metadataOnly {
			name += " (metadata)"
		}
		b.Deleted = append(b.Deleted, name)
		return nil
	}
	return noCheckpoint(name)
}

// noCheckpoint is libvirt's error for a checkpoint name it does not know.
func noCheckpoint(name string) error {
	return &virt.Error{Op: "look up checkpoint", Code: 103, Kind: virt.ErrNoCheckpoint,
		Msg: "Domain checkpoint not found: no domain checkpoint with matching name '" + name + "'"}
}

func (d *domain) WatchBackup() (<-chan virt.BackupEvent, func(), error) {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	if d.f.Backup.watchers == nil {
		d.f.Backup.watchers = map[string][]chan virt.BackupEvent{}
	}
	ch := make(chan virt.BackupEvent, 16)
	d.f.Backup.watchers[d.name] = append(d.f.Backup.watchers[d.name], ch)
	var once sync.Once
	stop := func() {
		once.Do(func() {
			d.f.mu.Lock()
			defer d.f.mu.Unlock()
			ws := d.f.Backup.watchers[d.name]
			for i, w := range ws {
				if w == ch {
					d.f.Backup.watchers[d.name] = append(ws[:i:i], ws[i+1:]...)
					break
				}
			}
		})
	}
	return ch, stop, nil
}

// end finishes the domain's job with ev (the caller holds the lock).
func (d *domain) end(ev virt.BackupEvent) {
	b := &d.f.Backup
	delete(b.jobs, d.name)
	if b.ends == nil {
		b.ends = map[string]virt.BackupEnd{}
	}
	b.endCount++
	b.ends[d.name] = virt.BackupEnd{Backup: true, Success: ev.Success, Error: ev.Error, Elapsed: b.endCount}
	if b.NoEvent {
		return
	}
	for _, w := range d.f.Backup.watchers[d.name] {
		select {
		case w <- ev:
		default:
		}
	}
}

func (d *domain) BeginBackup(spec virt.BackupSpec) error {
	b := &d.f.Backup
	if b.Begin != nil {
		if err := b.Begin(d.name, spec); err != nil {
			return err
		}
	}
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	if err := d.running(); err != nil {
		return err
	}
	if b.jobs[d.name] != nil {
		return &virt.Error{Op: "begin backup", Code: 55, Msg: "Requested operation is not valid: domain has active block job"}
	}
	cp := virt.Checkpoint{Name: spec.Checkpoint}
	for _, disk := range spec.Disks {
		if disk.Incremental != "" {
			found := false
			for _, c := range b.Checkpoints[d.name] {
				found = found || c.Name == disk.Incremental && c.Tracks(disk.Target)
			}
			if !found || b.Broken[disk.Incremental] {
				return &virt.Error{Op: "begin backup", Code: 102, Kind: virt.ErrCheckpointInconsistent,
					Msg: fmt.Sprintf("checkpoint inconsistent: missing or broken bitmap '%s' for disk '%s'", disk.Incremental, disk.Target)}
			}
		}
		if disk.Bitmap {
			cp.Bitmaps = append(cp.Bitmaps, disk.Target)
		}
	}
	for _, c := range b.Checkpoints[d.name] {
		if c.Name == cp.Name {
			return &virt.Error{Op: "begin backup", Code: 1, Msg: "internal error: checkpoint '" + cp.Name + "' already exists"}
		}
	}
	if b.Checkpoints == nil {
		b.Checkpoints = map[string][]virt.Checkpoint{}
	}
	if b.jobs == nil {
		b.jobs = map[string]*virt.BackupSpec{}
	}
	b.Checkpoints[d.name] = append(b.Checkpoints[d.name], cp)
	b.Specs = append(b.Specs, spec)
	b.jobs[d.name] = &spec
	ev := &virt.BackupEvent{Success: true}
	if b.End != nil {
		ev = b.End(d.name, spec)
	}
	if ev != nil {
		d.end(*ev)
	}
	return nil
}

func (d *domain) LastJobEnd() (virt.BackupEnd, bool, error) {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	if err := d.running(); err != nil {
		return virt.BackupEnd{}, false, err
	}
	e, ok := d.f.Backup.ends[d.name]
	return e, ok, nil
}

func (d *domain) BackupJob() (virt.BackupJob, error) {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	if err := d.running(); err != nil {
		return virt.BackupJob{}, err
	}
	spec := d.f.Backup.jobs[d.name]
	if spec == nil {
		return virt.BackupJob{}, nil
	}
	j := virt.BackupJob{Active: true}
	for _, disk := range spec.Disks {
		if disk.Path != "" {
			j.Targets = append(j.Targets, disk.Path)
		}
	}
	return j, nil
}

// EndWithoutRecord ends a domain's running job with neither an event nor
// a record of its end (tests of what such an end is taken for).
func (f *Fake) EndWithoutRecord(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.Backup.jobs, name)
}

// FinishBackup ends a domain's running job by itself (tests of jobs that
// run until something happens).
func (f *Fake) FinishBackup(name string, ev virt.BackupEvent) {
	f.mu.Lock()
	defer f.mu.Unlock()
	(&domain{f: f, name: name}).end(ev)
}

func (d *domain) AbortBackup() error {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	if d.f.Backup.jobs[d.name] == nil {
		return &virt.Error{Op: "abort job", Code: 55, Msg: "Requested operation is not valid: no job is active on the domain"}
	}
	if d.f.Backup.FinishOnAbort {
		d.end(virt.BackupEvent{Success: true})
	} else {
		d.end(virt.BackupEvent{Error: "Operation canceled"})
	}
	return nil
}

func (d *domain) SetBackupSpeed(target string, bandwidth uint64) error {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	if d.f.Backup.Speeds == nil {
		d.f.Backup.Speeds = map[string]uint64{}
	}
	d.f.Backup.Speeds[target] = bandwidth
	return nil
}

func (d *domain) FSFreeze() error {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	if d.f.Backup.NoAgent {
		return &virt.Error{Op: "freeze guest file systems", Code: 74, Kind: virt.ErrAgent, Msg: "argument unsupported: QEMU guest agent is not configured"}
	}
	if d.f.Backup.Frozen == nil {
		d.f.Backup.Frozen = map[string]bool{}
	}
	d.f.Backup.Frozen[d.name] = true
	return nil
}

func (d *domain) FSThaw() error {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	if d.f.Backup.ThawErr != nil {
		return d.f.Backup.ThawErr
	}
	delete(d.f.Backup.Frozen, d.name)
	return nil
}
func (d *domain) Close() error {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	d.f.open--
	return nil
}
