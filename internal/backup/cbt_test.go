package backup

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/cbt"
	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/virt"
	"github.com/fi-backup/fi-backup/internal/virt/virttest"
)

// The decisions of --cbt against the fake hypervisor (its jobs write no
// data: the data path is tested against the real libvirtd in
// internal/itest) with real target files made by qemu-img.

type cbtEnv struct {
	f    *virttest.Fake
	host string
	bk   string
	lock string
	out  *bytes.Buffer
	mu   sync.Mutex
	sec  int
}

func newCBTEnv(t *testing.T, disks ...virt.Disk) *cbtEnv {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatal("qemu-img is needed: run scripts/setup-host.sh")
	}
	e := &cbtEnv{f: virttest.New(map[string]virt.State{"dom": virt.StateRunning}), host: t.TempDir(), bk: t.TempDir(), lock: t.TempDir(), out: &bytes.Buffer{}}
	if len(disks) == 0 {
		disks = []virt.Disk{e.disk(t, "vda", "vm.qcow2", "qcow2"), {Target: "hdc", Device: "cdrom", Type: "file", ReadOnly: true}}
	}
	e.f.Disks["dom"] = disks
	return e
}

// disk makes a host image and the disk libvirt would describe for it.
func (e *cbtEnv) disk(t *testing.T, target, file, format string) virt.Disk {
	t.Helper()
	p := filepath.Join(e.host, file)
	if _, err := os.Stat(p); err != nil {
		out, err := exec.Command("qemu-img", "create", "-q", "-f", format, p, "16M").CombinedOutput()
		require.NoError(t, err, "%s", out)
	}
	return virt.Disk{Target: target, Device: "disk", Type: "file", Source: p, Format: format,
		Chain: []virt.Image{{Path: p, Format: format}}, Complete: true}
}

// now is a clock that moves one second per reading: every run gets its
// own moment.
func (e *cbtEnv) now() time.Time {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.sec++
	return time.Date(2024, 1, 1, 0, 0, e.sec, 0, time.Local)
}

func (e *cbtEnv) runner(dir string, cfg Config) *Runner {
	cfg.BackupDir, cfg.CBT = dir, true
	return New(cfg, Env{P: logging.New(e.out, true, true), Hyp: e.f, Now: e.now, LockDir: e.lock, QemuImg: "qemu-img", Tool: "fi-backup test", PollEvery: time.Millisecond})
}

// backup runs --cbt on "dom" into dir and returns the output of the run.
func (e *cbtEnv) backup(t *testing.T, dir string, cfg Config) (string, error) {
	t.Helper()
	e.out.Reset()
	r := e.runner(dir, cfg)
	r.RecoverAll(context.Background())
	err := r.Run(context.Background(), "dom", virt.StateRunning)
	t.Logf("--cbt run:\n%s", e.out.String())
	return e.out.String(), err
}

func (e *cbtEnv) checkpoints(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, c := range e.f.Backup.Checkpoints["dom"] {
		out = append(out, c.Name)
	}
	return out
}

func (e *cbtEnv) lastSpec() virt.BackupSpec { return e.f.Backup.Specs[len(e.f.Backup.Specs)-1] }

func points(t *testing.T, dir string) []*backupdir.Manifest {
	t.Helper()
	return (&backupdir.Dir{Path: dir}).Manifests("dom", func(p string, err error) { t.Errorf("%s: %v", p, err) })
}

func chainNames(d backupdir.Disk) []string {
	var out []string
	for _, f := range d.Chain {
		out = append(out, f.Name)
	}
	return out
}

func dirID(t *testing.T, dir string) string {
	t.Helper()
	id, err := (&backupdir.Dir{Path: dir}).ID()
	require.NoError(t, err)
	return id
}

