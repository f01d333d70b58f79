package chains

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/virt"
	"github.com/fi-backup/fi-backup/internal/virt/virttest"
)

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	require.NoError(t, err, "%s", out)
}

// TestOthers: the files of other domains' chains (live XML for running
// ones, qemu-img for shut-off ones) are known by path and by inode; a chain
// qemu-img cannot read makes the answer incomplete, naming the domain.
func TestOthers(t *testing.T) {
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", base, "16M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
	gone := filepath.Join(dir, "gone.qcow2")
	broken := filepath.Join(dir, "broken.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", gone, "16M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", gone, broken)
	require.NoError(t, os.Remove(gone))

	fake := virttest.New(map[string]virt.State{"self": virt.StateRunning, "run": virt.StateRunning, "off": virt.StateShutoff, "bad": virt.StateShutoff})
	fake.Disks["run"] = []virt.Disk{{Target: "vda", Device: "disk", Source: "/live/top", Chain: []virt.Image{{Path: "/live/top"}, {Path: "/live/base"}}, Complete: true}}
	fake.Disks["off"] = []virt.Disk{{Target: "vda", Device: "disk", Source: top, Chain: []virt.Image{{Path: top}}}}
	q, err := exec.LookPath("qemu-img")
	require.NoError(t, err)
	var out bytes.Buffer
	r := Reader{P: logging.New(&out, true, true), Hyp: fake, Tool: qcow2.Tool{Path: q}}

	u := r.Others(context.Background(), "self", true)
	assert.True(t, u.Complete())
	assert.Equal(t, "run", u.Of("/live/base"))
	assert.Equal(t, "off", u.Of(base), "read from the qcow2 headers")
	link := filepath.Join(t.TempDir(), "link")
	require.NoError(t, os.Symlink(base, link))
	st, err := os.Stat(link)
	require.NoError(t, err)
	assert.Equal(t, "off", u.Holding(st), "found by inode, whatever the path")

	fake.Disks["bad"] = []virt.Disk{{Target: "vdb", Device: "disk", Source: broken, Chain: []virt.Image{{Path: broken}}}}
	u = r.Others(context.Background(), "self", true)
	assert.False(t, u.Complete())
	assert.Equal(t, "the backing chain of domain 'bad' could not be read", u.Why())
	assert.Equal(t, "bad", u.Of(broken), "what is listed is still in use")
	assert.Contains(t, out.String(), "[WAR] Cannot read the backing chain of domain 'bad': disk 'vdb': ")
	out.Reset()
	r.Others(context.Background(), "self", false)
	assert.Empty(t, out.String(), "quiet when asked")
}

// TestOfFileNative: qcow2 and raw chains are read without qemu-img (the
// reader's qemu-img does not exist here); only a format the native walk
// does not read goes to qemu-img.
func TestOfFileNative(t *testing.T) {
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.raw"), filepath.Join(dir, "top.qcow2")
	qemuImg(t, "create", "-q", "-f", "raw", base, "16M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, top)
	r := Reader{Tool: qcow2.Tool{Path: filepath.Join(dir, "no-qemu-img")}}
	c, err := r.OfFile(context.Background(), top)
	require.NoError(t, err)
	assert.Equal(t, []virt.Image{{Path: top, Format: "qcow2"}, {Path: base, Format: "raw"}}, c)

	_, err = r.OfFile(context.Background(), filepath.Join(dir, "gone.qcow2"))
	assert.ErrorIs(t, err, os.ErrNotExist, "a missing file is an error of its own, not a reason to ask qemu-img")

	vmdk, over := filepath.Join(dir, "base.vmdk"), filepath.Join(dir, "over.qcow2")
	qemuImg(t, "create", "-q", "-f", "vmdk", vmdk, "1M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "vmdk", "-b", vmdk, over)
	_, err = r.OfFile(context.Background(), over)
	assert.ErrorContains(t, err, "no-qemu-img", "vmdk is left to qemu-img")
	q, err := exec.LookPath("qemu-img")
	require.NoError(t, err)
	r.Tool.Path = q
	c, err = r.OfFile(context.Background(), over)
	require.NoError(t, err)
	assert.Equal(t, []virt.Image{{Path: over, Format: "qcow2"}, {Path: vmdk, Format: "vmdk"}}, c)
}

// TestCacheReadsEachDomainOnce: with a Cache, a domain's chain is read by
// the first Others and kept until Forget; a chain that could not be read
// is not kept, so it is read (and named) again.
func TestCacheReadsEachDomainOnce(t *testing.T) {
	fake := virttest.New(map[string]virt.State{"a": virt.StateRunning, "b": virt.StateRunning, "c": virt.StateRunning})
	disk := func(paths ...string) []virt.Disk {
		var chain []virt.Image
		for _, p := range paths {
			chain = append(chain, virt.Image{Path: p})
		}
		return []virt.Disk{{Target: "vda", Device: "disk", Type: "file", Source: paths[0], Chain: chain, Complete: true}}
	}
	fake.Disks["b"] = disk("/b/top", "/b/base")
	fake.Disks["c"] = []virt.Disk{{Target: "vda", Device: "disk", Type: "file", Source: filepath.Join(t.TempDir(), "gone.qcow2")}}
	var out bytes.Buffer
	r := Reader{P: logging.New(&out, true, true), Hyp: fake, Cache: NewCache()}

	u := r.Others(context.Background(), "a", true)
	assert.Equal(t, "b", u.Of("/b/top"))
	assert.False(t, u.Complete())
	assert.Contains(t, out.String(), "domain 'c'")

	fake.Disks["b"] = disk("/b/new", "/b/base")
	fake.Disks["c"] = disk("/c/top")
	out.Reset()
	u = r.Others(context.Background(), "a", true)
	assert.Equal(t, "b", u.Of("/b/top"), "b's chain as first read: kept for the run")
	assert.Empty(t, u.Of("/b/new"))
	assert.Equal(t, "c", u.Of("/c/top"), "an unreadable chain is read again")
	assert.True(t, u.Complete())
	assert.Empty(t, out.String())

	r.Cache.Forget("b")
	u = r.Others(context.Background(), "c", true)
	assert.Equal(t, "b", u.Of("/b/new"), "read again after Forget")
	assert.Empty(t, u.Of("/b/top"))
	assert.Empty(t, u.Of("/c/top"), "self is never listed, cached or not")

	r.Cache = nil // no cache: every call reads
	fake.Disks["b"] = disk("/b/third")
	assert.Equal(t, "b", r.Others(context.Background(), "a", true).Of("/b/third"))
}
