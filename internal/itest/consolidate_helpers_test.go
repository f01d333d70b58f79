package itest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Helpers of the consolidation tests (consolidate_test.go).

var consBimgRE = regexp.MustCompile(`\.bimg-[0-9]{8}-[0-9]{6}$`)

// consSnap runs a fi-backup command that takes a snapshot, after moving to a
// new wall-clock second (overlay names have 1-second resolution), and
// requires exit 0.
func consSnap(t *testing.T, args ...string) result {
	t.Helper()
	nextSecond()
	r := run(t, args...)
	require.Equal(t, 0, r.Code, "fi-backup %s failed:\n%s%s", strings.Join(args, " "), r.Stdout, r.Stderr)
	return r
}

// consOverlays lists the names in dir that carry the overlay name.
func consOverlays(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	for _, f := range files(t, dir) {
		if consBimgRE.MatchString(f) {
			out = append(out, f)
		}
	}
	return out
}

func consSHA256(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Open(p)
	require.NoError(t, err)
	defer f.Close()
	h := sha256.New()
	_, err = io.Copy(h, f)
	require.NoError(t, err)
	return hex.EncodeToString(h.Sum(nil))
}

// consLines splits output into lines.
func consLines(out string) []string {
	return strings.Split(strings.TrimRight(out, "\n"), "\n")
}

// consHasLine reports whether out contains exactly this line.
func consHasLine(out, line string) bool {
	for _, l := range consLines(out) {
		if l == line {
			return true
		}
	}
	return false
}

// consMessages groups prefixed lines ("[ERR] ...") with their continuation
// lines (the old tool prints captured output as "\n <text>"), returning
// the whole messages with the given prefix.
func consMessages(out, prefix string) []string {
	var msgs []string
	cur := -1
	for _, l := range consLines(out) {
		switch {
		case strings.HasPrefix(l, prefix):
			msgs = append(msgs, l)
			cur = len(msgs) - 1
		case strings.HasPrefix(l, "["):
			cur = -1
		case cur >= 0:
			msgs[cur] += "\n" + l
		}
	}
	return msgs
}

// consHMPWrite writes pattern at off..off+n into the active layer of disk idx
// of domain name through HMP qemu-io; unlike Domain.write it reports
// errors instead of failing the test, so goroutines can use it.
func consHMPWrite(name string, idx int, pattern byte, off, n string) error {
	cmd := fmt.Sprintf(`qemu-io -d /machine/peripheral/virtio-disk%d/virtio-backend "write -P 0x%02x %s %s"`, idx, pattern, off, n)
	out, err := exec.Command("virsh", "-q", "-c", uri, "qemu-monitor-command", name, "--hmp", cmd).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	if bytes.Contains(out, []byte("rror")) {
		return fmt.Errorf("qemu-io write: %s", out)
	}
	return nil
}

// consWriteMiB fills total MiB from startMiB on with pattern, chunk MiB per
// qemu-io call.
func (d *Domain) consWriteMiB(t *testing.T, idx int, pattern byte, startMiB, total, chunk int) {
	t.Helper()
	for off := startMiB; off < startMiB+total; off += chunk {
		n := chunk
		if off+n > startMiB+total {
			n = startMiB + total - off
		}
		d.write(t, idx, pattern, fmt.Sprintf("%dM", off), fmt.Sprintf("%dM", n))
	}
}

// consFlush makes QEMU write its cached qcow2 metadata of disk idx's active
// layer to the file, so that qemu-io from outside sees what the guest wrote.
func (d *Domain) consFlush(t *testing.T, idx int) {
	t.Helper()
	cmd := fmt.Sprintf(`qemu-io -d /machine/peripheral/virtio-disk%d/virtio-backend "flush"`, idx)
	out := virsh(t, "qemu-monitor-command", d.Name, "--hmp", cmd)
	require.NotContains(t, out, "rror", "qemu-io consFlush failed: %s", out)
}

// consReads asserts that image (with its backing chain) has pattern at
// off..off+n.
func consReads(t *testing.T, image string, pattern byte, off, n string) {
	t.Helper()
	assert.True(t, readsBack(t, image, pattern, off, n), "%s should read 0x%02x at %s+%s", image, pattern, off, n)
}

func (d *Domain) consRunning(t *testing.T) {
	t.Helper()
	assert.Equal(t, "running", d.state(t), "domain %s should be running", d.Name)
}

// consNoBlockJob asserts that libvirt reports no block job on target.
func (d *Domain) consNoBlockJob(t *testing.T, target string) {
	t.Helper()
	cmd := exec.Command("virsh", "-c", uri, "blockjob", d.Name, target, "--info")
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, string(out))
	assert.Contains(t, string(out), "No current block job", "a block job is left on %s/%s", d.Name, target)
}

// consStart starts fi-backup in the background (own process group) with
// an output buffer that may be polled while it runs. The process is killed
// at the end of the test if still running.
func consStart(t *testing.T, args ...string) (*exec.Cmd, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(binary(t), args...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		select {
		case <-done:
		default:
			_ = cmd.Process.Kill()
			<-done
		}
	})
	consDone.Store(cmd, done)
	return cmd, out
}

var consDone sync.Map // *exec.Cmd → chan struct{}

// consWait waits (bounded) for a process from consStart and returns
// its exit code.
func consWait(t *testing.T, cmd *exec.Cmd, limit time.Duration) int {
	t.Helper()
	v, ok := consDone.Load(cmd)
	require.True(t, ok)
	select {
	case <-v.(chan struct{}):
	case <-time.After(limit):
		t.Fatalf("fi-backup still running after %s", limit)
	}
	return cmd.ProcessState.ExitCode()
}

// consWriter writes continuously into a disk through HMP qemu-io,
// cycling over offsets in [baseMiB, baseMiB+spanMiB), until stopped.
type consWriter struct {
	stop    chan struct{}
	done    chan struct{}
	writes  atomic.Int64
	errs    []error
	lastOff int // MiB offset of the last successful write; read after Stop
}

func consStartWriter(name string, idx int, pattern byte, baseMiB, spanMiB, chunkMiB int) *consWriter {
	w := &consWriter{stop: make(chan struct{}), done: make(chan struct{}), lastOff: -1}
	go func() {
		defer close(w.done)
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			// vary the offsets: stride 3 chunks through the span
			off := (i * 3 * chunkMiB) % (spanMiB - chunkMiB + 1)
			off -= off % chunkMiB
			off += baseMiB
			if err := consHMPWrite(name, idx, pattern, fmt.Sprintf("%dM", off), fmt.Sprintf("%dM", chunkMiB)); err != nil {
				if len(w.errs) < 10 {
					w.errs = append(w.errs, err)
				}
				time.Sleep(50 * time.Millisecond)
				continue
			}
			w.lastOff = off
			w.writes.Add(1)
		}
	}()
	return w
}

// Stop ends the loop and returns the writes done and the errors seen.
func (w *consWriter) Stop() (int64, error) {
	close(w.stop)
	<-w.done
	return w.writes.Load(), errors.Join(w.errs...)
}

// consAllIn asserts that every path lies directly in dir.
func consAllIn(t *testing.T, dir string, paths []string) {
	t.Helper()
	for _, p := range paths {
		assert.Equal(t, filepath.Clean(dir), filepath.Dir(p), "%s is outside %s", p, dir)
	}
}
