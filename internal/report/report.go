// Package report is the record of one run for machines: the JSON document
// of --report and the Prometheus textfile metrics of --textfile_dir. The
// run fills it as it goes (one Domain per domain, safe for domains running
// at once); it is written at the end of every run, failed or interrupted
// ones included.
package report

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Schema is the version of the JSON document; readers ignore fields they
// do not know, and a change that breaks them bumps it.
const Schema = 1

// Domain results.
const (
	ResultOK          = "ok"
	ResultFailed      = "failed"
	ResultInterrupted = "interrupted"
	ResultMissing     = "missing"     // the named domain does not exist
	ResultNotStarted  = "not_started" // the run was interrupted before its turn
)

// Actions a domain's run took.
const (
	ActionSnapshot    = "snapshot"
	ActionCopy        = "copy"
	ActionOffline     = "offline_copy"
	ActionDump        = "state_dump"
	ActionQuiesce     = "quiesce"
	ActionConsolidate = "consolidate"
	ActionPrune       = "prune"
	ActionCBT         = "cbt"
)

// Run is the report of one invocation.
type Run struct {
	mu       sync.Mutex
	Schema   int       `json:"schema"`
	Tool     string    `json:"tool"`
	Host     string    `json:"host"`
	Args     []string  `json:"args"`
	Start    time.Time `json:"start"`
	End      time.Time `json:"end"`
	Seconds  float64   `json:"seconds"`
	ExitCode int       `json:"exit_code"`
	Signal   string    `json:"signal,omitempty"` // SIGINT, SIGTERM: the run was interrupted
	// Errors are the [ERR] lines no domain's turn printed (options,
	// dependencies, listing the domains).
	Errors  []string  `json:"errors,omitempty"`
	Domains []*Domain `json:"domains"`
}

// Domain is one domain's turn.
type Domain struct {
	mu      sync.Mutex
	Name    string    `json:"name"`
	State   string    `json:"state"` // when its turn began: running, paused, shut off, missing, …
	Actions []string  `json:"actions"`
	Result  string    `json:"result"`
	Errors  []string  `json:"errors,omitempty"` // its [ERR] lines
	Start   time.Time `json:"start"`
	End     time.Time `json:"end"`
	Seconds float64   `json:"seconds"`
	// Snapshot is the name of the snapshot taken (bimg-YYYYMMDD-HHMMSS).
	Snapshot string `json:"snapshot,omitempty"`
	// Moment is the restore point recorded in the backup directory.
	Moment string `json:"moment,omitempty"`
	// CBT is the --cbt push backup.
	CBT           *CBT           `json:"cbt,omitempty"`
	Quiesced      bool           `json:"quiesced"`
	Dump          *Dump          `json:"state_dump,omitempty"`
	Consolidation *Consolidation `json:"consolidation,omitempty"`
	Disks         []*Disk        `json:"disks"`
	CopiedBytes   int64          `json:"copied_bytes"`
	Pruned        []string       `json:"pruned,omitempty"` // moments given up (--keep)
	FreedBytes    int64          `json:"freed_bytes,omitempty"`
	// RestorePoints is the number of the domain's restore points in the
	// backup directory after the run; -1 without one.
	RestorePoints int `json:"restore_points"`
}

// Disk is one disk of a domain's turn.
type Disk struct {
	Target string `json:"target"`
	Source string `json:"source"` // its image when the turn began
	Files  []File `json:"files"`
	// HostChainLength is the number of images of the disk's chain on the
	// host after the run (1: no backing file); 0 when it could not be read.
	HostChainLength int `json:"host_chain_length"`
}

// File is one chain file the run copied, or found up to date.
type File struct {
	Source  string  `json:"source"`
	Dest    string  `json:"dest"`
	Copied  bool    `json:"copied"`
	Reason  string  `json:"reason"` // why it was copied or skipped
	Bytes   int64   `json:"bytes"`  // data bytes written (holes are free)
	Seconds float64 `json:"seconds"`
}

