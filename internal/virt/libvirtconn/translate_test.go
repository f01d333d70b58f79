package libvirtconn

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"libvirt.org/go/libvirt"

	"github.com/fi-backup/fi-backup/internal/virt"
)

// TestTranslate: libvirt's errors (as seen on libvirt 9.0) keep their
// message and get the sentinel the tool reacts to.
func TestTranslate(t *testing.T) {
	for _, tc := range []struct {
		code libvirt.ErrorNumber
		msg  string
		kind error
	}{
		{libvirt.ERR_NO_DOMAIN, "Domain not found: no domain with matching name 'x'", virt.ErrNoDomain},
		{libvirt.ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not running", virt.ErrNotRunning},
		{libvirt.ERR_BLOCK_COPY_ACTIVE, "block copy still active: block job 'commit-vda' not ready for pivot yet", virt.ErrJobActive},
		{libvirt.ERR_CONFIG_UNSUPPORTED, "unsupported configuration: cannot generate external snapshot name for disk 'vdb': collision with disk 'vda'", virt.ErrNameCollision},
		{libvirt.ERR_CONFIG_UNSUPPORTED, "unsupported configuration: source for disk 'vdc' is not a regular file; refusing to generate external snapshot name", virt.ErrNotLocalFile},
		{libvirt.ERR_INTERNAL_ERROR, "internal error: unable to execute QEMU command 'transaction': Could not create file: Permission denied", virt.ErrPermission},
		{libvirt.ERR_CONFIG_UNSUPPORTED, "unsupported configuration: external snapshot file for disk vda already exists and is not a block device: /x", nil},
		{libvirt.ERR_CHECKPOINT_INCONSISTENT, "checkpoint inconsistent: missing or broken bitmap 'cp2' for disk 'vda'", virt.ErrCheckpointInconsistent},
		{libvirt.ERR_NO_DOMAIN_CHECKPOINT, "Domain checkpoint not found: no domain checkpoint with matching name 'cp9'", virt.ErrNoCheckpoint},
		{libvirt.ERR_NO_DOMAIN_BACKUP, "Domain backup job id not found: no domain backup job present", virt.ErrNoBackupJob},
		{libvirt.ERR_ARGUMENT_UNSUPPORTED, "argument unsupported: QEMU guest agent is not configured", virt.ErrAgent},
		{libvirt.ERR_AGENT_UNRESPONSIVE, "Guest agent is not responding: QEMU guest agent is not connected", virt.ErrAgent},
	} {
		err := translate("op", libvirt.Error{Code: tc.code, Message: tc.msg})
		var ve *virt.Error
		if assert.True(t, errors.As(err, &ve), tc.msg) {
			assert.Equal(t, tc.msg, ve.Msg)
			assert.Equal(t, tc.kind, ve.Kind, tc.msg)
		}
	}
	assert.Nil(t, translate("op", nil))
}