// TestCBTSeries: a full backup, then increments, each in a new file with a
// relative backing reference to the previous one; each run's checkpoint
// replaces the previous one; the manifests name the chains.
func TestCBTSeries(t *testing.T) {
	e := newCBTEnv(t)
	out, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	assert.Contains(t, out, "[INF] No --cbt restore point of 'dom' in '"+e.bk+"' yet: full backup\n")
	id := dirID(t, e.bk)
	spec := e.lastSpec()
	assert.Equal(t, cbt.CheckpointName(id, "20240101-000001"), spec.Checkpoint)
	assert.Equal(t, []virt.BackupDisk{
		{Target: "vda", Path: filepath.Join(e.bk, ".vm.cbt-20240101-000001.fi-backup-cbt"), Bitmap: true},
		{Target: "hdc"},
	}, spec.Disks)
	assert.Equal(t, []string{cbt.CheckpointName(id, "20240101-000001")}, e.checkpoints(t))

	for i := 2; i <= 3; i++ {
		_, err = e.backup(t, e.bk, Config{})
		require.NoError(t, err)
		moment, prev := fmt.Sprintf("20240101-00000%d", i), fmt.Sprintf("20240101-00000%d", i-1)
		assert.Equal(t, cbt.CheckpointName(id, prev), e.lastSpec().Disks[0].Incremental)
		assert.Equal(t, []string{cbt.CheckpointName(id, moment)}, e.checkpoints(t), "the previous checkpoint is deleted")
		b, err := exec.Command("qemu-img", "info", "--output=json", filepath.Join(e.bk, "vm.cbt-"+moment)).Output()
		require.NoError(t, err)
		assert.Contains(t, string(b), `"backing-filename": "vm.cbt-`+prev+`"`, "relative backing reference")
	}
	ms := points(t, e.bk)
	require.Len(t, ms, 3)
	last := ms[2]
	assert.Equal(t, backupdir.MethodCBT, last.Method)
	assert.Equal(t, []string{"vm.cbt-20240101-000003", "vm.cbt-20240101-000002", "vm.cbt-20240101-000001"}, chainNames(last.Disks[0]))
	assert.True(t, last.Disks[0].Chain[0].Copied)
	assert.False(t, last.Disks[0].Chain[1].Copied, "made by an earlier run")
	assert.Equal(t, "vm.qcow2", last.Disks[0].Name)
	assert.Equal(t, filepath.Join(e.host, "vm.qcow2"), last.Disks[0].Source)
	assert.Empty(t, last.Disks[0].Chain[0].Source, "no host file's copy")
	assert.Equal(t, backupdir.Disk{Target: "hdc", Device: "cdrom", Reason: "cdrom"}, last.Disks[1])
	rec, err := journal.Store{Dir: e.lock}.Read("dom")
	require.NoError(t, err)
	assert.Nil(t, rec, "no journal left")
	left, err := filepath.Glob(filepath.Join(e.bk, ".*fi-backup-cbt"))
	require.NoError(t, err)
	assert.Empty(t, left, "no temporary file left")
}

// TestCBTCheckpointMissing: the directory expects a checkpoint the host
// does not have (the domain redefined, the checkpoint deleted): a full
// backup with a [WAR], never an increment from something else.
func TestCBTCheckpointMissing(t *testing.T) {
	e := newCBTEnv(t)
	_, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	e.f.Backup.Checkpoints["dom"] = nil
	out, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	assert.Contains(t, out, "[WAR] The checkpoint '"+cbt.CheckpointName(dirID(t, e.bk), "20240101-000001")+"' of the newest --cbt restore point 20240101-000001 of 'dom' is not on the host")
	assert.Empty(t, e.lastSpec().Disks[0].Incremental)
	assert.Equal(t, []string{"vm.cbt-20240101-000002"}, chainNames(points(t, e.bk)[1].Disks[0]))
}

// TestCBTRotatedDirectory: the host has this directory's checkpoint but the
// directory no longer has its restore point (rotated away, restored from
// an older copy): a full backup with a [WAR]; the stale checkpoint goes.
func TestCBTRotatedDirectory(t *testing.T) {
	e := newCBTEnv(t)
	_, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	id := dirID(t, e.bk)
	require.NoError(t, os.RemoveAll(filepath.Join(e.bk, backupdir.MetaDir, "dom")))
	require.NoError(t, os.Remove(filepath.Join(e.bk, "vm.cbt-20240101-000001")))
	out, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	assert.Contains(t, out, "[WAR] 'dom' has the checkpoint '"+cbt.CheckpointName(id, "20240101-000001")+"' of '"+e.bk+"', which holds no --cbt restore point of it")
	assert.Empty(t, e.lastSpec().Disks[0].Incremental)
	assert.Equal(t, []string{cbt.CheckpointName(id, "20240101-000002")}, e.checkpoints(t))
}

