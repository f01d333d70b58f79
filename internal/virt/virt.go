// Package virt is the seam between fi-backup and libvirt: the few hypervisor
// operations the tool needs, in its own types, so that everything but the
// one cgo package (virt/libvirtconn) builds and unit-tests without libvirt.
//
// Calls into libvirt block and take no context; callers check their context
// between calls.
package virt

import (
	"errors"
	"fmt"
	"os"
)

// State is a domain's run state, from libvirt's enum (never from translated
// virsh text, B17).
type State int

// Domain states, in libvirt's order.
const (
	StateNoState State = iota
	StateRunning
	StateBlocked
	StatePaused
	StateShutdown
	StateShutoff
	StateCrashed
	StatePMSuspended
)

func (s State) String() string {
	switch s {
	case StateRunning:
		return "running"
	case StateBlocked:
		return "idle"
	case StatePaused:
		return "paused"
	case StateShutdown:
		return "in shutdown"
	case StateShutoff:
		return "shut off"
	case StateCrashed:
		return "crashed"
	case StatePMSuspended:
		return "pmsuspended"
	default:
		return "no state"
	}
}

// Filter selects domains for List.
type Filter int

// List filters matching the old tool's `virsh list` calls.
const (
	ListRunning       Filter = iota // virsh list --state-running
	ListShutoffPaused               // virsh list --all --state-shutoff --state-paused
	ListAll                         // every defined domain
)

// Sentinel errors; the cgo layer maps libvirt errors onto them (by code,
// and where one code covers several causes, by libvirt's message, in that
// one place).
var (
	ErrNoDomain   = errors.New("domain not found")
	ErrNotRunning = errors.New("domain is not running")
	ErrJobActive  = errors.New("block job active")
	// ErrPermission: libvirt or QEMU could not open or create a file
	// (AppArmor, file permissions).
	ErrPermission = errors.New("permission denied")
	// ErrNameCollision: two disks would get the same overlay name.
	ErrNameCollision = errors.New("overlay name collision")
	// ErrNotLocalFile: libvirt cannot name an overlay for a disk that is
	// not a local file (block device, network disk).
	ErrNotLocalFile = errors.New("disk is not a local file")
	// ErrCheckpointInconsistent: a checkpoint's bitmap is missing or
	// broken (QEMU stopped uncleanly): no incremental backup can use it.
	ErrCheckpointInconsistent = errors.New("checkpoint inconsistent")
	// ErrNoCheckpoint: no checkpoint of that name.
	ErrNoCheckpoint = errors.New("no such checkpoint")
	// ErrNoBackupJob: the domain runs no backup job.
	ErrNoBackupJob = errors.New("no backup job")
	// ErrAgent: the guest agent is not configured or does not answer
	// (a freeze for -q cannot be done).
	ErrAgent = errors.New("guest agent unavailable")
)

// Error is a libvirt failure with the daemon's own message.
type Error struct {
	Op   string // what we asked libvirt to do, e.g. "create snapshot"
	Code int    // libvirt error code (virErrorNumber)
	Msg  string // libvirt's message, shown to the user unchanged
	Kind error  // one of the sentinels above, or nil
}

func (e *Error) Error() string { return e.Msg }

// Unwrap lets errors.Is match the sentinel.
func (e *Error) Unwrap() error { return e.Kind }

// Describe renders an error for an [ERR] line: libvirt's own message when
// there is one, else the Go error text.
func Describe(err error) string {
	var ve *Error
	if errors.As(err, &ve) {
		return ve.Msg
	}
	return fmt.Sprint(err)
}

// Disk is one <disk> element of a domain definition, with its backing chain
// as libvirt sees it.
type Disk struct {
	Target   string  // target dev, e.g. "vda"
	Alias    string  // device alias (qdev id without "-" prefixes), e.g. "virtio-disk0"
	Device   string  // "disk", "cdrom", "floppy", "lun"
	Type     string  // "file", "block", "network", "volume", ...
	Source   string  // the active image path; "" for an empty drive or a non-file source
	Format   string  // driver type of the active image, e.g. "qcow2", "raw"
	ReadOnly bool    // <readonly/>
	Snapshot string  // the snapshot attribute: "", "no", "external", "internal"
	Chain    []Image // Chain[0] is the active image, then its backing files down to the base
	Complete bool    // the chain ended in libvirt's "no further backing" terminator
	Mirror   *Mirror // set while a block copy/commit job mirrors this disk
	ChainErr error   // set when the XML chain could not be read as files (e.g. network backing)
}

