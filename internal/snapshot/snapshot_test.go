package snapshot

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// TestOverlayName pins libvirt's naming rule, as verified on libvirt 9.0.
func TestOverlayName(t *testing.T) {
	for src, want := range map[string]string{
		"/imgs/vm.qcow2":                "/imgs/vm.bimg-20240101-120000",
		"/tmp/test disks/test1 1.img":   "/tmp/test disks/test1 1.bimg-20240101-120000",
		"/imgs/vm.bimg-20231231-235959": "/imgs/vm.bimg-20240101-120000",
		"/imgs/disk.tar.qcow2":          "/imgs/disk.tar.bimg-20240101-120000",
		"/imgs/vm1":                     "/imgs/vm1.bimg-20240101-120000",
		"/data/vm.d/disk":               "/data/vm.d/disk.bimg-20240101-120000",
		"/dir/.hidden":                  "/dir/.bimg-20240101-120000",
	} {
		assert.Equal(t, want, OverlayName(src, "bimg-20240101-120000"), src)
	}
	assert.Equal(t, "bimg-20240102-030405", Name(time.Date(2024, 1, 2, 3, 4, 5, 0, time.Local)))
}

func TestIsOverlay(t *testing.T) {
	assert.True(t, IsOverlay("/d/vm.bimg-20240101-000001"))
	assert.False(t, IsOverlay("/d/vm.bimg-20240101-000001.old"))
	assert.False(t, IsOverlay("/d/vm.bimg-2024010-000001"))
	assert.False(t, IsOverlay("/d/vm.qcow2"))
}

type fakeDomain struct {
	disks []virt.Disk
	err   error
	specs []virt.SnapshotSpec
}

func (f *fakeDomain) Name() string                       { return "dom" }
func (f *fakeDomain) Disks() ([]virt.Disk, error)        { return f.disks, nil }
func (f *fakeDomain) Snapshot(s virt.SnapshotSpec) error { f.specs = append(f.specs, s); return f.err }

// TestPlanRefusesUnknownChains: a disk whose chain libvirt does not report
// whole (or that has a non-file link) fails the plan, before any snapshot;
// cdroms and non-file disks are not backed up.
func TestPlanRefusesUnknownChains(t *testing.T) {
	file := func(src string, complete bool, chainErr error) virt.Disk {
		return virt.Disk{Target: "vda", Device: "disk", Source: src, Chain: []virt.Image{{Path: src}}, Complete: complete, ChainErr: chainErr}
	}
	var out bytes.Buffer
	p := logging.New(&out, true, true)
	disks, err := Plan(p, &fakeDomain{disks: []virt.Disk{file("/a", true, nil), {Device: "cdrom", Source: "/iso"}, {Device: "disk", Type: "block"}}})
	require.NoError(t, err)
	require.Len(t, disks, 1)
	assert.Equal(t, "/a", disks[0].Source)

	_, err = Plan(p, &fakeDomain{disks: []virt.Disk{file("/a", false, nil)}})
	assert.ErrorIs(t, err, ErrRefused)
	assert.Contains(t, out.String(), "[ERR] Cannot back up disk 'vda' of 'dom': libvirt does not report its backing chain\n")
	_, err = Plan(p, &fakeDomain{disks: []virt.Disk{file("/a", true, errors.New("backing store of type \"network\" is not a local file"))}})
	assert.ErrorIs(t, err, ErrRefused)
}

// TestTakeHints: a refused snapshot gets libvirt's own message and, for the
// refusals admins meet, a hint saying what to do.
func TestTakeHints(t *testing.T) {
	for _, tc := range []struct {
		kind error
		hint string
	}{
		{virt.ErrPermission, "[ERR] Check apparmor status or check if running with sufficient permissions\n"},
		{virt.ErrNameCollision, "[ERR] Two disks of 'dom' would get the same overlay name"},
		{virt.ErrNotLocalFile, "must carry snapshot='no' in the definition of 'dom'"},
	} {
		var out bytes.Buffer
		d := &fakeDomain{err: &virt.Error{Msg: "libvirt says no", Kind: tc.kind}}
		err := Take(logging.New(&out, true, true), d, "bimg-x", false)
		assert.ErrorIs(t, err, ErrRefused)
		assert.Contains(t, out.String(), "[ERR] Snapshot for 'dom' failed! libvirt says no\n")
		assert.Contains(t, out.String(), tc.hint)
		assert.NotContains(t, out.String(), "Exit code: 0", "B13")
	}
	var out bytes.Buffer
	d := &fakeDomain{}
	require.NoError(t, Take(logging.New(&out, true, true), d, "bimg-x", true))
	assert.Equal(t, []virt.SnapshotSpec{{Name: "bimg-x", Quiesce: true}}, d.specs)
	assert.Equal(t, "[DEB] Quiesce requested\n[VER] /usr/bin/virsh -q snapshot-create-as dom bimg-x --no-metadata --disk-only --atomic --quiesce\n[VER] Snapshot for block devices of 'dom' successful\n", out.String())
}
