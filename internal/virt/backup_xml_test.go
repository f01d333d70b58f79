package virt_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/virt"
)

// TestBackupXML: every disk is named (one left out says backup='no', or
// libvirt would back it up by default), a full and an incremental push
// backup into pre-created qcow2 files, and the checkpoint's bitmaps only
// where asked for.
func TestBackupXML(t *testing.T) {
	bx, cx, err := virt.BackupXML(virt.BackupSpec{Checkpoint: "fi-backup-0123456789abcdef-20240101-000002", Disks: []virt.BackupDisk{
		{Target: "vda", Path: "/bk/.vm.cbt-20240101-000002.fi-backup-cbt", Incremental: "fi-backup-0123456789abcdef-20240101-000001", Bitmap: true},
		{Target: "vdb", Path: "/bk/.raw.cbt-20240101-000002.fi-backup-cbt"},
		{Target: "hdc"},
	}})
	require.NoError(t, err)
	assert.Equal(t, `<domainbackup mode="push">
  <disks>
    <disk type="file" name="vda" backup="yes" backupmode="incremental" incremental="fi-backup-0123456789abcdef-20240101-000001">
      <driver type="qcow2"></driver>
      <target file="/bk/.vm.cbt-20240101-000002.fi-backup-cbt"></target>
    </disk>
    <disk type="file" name="vdb" backup="yes" backupmode="full">
      <driver type="qcow2"></driver>
      <target file="/bk/.raw.cbt-20240101-000002.fi-backup-cbt"></target>
    </disk>
    <disk name="hdc" backup="no"></disk>
  </disks>
</domainbackup>`, bx)
	assert.Equal(t, `<domaincheckpoint>
  <name>fi-backup-0123456789abcdef-20240101-000002</name>
  <disks>
    <disk name="vda" checkpoint="bitmap"></disk>
    <disk name="vdb" checkpoint="no"></disk>
    <disk name="hdc" checkpoint="no"></disk>
  </disks>
</domaincheckpoint>`, cx)

	targets, err := virt.ParseBackupTargets(bx)
	require.NoError(t, err)
	assert.Equal(t, []string{"/bk/.vm.cbt-20240101-000002.fi-backup-cbt", "/bk/.raw.cbt-20240101-000002.fi-backup-cbt"}, targets)
}

// TestParseCheckpoint reads libvirt's own checkpoint XML (libvirt 9.0,
// checkpoint-dumpxml --no-domain).
func TestParseCheckpoint(t *testing.T) {
	c, err := virt.ParseCheckpoint(`<domaincheckpoint>
  <name>cp5</name>
  <parent>
    <name>cp4</name>
  </parent>
  <creationTime>1796216103</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='cp5'/>
    <disk name='vdb' checkpoint='no'/>
    <disk name='hdc' checkpoint='no'/>
  </disks>
</domaincheckpoint>`)
	require.NoError(t, err)
	assert.Equal(t, virt.Checkpoint{Name: "cp5", Bitmaps: []string{"vda"}}, c)
	assert.True(t, c.Tracks("vda"))
	assert.False(t, c.Tracks("vdb"))

	// With VIR_DOMAIN_CHECKPOINT_XML_SIZE: the changes since, per disk.
	c, err = virt.ParseCheckpoint(`<domaincheckpoint><name>cp6</name><disks>
    <disk name='vda' checkpoint='bitmap' bitmap='cp6' size='1048576'/>
    <disk name='vdb' checkpoint='no'/>
  </disks></domaincheckpoint>`)
	require.NoError(t, err)
	assert.Equal(t, map[string]uint64{"vda": 1 << 20}, c.Changed)
}
