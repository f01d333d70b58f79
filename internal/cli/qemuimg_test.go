package cli

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/snapshot"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// loggingQemuImg writes a qemu-img that records each call in the returned
// log and then runs the real one.
func loggingQemuImg(t *testing.T) (bin, log string) {
	real, err := exec.LookPath("qemu-img")
	require.NoError(t, err)
	dir := t.TempDir()
	bin, log = filepath.Join(dir, "qemu-img"), filepath.Join(dir, "calls")
	script := "#!/bin/sh\necho \"$*\" >> '" + log + "'\nexec '" + real + "' \"$@\"\n"
	require.NoError(t, os.WriteFile(bin, []byte(script), 0o755))
	return bin, log
}

// TestOneQemuImgPerRun: a live backup of a two-disk domain whose chains
// are two files deep, twice into the same directory (the second run
// rewrites the backing references of new copies, and reads the existing
// copies' headers), and a backup of a shut-off domain with a chain start
// qemu-img once per run, for --version; the chains, backing references,
// sizes and checksums are all read and written natively.
func TestOneQemuImgPerRun(t *testing.T) {
	qemu, calls := loggingQemuImg(t)
	img := t.TempDir()
	mk := func(name, backing string) string {
		p := filepath.Join(img, name)
		args := []string{"create", "-q", "-f", "qcow2"}
		if backing != "" {
			args = append(args, "-F", "qcow2", "-b", backing)
		}
		out, err := exec.Command("qemu-img", append(append(args, p), "16M")...).CombinedOutput()
		require.NoError(t, err, "%s", out)
		return p
	}
	chain := func(paths ...string) []virt.Image {
		var c []virt.Image
		for _, p := range paths {
			c = append(c, virt.Image{Path: p, Format: "qcow2"})
		}
		return c
	}
	disk := func(target string, c []virt.Image) virt.Disk {
		return virt.Disk{Target: target, Device: "disk", Type: "file", Source: c[0].Path, Format: "qcow2", Chain: c, Complete: true}
	}
	a1, b1 := mk("a-base.qcow2", ""), mk("b-base.qcow2", "")
	a2, b2 := mk("a.qcow2", a1), mk("b.qcow2", b1)
	o1, o2 := mk("o-base.qcow2", ""), mk("o.qcow2", "")
	require.NoError(t, os.Remove(o2))
	o2 = mk("o.qcow2", o1)

	h := newHarness(t, map[string]virt.State{"live": virt.StateRunning, "off": virt.StateShutoff})
	h.env["FI_BACKUP_QEMU_IMG"] = qemu
	h.fake.Disks["live"] = []virt.Disk{disk("vda", chain(a2, a1)), disk("vdb", chain(b2, b1))}
	// The inactive XML names only the top; the rest is read from the files.
	h.fake.Disks["off"] = []virt.Disk{{Target: "vda", Device: "disk", Type: "file", Source: o2, Format: "qcow2", Chain: chain(o2)}}
	snaps := 0
	h.fake.Snapshot = func(name string, spec virt.SnapshotSpec) error {
		snaps++ // the harness's clock stands still: one name per snapshot
		var next []virt.Disk
		for _, d := range h.fake.Disks[name] {
			top := snapshot.OverlayName(d.Source, fmt.Sprintf("%s-%d", spec.Name, snaps))
			mk(filepath.Base(top), d.Source)
			d.Source, d.Chain = top, append(chain(top), d.Chain...)
			next = append(next, d)
		}
		h.fake.Disks[name] = next
		return nil
	}
	bdir := t.TempDir()
	for run := 1; run <= 2; run++ {
		require.NoError(t, os.WriteFile(calls, nil, 0o644))
		so, _, code := h.run(t, "-b", bdir, "live")
		require.Equal(t, 0, code, "%s", so)
		log, err := os.ReadFile(calls)
		require.NoError(t, err)
		assert.Equal(t, "--version\n", string(log), "run %d", run)
	}
	copies, err := filepath.Glob(filepath.Join(bdir, "*.qcow2"))
	require.NoError(t, err)
	assert.Len(t, copies, 4, "each run copied the chains below its overlays")

	require.NoError(t, os.WriteFile(calls, nil, 0o644))
	so, _, code := h.run(t, "-b", bdir, "off")
	require.Equal(t, 0, code, "%s", so)
	log, err := os.ReadFile(calls)
	require.NoError(t, err)
	assert.Equal(t, "--version\n", string(log))
	assert.FileExists(t, filepath.Join(bdir, "o.qcow2"))
	assert.FileExists(t, filepath.Join(bdir, "o-base.qcow2"))
}

// TestQemuImgVersionWhileConnecting: `qemu-img --version` is already
// running while libvirt is being connected (the two overlap): the fake
// qemu-img marks that it started, and the connection waits for the mark.
// Had the version check started after the connection, the mark would never
// come.
func TestQemuImgVersionWhileConnecting(t *testing.T) {
	dir := t.TempDir()
	mark := filepath.Join(dir, "started")
	bin := filepath.Join(dir, "qemu-img")
	require.NoError(t, os.WriteFile(bin, []byte("#!/bin/sh\n: > '"+mark+"'\necho 'qemu-img version 7.2.22 (fake)'\n"), 0o755))
	h := newHarness(t, map[string]virt.State{"d0": virt.StateShutoff})
	h.env["FI_BACKUP_QEMU_IMG"] = bin
	var so, se bytes.Buffer
	started := false
	code := Run(context.Background(), Env{
		Prog: "./fi-backup", Stdout: &so, Stderr: &se,
		Getenv: func(k string) string { return h.env[k] },
		Connect: func(string) (virt.Hypervisor, error) {
			for i := 0; i < 1000 && !started; i++ { // up to 10 s: a deadline, not a speed test
				_, err := os.Stat(mark)
				started = err == nil
				time.Sleep(10 * time.Millisecond)
			}
			return h.fake, nil
		},
		Now:     time.Now,
		LockDir: h.lockDir,
	}, []string{"-d", "-c", "d0"})
	assert.True(t, started, "qemu-img --version had not started when libvirt was connected")
	assert.Equal(t, 0, code, "%s", so.String())
	assert.Contains(t, so.String(), "[DEB] "+bin+" version '7.2.22' is supported\n")
}
