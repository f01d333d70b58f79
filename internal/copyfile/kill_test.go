package copyfile

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Environment of the helper process started by TestCopyKilled.
const (
	helperEnv    = "FI_COPYFILE_HELPER"
	helperSrcEnv = "FI_COPYFILE_SRC"
	helperDstEnv = "FI_COPYFILE_DST"
)

// TestHelperCopyProcess is not a test: TestCopyKilled runs the test binary
// again with only this function selected, to have a Copy it can SIGKILL.
func TestHelperCopyProcess(t *testing.T) {
	if os.Getenv(helperEnv) != "1" {
		t.Skip("helper process for TestCopyKilled")
	}
	_, err := Copy(context.Background(), os.Getenv(helperSrcEnv), os.Getenv(helperDstEnv), Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// Layout of the image TestCopyKilled copies: 1.5 GiB apparent size, four
// 150 MiB data extents (600 MiB of real data) separated by holes.
const (
	killSize       = 1536 * mib
	killExtent     = 150 * mib
	killExtentStep = 384 * mib
)

// TestCopyKilled kills a copying process with SIGKILL (no cleanup runs) and
// checks what the next backup run sees: no destination, a temp file that
// IsTemp recognises and CleanTemps removes, NeedCopy still asking for the
// copy, and a rerun producing an identical file.
func TestCopyKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("writes and copies 600 MiB")
	}
	src := filepath.Join(t.TempDir(), "disk.qcow2")
	makeKillImage(t, src)
	dir := t.TempDir()
	dst := filepath.Join(dir, "disk.qcow2")

	tmp := killMidCopy(t, src, dst)

	_, err := os.Lstat(dst)
	assert.ErrorIs(t, err, os.ErrNotExist, "an interrupted copy must not look complete")
	assert.Equal(t, []string{filepath.Base(tmp)}, dirNames(t, dir))
	assert.True(t, IsTemp(filepath.Base(tmp)))

	srcInfo, err := os.Stat(src)
	require.NoError(t, err)
	need, reason, err := NeedCopy(srcInfo, nil, 0)
	require.NoError(t, err)
	assert.True(t, need)
	assert.Equal(t, ReasonMissing, reason)

	removed, err := CleanTemps(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{tmp}, removed)
	assert.Empty(t, dirNames(t, dir))

	_, err = Copy(context.Background(), src, dst, Options{})
	require.NoError(t, err)
	assertSameContent(t, src, dst)
	assert.LessOrEqual(t, statOf(t, dst).Blocks, statOf(t, src).Blocks+4*extentSlack)
}

func makeKillImage(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	require.NoError(t, err)
	defer func() { require.NoError(t, f.Close()) }()
	require.NoError(t, f.Truncate(killSize))
	for off := int64(0); off+killExtent <= killSize; off += killExtentStep {
		stamped(t, f, off, killExtent)
	}
}

// killMidCopy runs Copy(src, dst) in a child process, SIGKILLs it once its
// temp file has grown past 32 MiB and returns the temp file's path.
func killMidCopy(t *testing.T, src, dst string) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperCopyProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"=1", helperSrcEnv+"="+src, helperDstEnv+"="+dst)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	tmp, err := waitForTemp(filepath.Dir(dst), 32*mib, exited)
	if err != nil {
		_ = cmd.Process.Kill() // still running if it was too slow
		require.NoError(t, err, "helper output: %s", out.String())
	}
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	werr := <-exited
	if fi, err := os.Stat(tmp); err == nil {
		t.Logf("killed the copy with %d MiB of %d MiB in the temp file", fi.Size()>>20, killSize>>20)
	}

	var ee *exec.ExitError
	require.ErrorAs(t, werr, &ee, "helper output: %s", out.String())
	ws, ok := ee.Sys().(syscall.WaitStatus)
	require.True(t, ok)
	require.True(t, ws.Signaled() && ws.Signal() == syscall.SIGKILL, "helper was not killed: %v", werr)
	return tmp
}

// waitForTemp polls dir until a temp file of at least minSize bytes appears,
// failing if the process exits first or a minute passes.
func waitForTemp(dir string, minSize int64, exited <-chan error) (string, error) {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			// Reaped here, so the caller must not wait again.
			return "", fmt.Errorf("copy process ended before it could be killed: %v", err)
		default:
		}
		entries, err := os.ReadDir(dir)
		if err != nil {
			return "", err
		}
		for _, e := range entries {
			fi, err := e.Info()
			if IsTemp(e.Name()) && err == nil && fi.Size() >= minSize {
				return filepath.Join(dir, e.Name()), nil
			}
		}
		time.Sleep(time.Millisecond)
	}
	return "", errors.New("no growing temp file within a minute")
}
