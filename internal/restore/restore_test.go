package restore

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"libvirt.org/go/libvirtxml"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/virt"
)

const def = `<domain type='qemu'>
  <name>vm</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='KiB'>32768</memory>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <loader readonly='yes' type='pflash'>/nonexistent/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/vm_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/imgs/vm.bimg-20240101-000003'/>
      <backingStore type='file'><format type='qcow2'/><source file='/imgs/vm.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/install.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/></interface>
    <serial type='file'><source path='/imgs/console.log'/><target port='0'/></serial>
    <console type='file'><source path='/imgs/console.log'/><target type='serial' port='0'/></console>
  </devices>
</domain>`

// TestRewrite: the restored definition has a new name, no UUID, the
// restored disk (and only it) on its flattened file, the NVRAM on its copy;
// the rest (MAC, cdrom, firmware) as it was, with a warning for each file
// that does not exist.
func TestRewrite(t *testing.T) {
	x, warnings, err := Rewrite(def, "vm-20240101-000003", map[string]string{"vda": "/restore/vm.qcow2"}, "/restore/vm_VARS.fd", "/restore")
	require.NoError(t, err)
	var dom libvirtxml.Domain
	require.NoError(t, dom.Unmarshal(x))
	assert.Equal(t, "vm-20240101-000003", dom.Name)
	assert.Empty(t, dom.UUID)
	assert.Equal(t, "/restore/vm.qcow2", dom.Devices.Disks[0].Source.File.File)
	assert.Equal(t, "qcow2", dom.Devices.Disks[0].Driver.Type)
	assert.Nil(t, dom.Devices.Disks[0].BackingStore)
	assert.Equal(t, "/isos/install.iso", dom.Devices.Disks[1].Source.File.File)
	assert.Equal(t, "/restore/vm_VARS.fd", dom.OS.NVRam.NVRam)
	assert.Equal(t, "52:54:00:12:34:56", dom.Devices.Interfaces[0].MAC.Address)
	assert.Equal(t, "/restore/vm-20240101-000003.console0.log", dom.Devices.Serials[0].Source.File.Path, "its own log")
	assert.Equal(t, "/restore/vm-20240101-000003.console0.log", dom.Devices.Consoles[0].Source.File.Path, "the same as the serial's")
	assert.Equal(t, []string{
		"'/nonexistent/OVMF_CODE.fd' (the firmware in the definition) does not exist: the restored domain needs it to start",
		"'/isos/install.iso' (disk 'hdc', not restored in the definition) does not exist: the restored domain needs it to start",
	}, warnings)
}

// TestSaveImage: a -s state file becomes libvirt's save image: its header,
// the definition (NUL-terminated), then the raw migration stream.
func TestSaveImage(t *testing.T) {
	dir := t.TempDir()
	stream := bytes.Repeat([]byte("QEVM\x00\x00\x00\x03stream"), 1000)
	state := filepath.Join(dir, "vm.statefile-20240101-000003.gz")
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write(stream)
	require.NoError(t, zw.Close())
	require.NoError(t, os.WriteFile(state, gz.Bytes(), 0o600))
	out := filepath.Join(dir, "vm.save")
	require.NoError(t, writeSaveImage(context.Background(), state, "<domain/>", out))
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	require.Equal(t, "LibvirtQemudSave", string(b[:16]))
	hdr := make([]uint32, 19)
	require.NoError(t, binary.Read(bytes.NewReader(b[16:92]), binary.LittleEndian, hdr))
	assert.Equal(t, []uint32{2, 10, 1, 0, 0}, hdr[:5], "version, data_len, was_running, raw, no cookie")
	assert.Equal(t, "<domain/>\x00", string(b[92:102]))
	assert.Equal(t, stream, b[102:])

	require.NoError(t, os.WriteFile(state, gz.Bytes()[:gz.Len()/2], 0o600))
	err = writeSaveImage(context.Background(), state, "<domain/>", filepath.Join(dir, "cut.save"))
	assert.ErrorContains(t, err, "truncated")
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
}

