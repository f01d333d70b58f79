// Package libvirtconn implements virt.Hypervisor over the cgo bindings
// libvirt.org/go/libvirt. It is the only package that imports them: every
// libvirt object is freed here and every libvirt error is translated here.
package libvirtconn

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"

	"libvirt.org/go/libvirt"

	"github.com/fi-backup/fi-backup/internal/virt"
)

var eventLoop struct {
	once sync.Once
	err  error
}

// startEventLoop registers libvirt's default event implementation and runs
// it in a goroutine. It must happen before the first connection, or event
// registration fails with "could not initialize domain event timer".
func startEventLoop() error {
	eventLoop.once.Do(func() {
		if err := libvirt.EventRegisterDefaultImpl(); err != nil {
			eventLoop.err = err
			return
		}
		go func() {
			for {
				if err := libvirt.EventRunDefaultImpl(); err != nil {
					return
				}
			}
		}()
	})
	return eventLoop.err
}

// Conn is a connection to libvirtd.
type Conn struct {
	c *libvirt.Connect
}

var _ virt.Hypervisor = (*Conn)(nil)

// Connect opens uri ("" means libvirt's default, usually qemu:///system).
func Connect(uri string) (*Conn, error) {
	if err := startEventLoop(); err != nil {
		return nil, translate("start libvirt event loop", err)
	}
	c, err := libvirt.NewConnect(uri)
	if err != nil {
		return nil, translate("connect to libvirt", err)
	}
	// Notice a dead daemon within ~15 s instead of hanging on it forever.
	_ = c.SetKeepAlive(5, 3)
	return &Conn{c: c}, nil
}

// Close closes the connection.
func (c *Conn) Close() error {
	_, err := c.c.Close()
	return err
}

func versionString(v uint32) string {
	return fmt.Sprintf("%d.%d.%d", v/1000000, (v/1000)%1000, v%1000)
}

// LibVersion is libvirt's version.
func (c *Conn) LibVersion() (string, error) {
	v, err := c.c.GetLibVersion()
	if err != nil {
		return "", translate("get libvirt version", err)
	}
	return versionString(v), nil
}

// HypervisorVersion is the QEMU version libvirt reports.
func (c *Conn) HypervisorVersion() (string, error) {
	v, err := c.c.GetVersion()
	if err != nil {
		return "", translate("get hypervisor version", err)
	}
	return versionString(v), nil
}

// List returns the names of the domains matching f.
func (c *Conn) List(f virt.Filter) ([]string, error) {
	var flags libvirt.ConnectListAllDomainsFlags
	switch f {
	case virt.ListRunning:
		flags = libvirt.CONNECT_LIST_DOMAINS_RUNNING
	case virt.ListShutoffPaused:
		flags = libvirt.CONNECT_LIST_DOMAINS_SHUTOFF | libvirt.CONNECT_LIST_DOMAINS_PAUSED
	}
	doms, err := c.c.ListAllDomains(flags)
	if err != nil {
		return nil, translate("list domains", err)
	}
	type entry struct {
		name   string
		id     uint
		active bool
	}
	list := make([]entry, 0, len(doms))
	var firstErr error
	for i := range doms {
		n, err := doms[i].GetName()
		if err != nil && firstErr == nil {
			firstErr = translate("get domain name", err)
		}
		if err == nil {
			e := entry{name: n}
			if id, err := doms[i].GetID(); err == nil {
				e.id, e.active = id, true // an inactive domain has no ID
			}
			list = append(list, e)
		}
		_ = doms[i].Free()
	}
	// virsh list's order (virshDomainSorter), which the old script's
	// domain loops followed: active domains by ID, then inactive ones by
	// name, case-insensitively.
	sort.SliceStable(list, func(i, j int) bool {
		a, b := list[i], list[j]
		switch {
		case a.active && b.active:
			return a.id < b.id
		case a.active != b.active:
			return a.active
		}
		return strings.ToLower(a.name) < strings.ToLower(b.name)
	})
	names := make([]string, len(list))
	for i, e := range list {
		names[i] = e.name
	}
	return names, firstErr
}

// Lookup opens a domain by name.
func (c *Conn) Lookup(name string) (virt.Domain, error) {
	d, err := c.c.LookupDomainByName(name)
	if err != nil {
		return nil, translate("look up domain", err)
	}
	return &domain{conn: c, d: d, name: name}, nil
}