// Image is one file of a backing chain.
type Image struct {
	Path   string
	Format string
}

// Paths lists the paths of a chain's images, in order.
func Paths(chain []Image) []string {
	out := make([]string, len(chain))
	for i, img := range chain {
		out[i] = img.Path
	}
	return out
}

// Mirror is the <mirror> state of a disk during a block job.
type Mirror struct {
	Job    string // e.g. "active-commit"
	Ready  string // "yes", "no", "abort", "pivot" or ""
	Source string // the file the job mirrors into (the base of an active commit)
}

// SnapshotSpec describes one external disk-only snapshot.
type SnapshotSpec struct {
	Name    string // bimg-YYYYMMDD-HHMMSS
	Quiesce bool
}

// JobKind tells which block job to run.
type JobKind int

// Block job kinds.
const (
	JobCommit JobKind = iota // active blockcommit into an explicit base, then pivot
	JobPull                  // blockpull into the active layer
)

// JobEvent is a block-job state change for one disk.
type JobEvent struct {
	Disk   string
	Status JobStatus
}

// JobStatus is the state reported by a block-job event.
type JobStatus int

// Block job statuses (libvirt's enum order).
const (
	JobCompleted JobStatus = iota
	JobFailed
	JobCanceled
	JobReady
)

// JobType is the kind of block job libvirt reports running on a disk
// (libvirt's enum order), whoever started it.
type JobType int

// Block job types as libvirt reports them.
const (
	JobTypeUnknown JobType = iota
	JobTypePull
	JobTypeCopy
	JobTypeCommit
	JobTypeActiveCommit
	JobTypeBackup
)

func (t JobType) String() string {
	switch t {
	case JobTypePull:
		return "pull"
	case JobTypeCopy:
		return "copy"
	case JobTypeCommit:
		return "commit"
	case JobTypeActiveCommit:
		return "active commit"
	case JobTypeBackup:
		return "backup"
	}
	return "unknown"
}

// JobInfo is a block job's progress; Active is false when no job runs.
type JobInfo struct {
	Active   bool
	Type     JobType
	Cur, End uint64
}

// BackupSpec is one push-mode backup of libvirt's backup API
// (virDomainBackupBegin) together with the checkpoint created atomically
// with it. Every target is a qcow2 file the caller created beforehand
// (REUSE_EXTERNAL): an increment with a relative backing reference to the
// previous backup file.
type BackupSpec struct {
	Checkpoint string       // name of the checkpoint created with the backup
	Disks      []BackupDisk // every disk of the domain, those left out too
}

// BackupDisk is one disk of a BackupSpec.
type BackupDisk struct {
	Target string // target dev, e.g. "vda"
	// Path is the pre-created qcow2 file the backup writes; "" leaves the
	// disk out of the backup.
	Path string
	// Incremental names the checkpoint whose changes since then the disk's
	// backup holds; "" for a full backup.
	Incremental string
	// Bitmap makes the new checkpoint track the disk (qcow2 only).
	Bitmap bool
}

// BackupEvent is the end of a backup job, as libvirt's job-completed event
// reports it.
type BackupEvent struct {
	Success bool
	Error   string // libvirt's message when it failed ("Operation canceled")
}

// BackupEnd is libvirt's record of the domain's last finished job
// (virDomainGetJobStats with VIR_DOMAIN_JOB_STATS_COMPLETED); it stays
// until the next job ends.
type BackupEnd struct {
	Backup  bool // the job was a backup
	Success bool
	Error   string
	// Elapsed, Total and Processed tell one finished job from another.
	Elapsed, Total, Processed uint64
}

// BackupJob is the backup job a domain runs, if any.
type BackupJob struct {
	Active  bool
	Targets []string // the files it writes
}

// Checkpoint is one checkpoint of a domain.
type Checkpoint struct {
	Name    string
	Bitmaps []string // targets of the disks it tracks with a bitmap
	// Changed is, per disk target, libvirt's estimate of the bytes
	// written since the checkpoint (what an increment from it copies);
	// nil when libvirt could not tell.
	Changed map[string]uint64
}