// backupWithPoint makes a backup directory holding a two-file chain (base
// with 0x11 at 0, top with 0x22 at 1M) recorded as restore point T.
func backupWithPoint(t *testing.T) (*backupdir.Dir, *backupdir.Point, *bytes.Buffer) {
	t.Helper()
	q, err := exec.LookPath("qemu-img")
	require.NoError(t, err)
	var out bytes.Buffer
	d := &backupdir.Dir{Path: t.TempDir(), P: logging.New(&out, true, true), Tool: qcow2.Tool{Path: q}}
	host := t.TempDir()
	base, top := filepath.Join(host, "vm.qcow2"), filepath.Join(host, "vm.bimg-20240101-000002")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", base)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 1M", top)
	files, err := d.CopyChain(context.Background(), "vm", []virt.Image{{Path: top, Format: "qcow2"}, {Path: base, Format: "qcow2"}}, false)
	require.NoError(t, err)
	xml, err := d.SaveDefinition("vm", "20240101-000003", strings.Replace(def, "<nvram>/var/lib/libvirt/qemu/nvram/vm_VARS.fd</nvram>", "", 1))
	require.NoError(t, err)
	require.NoError(t, d.WriteManifest(&backupdir.Manifest{Schema: 1, Domain: "vm", Moment: "20240101-000003", XML: xml,
		Disks: []backupdir.Disk{{Target: "vda", Device: "disk", BackedUp: true, Name: "vm.qcow2", Chain: files}}}))
	p, err := backupdir.Select(d.Points(nil, nil, nil), "vm", "latest")
	require.NoError(t, err)
	return d, p, &out
}

// TestRestoreWritesStandaloneDisk: the chain comes out flattened under the
// disk's own name, reading back every layer; the definition points at it.
func TestRestoreWritesStandaloneDisk(t *testing.T) {
	d, p, out := backupWithPoint(t)
	target := t.TempDir()
	job := &Job{P: d.P, Dir: d, Point: p, Target: target}
	require.NoError(t, job.Run(context.Background()), out.String())
	disk := filepath.Join(target, "vm.qcow2")
	for _, read := range []string{"read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0 2M 1M"} {
		o, err := exec.Command("qemu-io", "-r", "-f", "qcow2", "-c", read, disk).CombinedOutput()
		require.NoError(t, err)
		assert.NotContains(t, string(o), "Pattern verification failed", read)
	}
	info, err := exec.Command("qemu-img", "info", disk).CombinedOutput()
	require.NoError(t, err)
	assert.NotContains(t, string(info), "backing file", "standalone")
	x, err := os.ReadFile(filepath.Join(target, "vm.xml"))
	require.NoError(t, err)
	assert.Contains(t, string(x), "<name>vm-20240101-000003</name>")
	assert.Contains(t, string(x), disk)
	assert.Contains(t, out.String(), "[WAR] The restored definition keeps the MAC addresses of 'vm'")

	// Again into the same directory: nothing is overwritten.
	out.Reset()
	require.ErrorIs(t, (&Job{P: d.P, Dir: d, Point: p, Target: target}).Run(context.Background()), ErrFailed)
	assert.Contains(t, out.String(), "'vm.qcow2' already exists (nothing is overwritten)")
}

// TestRestoreCleansUpAfterFailure: a restore that fails half way (here its
// -s state file is truncated: the save image, written last, fails) or is
// interrupted removes what it wrote; a target that does not exist, or that
// is the backup directory, is refused.
func TestRestoreCleansUpAfterFailure(t *testing.T) {
	d, p, out := backupWithPoint(t)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write(bytes.Repeat([]byte("QEVM stream "), 10000))
	require.NoError(t, zw.Close())
	require.NoError(t, os.WriteFile(filepath.Join(d.Path, "vm.statefile-20240101-000003.gz"), gz.Bytes()[:gz.Len()/2], 0o600))
	p.Manifest.StateFile = "vm.statefile-20240101-000003.gz"
	target := t.TempDir()
	require.ErrorIs(t, (&Job{P: d.P, Dir: d, Point: p, Target: target}).Run(context.Background()), ErrFailed)
	assert.Contains(t, out.String(), "[INF] Restored the disk 'vda'", "the disk was written first")
	assert.Contains(t, out.String(), "the state file is truncated")
	entries, err := os.ReadDir(target)
	require.NoError(t, err)
	assert.Empty(t, entries, "nothing partial left")

	out.Reset()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, (&Job{P: d.P, Dir: d, Point: p, Target: target}).Run(ctx), ErrFailed)
	assert.Contains(t, out.String(), "interrupted")
	entries, err = os.ReadDir(target)
	require.NoError(t, err)
	assert.Empty(t, entries, "nothing partial left")

	out.Reset()
	require.ErrorIs(t, (&Job{P: d.P, Dir: d, Point: p, Target: filepath.Join(target, "missing")}).Run(context.Background()), ErrFailed)
	assert.Contains(t, out.String(), fmt.Sprintf("[ERR] Cannot restore into '%s': it doesn't exist or is not a directory", filepath.Join(target, "missing")))
	out.Reset()
	require.ErrorIs(t, (&Job{P: d.P, Dir: d, Point: p, Target: d.Path}).Run(context.Background()), ErrFailed)
	assert.Contains(t, out.String(), "it is the backup directory")
}