type domain struct {
	conn *Conn
	d    *libvirt.Domain
	name string
}

var _ virt.Domain = (*domain)(nil)

func (d *domain) Name() string { return d.name }

func (d *domain) Close() error { return d.d.Free() }

func (d *domain) State() (virt.State, error) {
	st, _, err := d.d.GetState()
	if err != nil {
		return virt.StateNoState, translate("get domain state", err)
	}
	return virt.State(st), nil
}

func (d *domain) Disks() ([]virt.Disk, error) {
	x, err := d.d.GetXMLDesc(0)
	if err != nil {
		return nil, translate("get domain XML", err)
	}
	return virt.ParseDisks(x)
}

func (d *domain) Definition() (string, error) {
	x, err := d.d.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE | libvirt.DOMAIN_XML_SECURE)
	if err != nil {
		return "", translate("get domain definition", err)
	}
	return x, nil
}

func (d *domain) UUID() (string, error) {
	u, err := d.d.GetUUIDString()
	if err != nil {
		return "", translate("get domain UUID", err)
	}
	return u, nil
}

func (d *domain) Redefine(xml string) error {
	nd, err := d.conn.c.DomainDefineXML(xml)
	if err != nil {
		return translate("define domain", err)
	}
	return nd.Free()
}

func (d *domain) Snapshot(spec virt.SnapshotSpec) error {
	x, err := virt.SnapshotXML(spec.Name)
	if err != nil {
		return err
	}
	flags := libvirt.DOMAIN_SNAPSHOT_CREATE_DISK_ONLY |
		libvirt.DOMAIN_SNAPSHOT_CREATE_ATOMIC |
		libvirt.DOMAIN_SNAPSHOT_CREATE_NO_METADATA
	if spec.Quiesce {
		flags |= libvirt.DOMAIN_SNAPSHOT_CREATE_QUIESCE
	}
	snap, err := d.d.CreateSnapshotXML(x, flags)
	if err != nil {
		return translate("create snapshot", err)
	}
	return snap.Free()
}

func (d *domain) WatchJobs() (<-chan virt.JobEvent, func(), error) {
	ch := make(chan virt.JobEvent, 64)
	id, err := d.conn.c.DomainEventBlockJob2Register(d.d, func(_ *libvirt.Connect, _ *libvirt.Domain, ev *libvirt.DomainEventBlockJob) {
		select { // never block libvirt's event loop
		case ch <- virt.JobEvent{Disk: ev.Disk, Status: virt.JobStatus(ev.Status)}:
		default:
		}
	})
	if err != nil {
		return nil, nil, translate("register block job events", err)
	}
	var once sync.Once
	stop := func() { once.Do(func() { _ = d.conn.c.DomainEventDeregister(id) }) }
	return ch, stop, nil
}

func (d *domain) StartJob(kind virt.JobKind, target, base string, bandwidth uint64) error {
	switch kind {
	case virt.JobCommit:
		if base == "" {
			return errors.New("blockcommit needs an explicit base")
		}
		return translate("start blockcommit", d.d.BlockCommit(target, base, "", bandwidth,
			libvirt.DOMAIN_BLOCK_COMMIT_ACTIVE|libvirt.DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES))
	case virt.JobPull:
		return translate("start blockpull", d.d.BlockPull(target, bandwidth, libvirt.DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES))
	}
	return fmt.Errorf("unknown block job kind %d", kind)
}

func (d *domain) JobInfo(target string) (virt.JobInfo, error) {
	info, err := d.d.GetBlockJobInfo(target, 0)
	if err != nil {
		return virt.JobInfo{}, translate("get block job info", err)
	}
	// The Go binding drops C's "0 = no job" return value: an all-zero
	// struct means no job.
	active := info.Type != libvirt.DOMAIN_BLOCK_JOB_TYPE_UNKNOWN || info.Cur != 0 || info.End != 0
	return virt.JobInfo{Active: active, Type: virt.JobType(info.Type), Cur: info.Cur, End: info.End}, nil
}

func (d *domain) Pivot(target string) error {
	return translate("pivot block job", d.d.BlockJobAbort(target, libvirt.DOMAIN_BLOCK_JOB_ABORT_PIVOT))
}

