package backup

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/progress"
	"github.com/fi-backup/fi-backup/internal/virt"
	"github.com/fi-backup/fi-backup/internal/virt/virttest"
)

func qcow2File(t *testing.T, dir, name, backing string) virt.Image {
	t.Helper()
	p := filepath.Join(dir, name)
	args := []string{"create", "-q", "-f", "qcow2"}
	if backing != "" {
		args = append(args, "-F", "qcow2", "-b", filepath.Join(dir, backing))
	}
	out, err := exec.Command("qemu-img", append(append(args, p), "16M")...).CombinedOutput()
	require.NoError(t, err, "%s", out)
	return virt.Image{Path: p, Format: "qcow2"}
}

func liveDisk(target string, chain ...virt.Image) virt.Disk {
	return virt.Disk{Target: target, Device: "disk", Type: "file", Source: chain[0].Path, Format: "qcow2", Chain: chain, Complete: true}
}

// TestDisksCopiedAtOnce: the chains of a domain's disks are copied at the
// same time (each disk's copy waits until the other's has started: copied
// one after the other, the first would wait in vain), and the lines come
// out disk by disk, as a copy disk by disk prints them.
func TestDisksCopiedAtOnce(t *testing.T) {
	img, bk := t.TempDir(), t.TempDir()
	aBase, bBase := qcow2File(t, img, "a-base.qcow2", ""), qcow2File(t, img, "b-base.qcow2", "")
	a, b := qcow2File(t, img, "a.qcow2", "a-base.qcow2"), qcow2File(t, img, "b.qcow2", "b-base.qcow2")
	fake := virttest.New(map[string]virt.State{"d": virt.StateRunning})
	fake.Disks["d"] = []virt.Disk{liveDisk("vda", a, aBase), liveDisk("vdb", b, bBase)}
	dom, err := fake.Lookup("d")
	require.NoError(t, err)
	defer dom.Close()

	var mu sync.Mutex
	started := map[string]chan struct{}{"a-base.qcow2": make(chan struct{}), "b-base.qcow2": make(chan struct{})}
	other := map[string]string{"a-base.qcow2": "b-base.qcow2", "b-base.qcow2": "a-base.qcow2"}
	bar := func(src string, _ int64) *progress.Bar {
		name := filepath.Base(src)
		mu.Lock()
		close(started[name])
		mu.Unlock()
		select {
		case <-started[other[name]]:
		case <-time.After(10 * time.Second): // a deadline, not a speed test
			t.Errorf("copying %s: the other disk's copy did not start meanwhile", name)
		}
		return nil
	}
	var out bytes.Buffer
	p := logging.New(&out, true, true)
	r := &Runner{p: p, dir: &backupdir.Dir{Path: bk, P: p, Bar: bar}}
	_, copied, err := r.copyOnline(context.Background(), dom)
	require.NoError(t, err, out.String())
	require.Len(t, copied, 2)
	assert.Equal(t, "a-base.qcow2", copied[0].files[0].Name)
	assert.Equal(t, "b-base.qcow2", copied[1].files[0].Name)
	assert.FileExists(t, filepath.Join(bk, "a-base.qcow2"))
	assert.FileExists(t, filepath.Join(bk, "b-base.qcow2"))

	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	lastA, firstB := -1, len(lines)
	for i, l := range lines {
		if strings.Contains(l, "/a") {
			lastA = i
		}
		if strings.Contains(l, "/b") && i < firstB {
			firstB = i
		}
	}
	assert.Less(t, lastA, firstB, "vda's lines, then vdb's:\n%s", out.String())
	assert.True(t, strings.HasPrefix(lines[0], "[DEB] Getting all backing files for: '"+a.Path+"'"), out.String())
}

// TestConcurrentOnlyWhenIndependent: disks are copied at once only when no
// two chains share a file or a copy name, and never with a kill point.
func TestConcurrentOnlyWhenIndependent(t *testing.T) {
	im := func(p string) virt.Image { return virt.Image{Path: p} }
	r := &Runner{}
	assert.True(t, r.concurrent([]virt.Disk{liveDisk("vda", im("/d/a1"), im("/d/a0")), liveDisk("vdb", im("/d/b1"), im("/d/b0"))}))
	assert.False(t, r.concurrent([]virt.Disk{liveDisk("vda", im("/d/a1"), im("/d/a0"))}), "one disk")
	assert.False(t, r.concurrent([]virt.Disk{liveDisk("vda", im("/d/a1"), im("/t/base")), liveDisk("vdb", im("/d/b1"), im("/t/base"))}), "a shared template")
	assert.False(t, r.concurrent([]virt.Disk{liveDisk("vda", im("/d/a1"), im("/x/disk")), liveDisk("vdb", im("/d/b1"), im("/y/disk"))}), "one copy name")
	assert.False(t, r.concurrent([]virt.Disk{liveDisk("vda", im("/d/a1"), im("/d/a0")), {Target: "vdb", Chain: []virt.Image{im("/d/b1")}, Complete: true}}), "one chain to copy")
	r.cfg.KillAt = "copy"
	assert.False(t, r.concurrent([]virt.Disk{liveDisk("vda", im("/d/a1"), im("/d/a0")), liveDisk("vdb", im("/d/b1"), im("/d/b0"))}), "a kill point")
}