// TestCBTChainDamaged: a file of the chain the increment would extend is
// gone: that disk gets a full backup, with a [WAR].
func TestCBTChainDamaged(t *testing.T) {
	e := newCBTEnv(t)
	_, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	require.NoError(t, os.Remove(filepath.Join(e.bk, "vm.cbt-20240101-000001")))
	out, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	assert.Contains(t, out, "[WAR] Disk 'vda' of 'dom' gets a full backup: 'vm.cbt-20240101-000001' is missing\n")
	assert.Empty(t, e.lastSpec().Disks[0].Incremental)
}

// TestCBTInconsistentBitmaps: after an unclean QEMU exit libvirt refuses
// the increment; the run deletes its checkpoints and makes a full backup,
// with a [WAR] saying why; the older restore points stay.
func TestCBTInconsistentBitmaps(t *testing.T) {
	e := newCBTEnv(t)
	_, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	_, err = e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	id := dirID(t, e.bk)
	e.f.Backup.Broken = map[string]bool{cbt.CheckpointName(id, "20240101-000002"): true}
	e.f.Backup.DeleteErr = map[string]error{cbt.CheckpointName(id, "20240101-000002"): fmt.Errorf("internal error: bitmap not found in backing chain")}
	out, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	assert.Regexp(t, `\[WAR\] The changed-block bitmaps of 'dom' are inconsistent \(QEMU stopped uncleanly since the last backup\?\): .*missing or broken bitmap '`+cbt.CheckpointName(id, "20240101-000002")+`'.*making a full backup`, out)
	spec := e.lastSpec()
	assert.Empty(t, spec.Disks[0].Incremental)
	assert.Equal(t, []string{spec.Checkpoint}, e.checkpoints(t), "only the new checkpoint is left")
	ms := points(t, e.bk)
	require.Len(t, ms, 3)
	assert.Len(t, ms[2].Disks[0].Chain, 1, "a new full backup")
	for _, m := range ms {
		for _, f := range m.Files() {
			assert.FileExists(t, filepath.Join(e.bk, f), "older restore points stay")
		}
	}
}

// TestCBTFailedJob: a failed (aborted) job leaves nothing: not its
// checkpoint, not its file, not its journal; the next run increments from
// the last good checkpoint.
func TestCBTFailedJob(t *testing.T) {
	e := newCBTEnv(t)
	_, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	id := dirID(t, e.bk)
	e.f.Backup.End = func(string, virt.BackupSpec) *virt.BackupEvent { return &virt.BackupEvent{Error: "Operation canceled"} }
	out, err := e.backup(t, e.bk, Config{})
	assert.ErrorIs(t, err, ErrFailed)
	assert.Contains(t, out, "[ERR] Backup for 'dom' failed! the backup job failed: Operation canceled\n")
	assert.Equal(t, []string{cbt.CheckpointName(id, "20240101-000001")}, e.checkpoints(t))
	assert.NoFileExists(t, filepath.Join(e.bk, "vm.cbt-20240101-000002"))
	assert.NoFileExists(t, filepath.Join(e.bk, ".vm.cbt-20240101-000002.fi-backup-cbt"))
	assert.Len(t, points(t, e.bk), 1)

	e.f.Backup.End = nil
	_, err = e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	assert.Equal(t, cbt.CheckpointName(id, "20240101-000001"), e.lastSpec().Disks[0].Incremental, "from the last good checkpoint")
}