// Tracks reports whether the checkpoint has a bitmap for the disk target.
func (c Checkpoint) Tracks(target string) bool {
	for _, t := range c.Bitmaps {
		if t == target {
			return true
		}
	}
	return false
}

// Hypervisor is a connection to libvirt.
type Hypervisor interface {
	// LibVersion is libvirt's version, e.g. "9.0.0".
	LibVersion() (string, error)
	// HypervisorVersion is the QEMU version libvirt reports, e.g. "7.2.22".
	HypervisorVersion() (string, error)
	// List returns domain names matching f in virsh's order: active
	// domains by ID, then inactive ones by name (case-insensitive).
	List(f Filter) ([]string, error)
	// Lookup opens a domain by name; ErrNoDomain when it does not exist.
	Lookup(name string) (Domain, error)
	Close() error
}

// Domain is one libvirt domain. Close frees it.
type Domain interface {
	Name() string
	State() (State, error)
	// Disks parses the domain's current XML (live for a running domain).
	Disks() ([]Disk, error)
	// Definition is the domain's persistent definition (the live one for a
	// transient domain), secrets included: what a restore must recreate.
	Definition() (string, error)
	// UUID is the domain's UUID.
	UUID() (string, error)
	// Redefine replaces the domain's persistent definition with xml (a
	// running domain keeps running on its live one until it stops).
	Redefine(xml string) error
	// Snapshot takes an external, disk-only, atomic, metadata-less snapshot;
	// libvirt names the overlays.
	Snapshot(spec SnapshotSpec) error
	// WatchJobs delivers block-job events for the domain's disks to the
	// returned channel until stop is called.
	WatchJobs() (events <-chan JobEvent, stop func(), err error)
	// StartJob starts a block job on disk target. For JobCommit base is
	// the image to commit into (never ""). bandwidth limits the job in
	// bytes/s (0: unlimited).
	StartJob(kind JobKind, target, base string, bandwidth uint64) error
	JobInfo(target string) (JobInfo, error)
	// Pivot finishes a READY active commit by switching to the base.
	Pivot(target string) error
	// AbortJob cancels a job without pivoting.
	AbortJob(target string) error
	Resume() error
	// QMP sends a raw QMP command and returns QEMU's reply text. A nil
	// error does not mean QEMU accepted the command: the reply may carry
	// an "error" member.
	QMP(cmd string) (string, error)
	// QMPWithFile is QMP that also passes f to QEMU (for "getfd").
	QMPWithFile(cmd string, f *os.File) (string, error)

	// Checkpoints lists the domain's checkpoints (libvirt's metadata),
	// without their Changed sizes (asking QEMU for those costs a QMP
	// transaction per checkpoint).
	Checkpoints() ([]Checkpoint, error)
	// Checkpoint is one checkpoint with, where libvirt can tell them, its
	// Changed sizes. ErrNoCheckpoint when there is none of that name.
	Checkpoint(name string) (Checkpoint, error)
	// DeleteCheckpoint deletes a checkpoint and its bitmaps, or only
	// libvirt's record of it (metadataOnly: when the bitmaps are gone).
	// ErrNoCheckpoint when there is none of that name.
	DeleteCheckpoint(name string, metadataOnly bool) error
	// WatchBackup delivers the job-completed events of the domain's
	// backup jobs until stop is called. Register before BeginBackup: a
	// short job can end before the start call returns.
	WatchBackup() (events <-chan BackupEvent, stop func(), err error)
	// BeginBackup starts a push backup into the pre-created targets of
	// spec (REUSE_EXTERNAL) and creates its checkpoint atomically with it.
	BeginBackup(spec BackupSpec) error
	// BackupJob is the backup job the domain runs now.
	BackupJob() (BackupJob, error)
	// LastJobEnd is libvirt's record of the last job that ended; ok is
	// false when it has none.
	LastJobEnd() (end BackupEnd, ok bool, err error)
	// AbortBackup aborts the domain's running job. Whether the job ended
	// aborted or finished anyway is told by its job-completed event only.
	AbortBackup() error
	// SetBackupSpeed limits the backup job of disk target to bandwidth
	// bytes/s.
	SetBackupSpeed(target string, bandwidth uint64) error
	// FSFreeze and FSThaw freeze and thaw the guest's file systems through
	// its agent.
	FSFreeze() error
	FSThaw() error
	Close() error
}