func (d *domain) AbortJob(target string) error {
	return translate("abort block job", d.d.BlockJobAbort(target, 0))
}

func (d *domain) QMP(cmd string) (string, error) {
	out, err := d.d.QemuMonitorCommand(cmd, libvirt.DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT)
	return out, translate("send QMP command", err)
}

func (d *domain) QMPWithFile(cmd string, f *os.File) (string, error) {
	out, files, err := d.d.QemuMonitorCommandWithFiles(cmd, []os.File{*f}, libvirt.DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT)
	for _, of := range files {
		_ = of.Close()
	}
	return out, translate("send QMP command with file", err)
}

func (d *domain) Resume() error { return translate("resume domain", d.d.Resume()) }

func (d *domain) Checkpoints() ([]virt.Checkpoint, error) {
	cps, err := d.d.ListAllCheckpoints(0)
	if err != nil {
		return nil, translate("list checkpoints", err)
	}
	var out []virt.Checkpoint
	var firstErr error
	for i := range cps {
		c, err := parseCheckpoint(&cps[i], false)
		if err == nil {
			out = append(out, c)
		}
		// A checkpoint deleted meanwhile is simply not listed.
		if err != nil && !errors.Is(err, virt.ErrNoCheckpoint) && firstErr == nil {
			firstErr = err
		}
		_ = cps[i].Free()
	}
	return out, firstErr
}

func (d *domain) Checkpoint(name string) (virt.Checkpoint, error) {
	cp, err := d.d.CheckpointLookupByName(name, 0)
	if err != nil {
		return virt.Checkpoint{}, translate("look up checkpoint", err)
	}
	defer cp.Free()
	return parseCheckpoint(cp, true)
}