// TestCBTTwoDirectories: two backup directories of one domain keep their
// own series; neither deletes the other's checkpoint (nor another tool's).
func TestCBTTwoDirectories(t *testing.T) {
	e := newCBTEnv(t)
	e.f.Backup.Checkpoints = map[string][]virt.Checkpoint{"dom": {{Name: "virtnbdbackup.0", Bitmaps: []string{"vda"}}}}
	other := t.TempDir()
	for i := 0; i < 2; i++ {
		_, err := e.backup(t, e.bk, Config{})
		require.NoError(t, err)
		_, err = e.backup(t, other, Config{})
		require.NoError(t, err)
	}
	a, b := dirID(t, e.bk), dirID(t, other)
	require.NotEqual(t, a, b)
	assert.ElementsMatch(t, []string{"virtnbdbackup.0", cbt.CheckpointName(a, "20240101-000003"), cbt.CheckpointName(b, "20240101-000004")}, e.checkpoints(t))
	assert.Equal(t, cbt.CheckpointName(b, "20240101-000002"), e.lastSpec().Disks[0].Incremental)
	for _, d := range e.f.Backup.Deleted {
		assert.NotContains(t, d, "virtnbdbackup")
	}
}

// TestCBTDiskKinds: a raw disk has no bitmap and is backed up in full on
// every run; snapshot='no' and read-only disks stay out, as with the
// snapshot method; each is reported. A disk that is not a local file must
// carry snapshot='no'.
func TestCBTDiskKinds(t *testing.T) {
	e := newCBTEnv(t)
	vda, vdb := e.disk(t, "vda", "vm.qcow2", "qcow2"), e.disk(t, "vdb", "data.raw", "raw")
	vdc := e.disk(t, "vdc", "scratch.qcow2", "qcow2")
	vdc.Snapshot = "no"
	vdd := e.disk(t, "vdd", "ro.qcow2", "qcow2")
	vdd.ReadOnly = true
	e.f.Disks["dom"] = []virt.Disk{vda, vdb, vdc, vdd}
	for i := 0; i < 2; i++ {
		out, err := e.backup(t, e.bk, Config{})
		require.NoError(t, err)
		assert.Contains(t, out, "[INF] Disk 'vdb' of 'dom' is raw: it has no changed-block bitmap and is backed up in full on every --cbt run\n")
		assert.Contains(t, out, "[INF] Disk 'vdc' of 'dom' has snapshot='no': not backed up\n")
		assert.Contains(t, out, "[INF] Disk 'vdd' of 'dom' is read-only: not backed up\n")
	}
	spec := e.lastSpec()
	assert.NotEmpty(t, spec.Disks[0].Incremental)
	assert.Equal(t, virt.BackupDisk{Target: "vdb", Path: filepath.Join(e.bk, ".data.cbt-20240101-000002.fi-backup-cbt")}, spec.Disks[1], "raw: full, no bitmap")
	assert.Equal(t, virt.BackupDisk{Target: "vdc"}, spec.Disks[2])
	assert.Equal(t, virt.BackupDisk{Target: "vdd"}, spec.Disks[3])
	m := points(t, e.bk)[1]
	assert.Equal(t, []string{"data.cbt-20240101-000002"}, chainNames(m.Disks[1]))
	assert.Equal(t, "snapshot='no'", m.Disks[2].Reason)
	assert.Equal(t, "read-only", m.Disks[3].Reason)

	e.f.Disks["dom"] = []virt.Disk{vda, {Target: "vde", Device: "disk", Type: "network", Format: "raw"}}
	out, err := e.backup(t, e.bk, Config{})
	assert.ErrorIs(t, err, ErrFailed)
	assert.Contains(t, out, "[ERR] Disks that are not local files (block devices, network disks) must carry snapshot='no' in the definition of 'dom' to be left out of the backup\n")
}

// TestCBTNameClash: two disks whose images have the same name would share
// the backup file names: refused before anything is done.
func TestCBTNameClash(t *testing.T) {
	e := newCBTEnv(t)
	a := e.disk(t, "vda", "vm.qcow2", "qcow2")
	require.NoError(t, os.Mkdir(filepath.Join(e.host, "b"), 0o755))
	b := e.disk(t, "vdb", "b/vm.qcow2", "qcow2")
	e.f.Disks["dom"] = []virt.Disk{a, b}
	out, err := e.backup(t, e.bk, Config{})
	assert.ErrorIs(t, err, ErrFailed)
	assert.Contains(t, out, "[ERR] Backup for 'dom' failed! Disks 'vda' and 'vdb' would both be backed up as 'vm.cbt-<moment>': rename one of the images\n")
	assert.Empty(t, e.f.Backup.Specs)
}

