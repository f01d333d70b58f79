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

// TestChild: an unbuffered child prints through its parent as it goes, a
// buffered one only at Flush, whole; both show every line to their tap and
// keep the parent's levels.
func TestChild(t *testing.T) {
	var b bytes.Buffer
	p := New(&b, true, false)
	var seen []string
	tap := func(prefix, msg string) { seen = append(seen, prefix+msg) }
	live := p.Child(false, tap)
	live.Err("e1")
	live.Debug("hidden")
	assert.Equal(t, "[ERR] e1\n", b.String())

	held := p.Child(true, tap)
	held.Info("i1")
	held.Verb("v1")
	p.Warn("other")
	assert.Equal(t, "[ERR] e1\n[WAR] other\n", b.String(), "nothing before Flush")
	held.Flush(p)
	assert.Equal(t, "[ERR] e1\n[WAR] other\n[INF] i1\n[VER] v1\n", b.String())
	assert.Equal(t, []string{"[ERR] e1", "[INF] i1", "[VER] v1"}, seen)
}
