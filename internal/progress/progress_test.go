package progress

import (
	"bytes"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/fi-backup/fi-backup/internal/testenv"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestNoTerminalNoDisplay: with stderr not a terminal there is no display
// and the log lines go to stdout untouched.
func TestNoTerminalNoDisplay(t *testing.T) {
	var out, errOut bytes.Buffer
	u, logTo := Start(&out, &errOut)
	assert.Nil(t, u)
	assert.Same(t, io.Writer(&out), logTo)
	u.Copy("dom", "/x/disk.qcow2", 10).Set(5, 10) // nil-safe
	u.Stop()
	f, err := os.CreateTemp(t.TempDir(), "stderr")
	require.NoError(t, err)
	u, _ = Start(&out, f)
	assert.Nil(t, u, "a file is not a terminal")
}

// TestTerminalShowsBarsAndLines: on a terminal the bars are drawn, and log
// lines sharing that terminal come through in order, above them.
func TestTerminalShowsBarsAndLines(t *testing.T) {
	tty, drawn := testenv.Terminal(t, 24, 120)
	u, logTo := Start(tty, tty)
	require.NotNil(t, u)
	assert.NotSame(t, io.Writer(tty), logTo, "lines go through the display")
	bar := u.Copy("dom", "/x/disk1.qcow2", 100<<20)
	for i := int64(1); i <= 4; i++ {
		bar.Set(i*10<<20, 100<<20)
		_, _ = logTo.Write([]byte("[VER] line " + string(rune('0'+i)) + "\n"))
	}
	bar.Done()
	u.Stop()
	out := drawn()
	assert.Contains(t, out, "dom disk1.qcow2")
	assert.Contains(t, out, "MiB")
	last := -1
	for i := 1; i <= 4; i++ {
		at := strings.Index(out, "[VER] line "+string(rune('0'+i)))
		require.GreaterOrEqual(t, at, 0, "line %d printed:\n%q", i, out)
		assert.Greater(t, at, last, "in order")
		last = at
	}
}

// TestStopWhenTheTerminalWentAway: the terminal closes under the display
// (an ssh session that dropped); the run still ends: Stop returns.
func TestStopWhenTheTerminalWentAway(t *testing.T) {
	tty, drawn := testenv.Terminal(t, 24, 120)
	u, logTo := Start(tty, tty)
	require.NotNil(t, u)
	bar := u.Copy("dom", "/x/disk1.qcow2", 100<<20)
	bar.Set(1<<20, 100<<20)
	_, _ = logTo.Write([]byte("[VER] before\n"))
	_ = drawn() // closes the terminal
	_, _ = logTo.Write([]byte("[VER] after\n"))
	// mpb gives up at its next redraw (it cannot read the terminal's size);
	// from then on it refuses writes. Wait for that state, which is the one
	// where a redraw request would find nobody to take it.
	require.Eventually(t, func() bool {
		_, err := u.p.Write(nil)
		return err != nil
	}, 30*time.Second, 10*time.Millisecond, "the display did not give up")
	stopped := make(chan struct{})
	go func() {
		u.Stop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(30 * time.Second): // a deadline, not a speed test
		t.Fatal("Stop did not return once the terminal was gone")
	}
}