// TestCBTSameSecond: a moment whose names are taken (another domain's disk
// of the same image name backed up in the same second) moves on to the
// next second.
func TestCBTSameSecond(t *testing.T) {
	e := newCBTEnv(t)
	require.NoError(t, os.WriteFile(filepath.Join(e.bk, "vm.cbt-20240101-000001"), []byte("another domain's"), 0o600))
	_, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	assert.Equal(t, "20240101-000002", points(t, e.bk)[0].Moment)
	b, err := os.ReadFile(filepath.Join(e.bk, "vm.cbt-20240101-000001"))
	require.NoError(t, err)
	assert.Equal(t, "another domain's", string(b))
}

// TestCBTRecoverKilledRun: a run killed during its job left a journal; the
// next run aborts the job, deletes its checkpoint and files, and
// increments from the last good checkpoint.
func TestCBTRecoverKilledRun(t *testing.T) {
	e := newCBTEnv(t)
	_, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	id := dirID(t, e.bk)
	// The killed run: journaled, target created, job started and running.
	e.f.Backup.End = func(string, virt.BackupSpec) *virt.BackupEvent { return nil }
	tmp := filepath.Join(e.bk, ".vm.cbt-20240101-000002.fi-backup-cbt")
	require.NoError(t, os.WriteFile(tmp, []byte("partial"), 0o600))
	cp := cbt.CheckpointName(id, "20240101-000002")
	rec := cbt.Record("dom", cp, e.bk, "20240101-000002", []string{tmp, filepath.Join(e.bk, "vm.cbt-20240101-000002")}, false)
	require.NoError(t, journal.Store{Dir: e.lock}.Write(rec))
	dom, err := e.f.Lookup("dom")
	require.NoError(t, err)
	require.NoError(t, dom.BeginBackup(virt.BackupSpec{Checkpoint: cp, Disks: []virt.BackupDisk{{Target: "vda", Path: tmp, Incremental: cbt.CheckpointName(id, "20240101-000001"), Bitmap: true}}}))
	require.NoError(t, dom.Close())

	e.f.Backup.End = nil
	e.sec = 2
	out, err := e.backup(t, e.bk, Config{})
	require.NoError(t, err)
	assert.Contains(t, out, "[WAR] Aborting the --cbt backup job of 'dom' left by an interrupted fi-backup run")
	assert.NoFileExists(t, tmp)
	spec := e.lastSpec()
	assert.Equal(t, cbt.CheckpointName(id, "20240101-000001"), spec.Disks[0].Incremental, "from the last good checkpoint")
	assert.Equal(t, []string{spec.Checkpoint}, e.checkpoints(t))
	ms := points(t, e.bk)
	require.Len(t, ms, 2)
	assert.Equal(t, []string{"vm.cbt-" + ms[1].Moment, "vm.cbt-20240101-000001"}, chainNames(ms[1].Disks[0]))
}

// TestCBTQuiesceWithoutAgent: -q without a guest agent fails the domain
// before anything is made.
func TestCBTQuiesceWithoutAgent(t *testing.T) {
	e := newCBTEnv(t)
	e.f.Backup.NoAgent = true
	out, err := e.backup(t, e.bk, Config{Quiesce: true})
	assert.ErrorIs(t, err, ErrFailed)
	assert.Contains(t, out, "[ERR] Backup for 'dom' failed! cannot freeze the guest's file systems: argument unsupported: QEMU guest agent is not configured\n")
	assert.Empty(t, e.checkpoints(t))
	assert.Empty(t, points(t, e.bk))
	entries, err := os.ReadDir(e.bk)
	require.NoError(t, err)
	for _, en := range entries {
		assert.True(t, en.Name() == backupdir.MetaDir, "nothing but the directory's id: %s", en.Name())
	}
	assert.True(t, strings.Contains(out, "-q needs qemu-guest-agent"))
}
