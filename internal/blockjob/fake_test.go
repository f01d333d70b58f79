package blockjob

import (
	"errors"
	"sync"

	"github.com/fi-backup/fi-backup/internal/virt"
)

// fakeDom is a running domain whose block jobs behave as libvirt's do, as
// far as consolidation can tell: a commit mirrors into its base and waits
// for a pivot (READY), a pull completes, an abort cancels, each with its
// events; knobs make it misbehave.
type fakeDom struct {
	mu     sync.Mutex
	name   string
	state  virt.State
	disks  []virt.Disk
	events chan virt.JobEvent
	job    *fakeJob

	readyAtStart  bool  // a commit is READY at once (a pull completes at once)
	noEvents      bool  // never send events: only the poll sees the job
	failAtStart   bool  // the job fails right after it started
	startErr      error // StartJob fails
	startedAnyway bool  // ... although the job did start (a connection lost mid-call)
	pivotBusy     int   // Pivot fails with ErrJobActive this many times
	abortErr      error // AbortJob fails (the job stays)
	starts        []string
}

type fakeJob struct {
	kind         virt.JobKind
	target, base string
}

func newFakeDom(disks ...virt.Disk) *fakeDom {
	return &fakeDom{name: "dom", state: virt.StateRunning, disks: disks, events: make(chan virt.JobEvent, 16)}
}

func (f *fakeDom) Name() string { return f.name }

func (f *fakeDom) State() (virt.State, error) { return f.state, nil }

func (f *fakeDom) Disks() ([]virt.Disk, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]virt.Disk, len(f.disks))
	for i, d := range f.disks {
		d.Chain = append([]virt.Image(nil), d.Chain...)
		if d.Mirror != nil {
			m := *d.Mirror
			d.Mirror = &m
		}
		out[i] = d
	}
	return out, nil
}

func (f *fakeDom) WatchJobs() (<-chan virt.JobEvent, func(), error) {
	return f.events, func() {}, nil
}

func (f *fakeDom) disk(target string) *virt.Disk {
	for i := range f.disks {
		if f.disks[i].Target == target {
			return &f.disks[i]
		}
	}
	return nil
}

func (f *fakeDom) send(target string, st virt.JobStatus) {
	if !f.noEvents {
		f.events <- virt.JobEvent{Disk: target, Status: st}
	}
}

func (f *fakeDom) StartJob(kind virt.JobKind, target, base string, _ uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.starts = append(f.starts, target)
	if f.startErr != nil && !f.startedAnyway {
		return f.startErr
	}
	f.job = &fakeJob{kind: kind, target: target, base: base}
	d := f.disk(target)
	switch {
	case f.failAtStart:
		f.job = nil
		f.send(target, virt.JobFailed)
	case kind == virt.JobCommit:
		d.Mirror = &virt.Mirror{Job: "active-commit", Source: base}
		if f.readyAtStart {
			d.Mirror.Ready = "yes"
			f.send(target, virt.JobReady)
		}
	case f.readyAtStart: // a pull that is done at once
		d.Chain = d.Chain[:1]
		f.job = nil
		f.send(target, virt.JobCompleted)
	}
	return f.startErr
}

func (f *fakeDom) JobInfo(target string) (virt.JobInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.state != virt.StateRunning {
		return virt.JobInfo{}, &virt.Error{Msg: "domain is not running", Kind: virt.ErrNotRunning}
	}
	if f.job == nil || f.job.target != target {
		return virt.JobInfo{}, nil
	}
	typ := virt.JobTypePull
	if f.job.kind == virt.JobCommit {
		typ = virt.JobTypeActiveCommit
	}
	return virt.JobInfo{Active: true, Type: typ}, nil
}

func (f *fakeDom) Pivot(target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.job == nil || f.job.target != target {
		return errors.New("no active block job")
	}
	if f.pivotBusy > 0 {
		f.pivotBusy--
		return &virt.Error{Msg: "not ready for pivot yet", Kind: virt.ErrJobActive}
	}
	d := f.disk(target)
	for i, img := range d.Chain {
		if img.Path == f.job.base {
			d.Chain = d.Chain[i:]
			break
		}
	}
	d.Source, d.Mirror, f.job = f.job.base, nil, nil
	f.send(target, virt.JobCompleted)
	return nil
}

func (f *fakeDom) AbortJob(target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.abortErr != nil {
		return f.abortErr
	}
	if f.job == nil || f.job.target != target {
		return errors.New("no active block job")
	}
	f.disk(target).Mirror, f.job = nil, nil
	f.send(target, virt.JobCanceled)
	return nil
}

// users is a fixed answer about other domains' files.
type users struct {
	by        map[string]string
	broken    bool
	brokenWhy string
}

func (u users) Of(p string) string { return u.by[p] }
func (u users) Complete() bool     { return !u.broken }
func (u users) Why() string        { return u.brokenWhy }
