package qcow2

import (
	"encoding/binary"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// lockedByte reports whether another open file description holds a lock
// on byte off of path.
func lockedByte(t *testing.T, path string, off int64) bool {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: off, Len: 1}
	require.NoError(t, unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk))
	return lk.Type != unix.F_UNLCK
}

// holdOpen starts qemu-io on path (args before the image, e.g. -r for read
// only), waiting inside QEMU's block layer until it is killed, and returns
// once QEMU has taken its lock on byte off; the process is killed and
// reaped by release.
func holdOpen(t *testing.T, path string, off int64, args ...string) (release func()) {
	t.Helper()
	cmd := exec.Command("qemu-io", append(append(args, "-c", "sleep 600000"), path)...)
	require.NoError(t, cmd.Start())
	release = func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	// Wait for the lock, not for a time: qemu-io takes it when it opens
	// the image, before its command runs.
	deadline := time.Now().Add(30 * time.Second)
	for !lockedByte(t, path, off) {
		if time.Now().After(deadline) {
			release()
			t.Fatalf("qemu-io did not lock byte %d of %s within 30 s", off, path)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return release
}

// TestCheckClosed: an image a QEMU process holds open for writing is
// ErrLocked, and no longer once that process is gone; one held read-only
// is not (only a writer can still change it); a header QEMU left dirty or
// marked corrupt, and a file that is no qcow2, are errors that are not
// ErrLocked (waiting would not help).
func TestCheckClosed(t *testing.T) {
	dir := t.TempDir()
	img := create(t, filepath.Join(dir, "img.qcow2"), "", "", "")
	require.NoError(t, CheckClosed(img))

	release := holdOpen(t, img, qemuWriteLock)
	err := CheckClosed(img)
	require.ErrorIs(t, err, ErrLocked)
	assert.Contains(t, err.Error(), img)
	release()
	require.NoError(t, CheckClosed(img), "the writer is gone")

	release = holdOpen(t, img, 100, "-r") // 100: the lock of a reader
	assert.False(t, lockedByte(t, img, qemuWriteLock))
	require.NoError(t, CheckClosed(img), "a reader does not keep the image from being final")
	release()

	for _, c := range []struct {
		name string
		bit  uint64
		want string
	}{{"dirty", incompatDirty, "not closed cleanly"}, {"corrupt", incompatCorrupt, "corrupt"}} {
		p := filepath.Join(dir, c.name+".qcow2")
		copyFile(t, img, p)
		editHeader(t, p, func(h []byte) {
			binary.BigEndian.PutUint64(h[72:], binary.BigEndian.Uint64(h[72:])|c.bit)
		})
		err := CheckClosed(p)
		require.Error(t, err, c.name)
		assert.NotErrorIs(t, err, ErrLocked)
		assert.Contains(t, err.Error(), c.want)
	}

	raw := filepath.Join(dir, "raw.img")
	require.NoError(t, os.WriteFile(raw, make([]byte, 4096), 0o644))
	err = CheckClosed(raw)
	require.ErrorIs(t, err, ErrNotQcow2)
	assert.NotErrorIs(t, err, ErrLocked)
	require.Error(t, CheckClosed(filepath.Join(dir, "missing.qcow2")))
}
