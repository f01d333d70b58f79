package logging

import (
	"bytes"
	"errors"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestHoldKeepsOutputUntilReleased: nothing reaches the writer while held
// (a guest may be paused then); everything arrives in order afterwards.
func TestHoldKeepsOutputUntilReleased(t *testing.T) {
	var b bytes.Buffer
	p := New(&b, true, true)
	p.Info("before")
	release := p.Hold()
	p.Verb("paused 1")
	inner := p.Hold()
	p.Debug("paused 2")
	inner()
	assert.Equal(t, "[INF] before\n", b.String(), "an inner release does not flush")
	p.Err("paused 3")
	release()
	release() // idempotent
	p.Warn("after")
	assert.Equal(t, "[INF] before\n[VER] paused 1\n[DEB] paused 2\n[ERR] paused 3\n[WAR] after\n", b.String())
}

type failingWriter struct{ calls int }

func (w *failingWriter) Write(p []byte) (int, error) {
	w.calls++
	return 0, syscall.EPIPE
}

// TestWriteErrorIsRememberedNotRetried: a closed pipe is reported once and
// never makes the printer fail or block again.
func TestWriteErrorIsRememberedNotRetried(t *testing.T) {
	w := &failingWriter{}
	p := New(w, false, false)
	assert.NoError(t, p.WriteErr())
	p.Err("one")
	p.Err("two")
	p.Raw("three")
	assert.Equal(t, 1, w.calls)
	assert.True(t, errors.Is(p.WriteErr(), syscall.EPIPE))
}
