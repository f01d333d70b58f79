package testenv

import (
	"bytes"
	"os"
	"sync"
	"testing"

	"github.com/creack/pty"
	"github.com/stretchr/testify/require"
)

// Terminal opens a pseudo-terminal of rows×cols for a test. The test gives
// tty to the code under test as its terminal; drawn closes tty, waits until
// everything written to it has been read, and returns it.
func Terminal(t testing.TB, rows, cols uint16) (tty *os.File, drawn func() string) {
	t.Helper()
	ptmx, tty, err := pty.Open()
	require.NoError(t, err)
	t.Cleanup(func() { _ = ptmx.Close() })
	require.NoError(t, pty.Setsize(ptmx, &pty.Winsize{Rows: rows, Cols: cols}))
	var (
		mu   sync.Mutex
		seen bytes.Buffer
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, err := ptmx.Read(buf)
			mu.Lock()
			seen.Write(buf[:n])
			mu.Unlock()
			if err != nil {
				return // EIO once tty is closed and everything is read
			}
		}
	}()
	return tty, func() string {
		_ = tty.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		return seen.String()
	}
}