// parseCheckpoint reads a checkpoint's XML; with sizes, the sizes of the
// changes since (they size the free-space check), which a checkpoint whose
// bitmap is broken cannot tell: then without.
func parseCheckpoint(cp *libvirt.DomainCheckpoint, sizes bool) (virt.Checkpoint, error) {
	var (
		x   string
		err error
	)
	if sizes {
		x, err = cp.GetXMLDesc(libvirt.DOMAIN_CHECKPOINT_XML_NO_DOMAIN | libvirt.DOMAIN_CHECKPOINT_XML_SIZE)
	}
	if !sizes || err != nil {
		x, err = cp.GetXMLDesc(libvirt.DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
	}
	if err != nil {
		return virt.Checkpoint{}, translate("get checkpoint XML", err)
	}
	return virt.ParseCheckpoint(x)
}

func (d *domain) DeleteCheckpoint(name string, metadataOnly bool) error {
	cp, err := d.d.CheckpointLookupByName(name, 0)
	if err != nil {
		return translate("look up checkpoint", err)
	}
	defer cp.Free()
	var flags libvirt.DomainCheckpointDeleteFlags
	if metadataOnly {
		flags = libvirt.DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
	}
	return translate("delete checkpoint", cp.Delete(flags))
}

func (d *domain) WatchBackup() (<-chan virt.BackupEvent, func(), error) {
	ch := make(chan virt.BackupEvent, 16)
	id, err := d.conn.c.DomainEventJobCompletedRegister(d.d, func(_ *libvirt.Connect, _ *libvirt.Domain, ev *libvirt.DomainEventJobCompleted) {
		info := ev.Info
		if info.OperationSet && info.Operation != libvirt.DOMAIN_JOB_OPERATION_BACKUP {
			return // a migration, a save, ...: not ours to judge
		}
		// libvirt ≥ 8.0 says whether the job succeeded; before that only
		// a failed job carries an error message.
		ok := info.JobSuccess
		if !info.JobSuccessSet {
			ok = !info.ErrorMessageSet || info.ErrorMessage == ""
		}
		select { // never block libvirt's event loop
		case ch <- virt.BackupEvent{Success: ok, Error: info.ErrorMessage}:
		default:
		}
	})
	if err != nil {
		return nil, nil, translate("register job-completed events", err)
	}
	var once sync.Once
	stop := func() { once.Do(func() { _ = d.conn.c.DomainEventDeregister(id) }) }
	return ch, stop, nil
}

func (d *domain) BeginBackup(spec virt.BackupSpec) error {
	bx, cx, err := virt.BackupXML(spec)
	if err != nil {
		return err
	}
	return translate("begin backup", d.d.BackupBegin(bx, cx, libvirt.DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL))
}

func (d *domain) BackupJob() (virt.BackupJob, error) {
	x, err := d.d.BackupGetXMLDesc(0)
	if err != nil {
		err = translate("get backup job", err)
		if errors.Is(err, virt.ErrNoBackupJob) {
			return virt.BackupJob{}, nil
		}
		return virt.BackupJob{}, err
	}
	targets, err := virt.ParseBackupTargets(x)
	if err != nil {
		return virt.BackupJob{}, err
	}
	return virt.BackupJob{Active: true, Targets: targets}, nil
}

func (d *domain) LastJobEnd() (virt.BackupEnd, bool, error) {
	info, err := d.d.GetJobStats(libvirt.DOMAIN_JOB_STATS_COMPLETED)
	if err != nil {
		return virt.BackupEnd{}, false, translate("get completed job stats", err)
	}
	if info.Type == libvirt.DOMAIN_JOB_NONE {
		return virt.BackupEnd{}, false, nil
	}
	ok := info.Type == libvirt.DOMAIN_JOB_COMPLETED
	if info.JobSuccessSet {
		ok = ok && info.JobSuccess
	}
	return virt.BackupEnd{
		Backup:  info.OperationSet && info.Operation == libvirt.DOMAIN_JOB_OPERATION_BACKUP,
		Success: ok, Error: info.ErrorMessage,
		Elapsed: info.TimeElapsed, Total: info.DiskTotal, Processed: info.DiskProcessed,
	}, true, nil
}

func (d *domain) AbortBackup() error { return translate("abort job", d.d.AbortJob()) }

func (d *domain) SetBackupSpeed(target string, bandwidth uint64) error {
	return translate("set backup job speed", d.d.BlockJobSetSpeed(target, bandwidth, libvirt.DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES))
}

func (d *domain) FSFreeze() error {
	return translate("freeze guest file systems", d.d.FSFreeze(nil, 0))
}

func (d *domain) FSThaw() error { return translate("thaw guest file systems", d.d.FSThaw(nil, 0)) }

// translate turns a libvirt error into a *virt.Error carrying libvirt's own
// message and, for the codes the tool reacts to, a sentinel.
func translate(op string, err error) error {
	if err == nil {
		return nil
	}
	var le libvirt.Error
	if !errors.As(err, &le) {
		return fmt.Errorf("%s: %w", op, err)
	}
	ve := &virt.Error{Op: op, Code: int(le.Code), Msg: le.Message}
	switch {
	case le.Code == libvirt.ERR_NO_DOMAIN:
		ve.Kind = virt.ErrNoDomain
	case le.Code == libvirt.ERR_OPERATION_INVALID:
		ve.Kind = virt.ErrNotRunning
	case le.Code == libvirt.ERR_BLOCK_COPY_ACTIVE:
		ve.Kind = virt.ErrJobActive
	case le.Code == libvirt.ERR_CHECKPOINT_INCONSISTENT:
		ve.Kind = virt.ErrCheckpointInconsistent
	case le.Code == libvirt.ERR_NO_DOMAIN_CHECKPOINT:
		ve.Kind = virt.ErrNoCheckpoint
	case le.Code == libvirt.ERR_NO_DOMAIN_BACKUP:
		ve.Kind = virt.ErrNoBackupJob
	case le.Code == libvirt.ERR_AGENT_UNRESPONSIVE, le.Code == libvirt.ERR_AGENT_UNSYNCED,
		le.Code == libvirt.ERR_ARGUMENT_UNSUPPORTED && strings.Contains(le.Message, "agent"):
		ve.Kind = virt.ErrAgent
	// One code, several causes: libvirt's own wording tells them apart
	// (virDomainSnapshotDefAssignExternalNames, QEMU's open errors).
	case le.Code == libvirt.ERR_CONFIG_UNSUPPORTED && strings.Contains(le.Message, "collision with disk"):
		ve.Kind = virt.ErrNameCollision
	case le.Code == libvirt.ERR_CONFIG_UNSUPPORTED && strings.Contains(le.Message, "external snapshot name"):
		ve.Kind = virt.ErrNotLocalFile
	case strings.Contains(le.Message, "Permission denied"):
		ve.Kind = virt.ErrPermission
	}
	return ve
}