// CBT is a --cbt push backup.
type CBT struct {
	Checkpoint string `json:"checkpoint"` // created with the backup
	// Incremental is the checkpoint the increments start from; "" when
	// every disk got a full backup.
	Incremental string  `json:"incremental,omitempty"`
	Seconds     float64 `json:"seconds"` // the job, from its start to its completion event
	OK          bool    `json:"ok"`
}

// Dump is the -s state dump.
type Dump struct {
	File         string  `json:"file"`
	PauseSeconds float64 `json:"pause_seconds"`
}

// Consolidation is a -c/-C consolidation.
type Consolidation struct {
	Method  string  `json:"method"`
	Offline bool    `json:"offline"`
	Seconds float64 `json:"seconds"`
	OK      bool    `json:"ok"`
}

// New starts the report of a run.
func New(tool string, args []string, start time.Time) *Run {
	host, _ := os.Hostname()
	return &Run{Schema: Schema, Tool: tool, Host: host, Args: append([]string{}, args...), Start: start, Domains: []*Domain{}}
}

// Domain adds a domain's turn, begun at start in state.
func (r *Run) Domain(name, state string, start time.Time) *Domain {
	d := &Domain{Name: name, State: state, Start: start, Actions: []string{}, Disks: []*Disk{}, RestorePoints: -1}
	r.mu.Lock()
	r.Domains = append(r.Domains, d)
	r.mu.Unlock()
	return d
}

// Error records an [ERR] line of the run itself.
func (r *Run) Error(msg string) {
	r.mu.Lock()
	r.Errors = append(r.Errors, msg)
	r.mu.Unlock()
}

// Finish closes the run with its exit code (and the signal that stopped it).
func (r *Run) Finish(end time.Time, code int, signal string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.End, r.ExitCode, r.Signal = end, code, signal
	r.Seconds = end.Sub(r.Start).Seconds()
}

// Update changes the domain under its lock (domains may run at once, and
// their observers report from several goroutines).
func (d *Domain) Update(fn func(d *Domain)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fn(d)
}

// Act records an action, once.
func (d *Domain) Act(action string) {
	d.Update(func(d *Domain) {
		for _, a := range d.Actions {
			if a == action {
				return
			}
		}
		d.Actions = append(d.Actions, action)
	})
}

// Disk returns the record of a disk target, creating it.
func (d *Domain) Disk(target, source string) *Disk {
	var out *Disk
	d.Update(func(d *Domain) {
		for _, k := range d.Disks {
			if k.Target == target {
				out = k
				return
			}
		}
		out = &Disk{Target: target, Source: source, Files: []File{}}
		d.Disks = append(d.Disks, out)
	})
	return out
}

// AddFile records a chain file of a disk.
func (d *Domain) AddFile(target, source string, f File) {
	k := d.Disk(target, source)
	d.Update(func(d *Domain) {
		k.Files = append(k.Files, f)
		d.CopiedBytes += f.Bytes
	})
}

// Finish closes the domain's turn with its result.
func (d *Domain) Finish(end time.Time, result string) {
	d.Update(func(d *Domain) {
		d.End, d.Result = end, result
		d.Seconds = end.Sub(d.Start).Seconds()
	})
}

// snapshotLocked is a deep copy taken under the locks, for writing.
func (r *Run) snapshotLocked() ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, d := range r.Domains {
		d.mu.Lock()
		defer d.mu.Unlock()
	}
	return json.MarshalIndent(r, "", "  ")
}

// WriteFile writes the JSON document to path atomically: a temporary file
// in the same directory, fsynced, renamed over path (mode 0644: it holds
// no secret).
func (r *Run) WriteFile(path string) error {
	b, err := r.snapshotLocked()
	if err != nil {
		return err
	}
	return writeAtomic(path, append(b, '\n'), 0o644)
}

// writeAtomic replaces path with data so that readers see the old or the
// new content, never a part.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			_ = os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
