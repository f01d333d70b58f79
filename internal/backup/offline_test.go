package backup

import (
	"bytes"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// TestOldFileList reproduces the old tool's "All N block files" list: one
// array for all disks, the first parent written at 0 and again at 1, so a
// shorter chain after a longer one leaves the longer one's tail behind.
func TestOldFileList(t *testing.T) {
	var out bytes.Buffer
	r := &Runner{p: logging.New(&out, true, true), dir: &backupdir.Dir{Path: "/bk"}}
	var l oldFileList
	img := func(p ...string) []virt.Image {
		var c []virt.Image
		for _, x := range p {
			c = append(c, virt.Image{Path: x})
		}
		return c
	}
	r.offlineWalkLines("/d/a3", img("/d/a3", "/d/a2", "/d/a1", "/d/a0"), &l)
	r.offlineWalkLines("/d/b1", img("/d/b1", "/d/b0"), &l)
	assert.Equal(t, "/d/b1", l.lastDisk)
	assert.Equal(t, []string{"/d/b0", "/d/b0", "/d/a1", "/d/a0"}, l.files)
	r.offlineWalkLines("/d/c", img("/d/c"), &l)
	assert.Equal(t, []string{"", "/d/b0", "/d/a1", "/d/a0"}, l.files, "no parent: an empty first entry")
	first := strings.Join([]string{
		"[DEB] Backing up: cp -up /d/a3 /bk/",
		"[DEB] Parent block device: '/d/a2'",
		"[DEB] Backing up: cp -up /d/a2 /bk/",
		"[DEB] Next file in backing file chain: '/d/a1'",
		"[DEB] Parent block device: '/d/a1'",
		"[DEB] Backing up: cp -up /d/a1 /bk/",
		"[DEB] Next file in backing file chain: '/d/a0'",
		"[DEB] Parent block device: '/d/a0'",
		"[DEB] Backing up: cp -up /d/a0 /bk/",
		"[DEB] Next file in backing file chain: ''",
		"[DEB] Backing up: cp -up /d/b1 /bk/",
	}, "\n")
	assert.True(t, strings.HasPrefix(out.String(), first), "the old walk lines, top first:\n%s", out.String())
}
