package statedump

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/virt"
)

// fakeStream is a migration stream as far as the dump checks it: the QEVM
// header, then an incompressible payload bigger than a pipe buffer and the
// compressor's buffers.
func fakeStream() []byte {
	payload := make([]byte, 3<<20)
	for i := range payload {
		payload[i] = byte(rand.Uint32())
	}
	return append(append([]byte{}, streamMagic...), append(payload, 0x00)...)
}

func completing() []step {
	return []step{{status: "setup"}, {status: "active"}, {status: "active"}, {status: "completed", paused: true}}
}

func opts(dir string, log Logger) Options {
	return Options{Path: filepath.Join(dir, "dom.statefile-20250101-000000.gz"), Log: log,
		Timeout: 5 * time.Second, CancelWait: 2 * time.Second, Poll: 5 * time.Millisecond}
}

// leftovers lists the directory's files.
func leftovers(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	require.NoError(t, err)
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

func gunzip(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	require.NoError(t, err)
	b, err := io.ReadAll(zr)
	require.NoError(t, err)
	return b
}

func TestDumpSuccess(t *testing.T) {
	dir := t.TempDir()
	f := newFake(t)
	f.script, f.stream = completing(), fakeStream()
	log := &logRec{}
	d, err := Start(context.Background(), f, opts(dir, log))
	require.NoError(t, err, log.String())
	// Paused, stream complete, still under its temporary name.
	st, _ := f.State()
	assert.Equal(t, virt.StatePaused, st)
	assert.Equal(t, int64(len(f.stream)), d.RawSize())
	assert.Equal(t, 5*time.Millisecond, d.Downtime())
	names := leftovers(t, dir)
	require.Len(t, names, 1)
	assert.True(t, strings.HasPrefix(names[0], ".dom.statefile-20250101-000000.gz.part-"), names[0])

	time.Sleep(20 * time.Millisecond) // "the snapshot"
	pause, err := d.Resume()
	require.NoError(t, err)
	st, _ = f.State()
	assert.Equal(t, virt.StateRunning, st)
	assert.GreaterOrEqual(t, pause, 25*time.Millisecond, "QEMU's 5 ms downtime + the time paused here")
	assert.Equal(t, pause, d.Pause())
	require.NoError(t, d.Commit())
	d.Close() // no second resume, nothing removed
	assert.Equal(t, 1, f.resumes)

	assert.Equal(t, []string{"dom.statefile-20250101-000000.gz"}, leftovers(t, dir))
	fi, err := os.Stat(d.Path())
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	assert.Equal(t, f.stream, gunzip(t, d.Path()))
	out := log.String()
	assert.Contains(t, out, "[DEB] Resuming domain\n[VER] Domain resumed\n[VER] Domain 'dom' was paused for ")
	assert.NotContains(t, out, "[ERR]")
	assert.Equal(t, 0, f.called("migrate_cancel"))
}

func TestDumpRelativePath(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	f := newFake(t)
	f.script, f.stream = completing(), fakeStream()
	o := opts(".", nil)
	o.Path = "dom.statefile-20250101-000000.gz"
	d, err := Start(context.Background(), f, o)
	require.NoError(t, err)
	defer d.Close()
	assert.Equal(t, filepath.Join(dir, "dom.statefile-20250101-000000.gz"), d.Path(), "B21: resolved against our working directory")
}

// A failed dump leaves the guest running and no file, and says why.
func TestDumpFailures(t *testing.T) {
	hang := []step{{status: "active"}}
	for _, tc := range []struct {
		name       string
		setup      func(f *fakeQEMU)
		ctx        func() (context.Context, context.CancelFunc)
		timeout    time.Duration
		want       string
		cancel     bool // migrate_cancel must have been sent
		resumes    int  // resumes the dump itself had to do
		noMigrate  bool // refused before migrating
		noPipeFile bool
	}{
		{name: "migrate rejected", setup: func(f *fakeQEMU) {
			f.migrateReply = `{"id":"libvirt-7","error":{"class":"GenericError","desc":"There's a migration process in progress"}}`
		}, want: "QEMU refused the migration: There's a migration process in progress (GenericError)"},
		{name: "getfd rejected", setup: func(f *fakeQEMU) {
			f.getfdReply = `{"error":{"class":"GenericError","desc":"No file descriptor supplied via SCM_RIGHTS"}}`
		}, want: "cannot pass the state pipe to QEMU: No file descriptor supplied via SCM_RIGHTS (GenericError)", noMigrate: true},
		{name: "migration fails", setup: func(f *fakeQEMU) {
			f.script = []step{{status: "active"}, {status: "failed", desc: "Unable to write to file: Broken pipe"}}
		}, want: "the migration failed: Unable to write to file: Broken pipe"},
		{name: "migration fails while stopped, QEMU restarts the guest", setup: func(f *fakeQEMU) {
			f.script = []step{{status: "active"}, {status: "active", paused: true}, {status: "failed", paused: true}}
		}, want: "the migration failed: no reason given"},
		{name: "cancelled by someone else", setup: func(f *fakeQEMU) {
			f.script = []step{{status: "active"}, {status: "cancelled"}}
		}, want: "the migration was cancelled by someone else"},
		{name: "never completes", setup: func(f *fakeQEMU) { f.script, f.hold = hang, true },
			timeout: 150 * time.Millisecond, want: "the migration did not complete within 150ms", cancel: true},
		{name: "never completes, stopped, QEMU does not restart it", setup: func(f *fakeQEMU) {
			f.script, f.hold, f.noAutoResume = []step{{status: "active"}, {status: "active", paused: true}}, true, true
		}, timeout: 150 * time.Millisecond, want: "the migration did not complete within 150ms", cancel: true, resumes: 1},
		{name: "interrupted", setup: func(f *fakeQEMU) { f.script, f.hold = hang, true },
			ctx: func() (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancelCause(context.Background())
				time.AfterFunc(100*time.Millisecond, func() { cancel(errors.New("interrupted by SIGTERM")) })
				return ctx, func() { cancel(nil) }
			}, want: "interrupted by SIGTERM", cancel: true},
		{name: "interrupted while stopped", setup: func(f *fakeQEMU) {
			f.script, f.hold, f.noAutoResume = []step{{status: "active", paused: true}}, true, true
		}, ctx: func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 100*time.Millisecond)
		}, want: "interrupted (context deadline exceeded)", cancel: true, resumes: 1},
		{name: "stream is not a migration stream", setup: func(f *fakeQEMU) {
			f.stream = []byte("garbage that is not QEVM")
		}, want: `the stream does not start with QEMU's migration header (got "garbage ")`, resumes: 1},
		{name: "stream never ends", setup: func(f *fakeQEMU) { f.hold = true },
			want: "QEMU did not close the state stream after the migration completed", resumes: 1},
		{name: "domain paused by someone else", setup: func(f *fakeQEMU) { f.state = virt.StatePaused },
			want: "the domain is paused, not running", noMigrate: true, noPipeFile: true},
		{name: "another migration runs", setup: func(f *fakeQEMU) { f.busy = true },
			want: `a migration of the domain is already running (status "active")`, noMigrate: true, noPipeFile: true},
		{name: "state unreadable", setup: func(f *fakeQEMU) { f.stateErr = &virt.Error{Msg: "Domain not found"} },
			want: "cannot read the domain state: Domain not found", noMigrate: true, noPipeFile: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			f := newFake(t)
			f.script, f.stream = completing(), fakeStream()
			tc.setup(f)
			ctx, cancel := context.Background(), context.CancelFunc(func() {})
			if tc.ctx != nil {
				ctx, cancel = tc.ctx()
			}
			defer cancel()
			log := &logRec{}
			o := opts(dir, log)
			if tc.timeout > 0 {
				o.Timeout = tc.timeout
			}
			o.CancelWait = 300 * time.Millisecond
			wasPaused := f.state == virt.StatePaused
			d, err := Start(ctx, f, o)
			require.Error(t, err)
			assert.Nil(t, d)
			assert.Equal(t, tc.want, err.Error())
			assert.Contains(t, log.String(), "[ERR] Failed to dump the state of 'dom': "+tc.want+"\n")
			assert.Empty(t, leftovers(t, dir), "no partial state file")
			st, _ := f.State()
			if wasPaused {
				assert.Equal(t, virt.StatePaused, st, "a guest paused by someone else stays paused")
			} else if f.stateErr == nil {
				assert.Equal(t, virt.StateRunning, st, "the guest runs again\n%s", log.String())
			}
			assert.Equal(t, tc.resumes, f.resumes, "resumes by the dump")
			if tc.cancel {
				assert.Equal(t, 1, f.called("migrate_cancel"))
			} else {
				assert.Equal(t, 0, f.called("migrate_cancel"))
			}
			if tc.noMigrate {
				assert.Equal(t, 0, f.called("migrate"))
			}
			if tc.noPipeFile {
				assert.Equal(t, 0, f.called("getfd"))
			}
			if tc.resumes > 0 {
				assert.Contains(t, log.String(), "[DEB] Resuming domain\n[VER] Domain resumed\n")
			}
			t.Logf("\n%s", log)
		})
	}
}

func TestDumpRejectedMigrateClosesFD(t *testing.T) {
	f := newFake(t)
	f.script, f.stream = completing(), fakeStream()
	f.migrateReply = `{"error":{"class":"GenericError","desc":"no"}}`
	_, err := Start(context.Background(), f, opts(t.TempDir(), nil))
	require.Error(t, err)
	assert.Equal(t, 1, f.called("closefd"), "QEMU must not keep the pipe's write end")
}

func TestDumpUnwritableDir(t *testing.T) {
	f := newFake(t)
	f.script, f.stream = completing(), fakeStream()
	log := &logRec{}
	o := opts(filepath.Join(t.TempDir(), "vanished"), log)
	_, err := Start(context.Background(), f, o)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "cannot create the state file in '"+filepath.Dir(o.Path)+"': no such file or directory")
	assert.Equal(t, 0, f.called("getfd"))
}

// The pump keeps draining after a write error so QEMU never blocks, and
// reports the error at once.
func TestPumpWriteFailure(t *testing.T) {
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	p, err := startPump(r, failingWriter{}, gzip.BestSpeed)
	require.NoError(t, err)
	data := bytes.Repeat([]byte{1, 2, 3, 4}, 1<<20) // 4 MiB, more than any pipe buffer
	written := make(chan error, 1)
	go func() {
		_, err := w.Write(data)
		_ = w.Close()
		written <- err
	}()
	select {
	case <-p.failed:
	case <-time.After(5 * time.Second):
		t.Fatal("write failure not reported")
	}
	require.NoError(t, <-written, "the writer was never blocked")
	<-p.done
	raw, eof, head, readErr := p.result()
	assert.Equal(t, int64(len(data)), raw)
	assert.True(t, eof)
	assert.NoError(t, readErr)
	assert.Equal(t, data[:8], head)
	assert.EqualError(t, p.Err(), "no space left on device")
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("no space left on device") }

// A state file that cannot be written (disk full) during the migration:
// the dump cancels the migration, resumes and removes the partial file.
func TestDumpWriteFailureCancels(t *testing.T) {
	dir := t.TempDir()
	f := newFake(t)
	f.script, f.stream, f.hold = []step{{status: "active"}}, fakeStream(), true
	f.noAutoResume = true
	f.script = []step{{status: "active", paused: true}}
	log := &logRec{}
	o := opts(dir, log)
	o.writer = func(*os.File) io.Writer { return failingWriter{} }
	o.CancelWait = 300 * time.Millisecond
	_, err := Start(context.Background(), f, o)
	require.Error(t, err)
	assert.Equal(t, "cannot write the state file: no space left on device", err.Error())
	assert.Equal(t, 1, f.called("migrate_cancel"))
	assert.Equal(t, 1, f.resumes)
	assert.Empty(t, leftovers(t, dir))
	t.Logf("\n%s", log)
}

func TestCommitNeverOverwrites(t *testing.T) {
	dir := t.TempDir()
	f := newFake(t)
	f.script, f.stream = completing(), fakeStream()
	o := opts(dir, nil)
	require.NoError(t, os.WriteFile(o.Path, []byte("earlier"), 0o600))
	d, err := Start(context.Background(), f, o)
	require.NoError(t, err)
	_, err = d.Resume()
	require.NoError(t, err)
	err = d.Commit()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "the file already exists")
	d.Close()
	b, _ := os.ReadFile(o.Path)
	assert.Equal(t, "earlier", string(b))
	assert.Equal(t, []string{"dom.statefile-20250101-000000.gz"}, leftovers(t, dir))
}

// The caller's snapshot failed: Resume then Discard leaves nothing.
func TestDiscardAfterSnapshotFailure(t *testing.T) {
	dir := t.TempDir()
	f := newFake(t)
	f.script, f.stream = completing(), fakeStream()
	d, err := Start(context.Background(), f, opts(dir, nil))
	require.NoError(t, err)
	_, err = d.Resume()
	require.NoError(t, err)
	d.Discard()
	d.Close()
	assert.Empty(t, leftovers(t, dir))
	assert.Equal(t, 1, f.resumes)
}

// Close alone (a panic or early return in the caller) resumes and removes.
func TestCloseIsASafetyNet(t *testing.T) {
	dir := t.TempDir()
	f := newFake(t)
	f.script, f.stream = completing(), fakeStream()
	d, err := Start(context.Background(), f, opts(dir, nil))
	require.NoError(t, err)
	d.Close()
	st, _ := f.State()
	assert.Equal(t, virt.StateRunning, st)
	assert.Empty(t, leftovers(t, dir))
}

func TestResumeFailureIsReported(t *testing.T) {
	f := newFake(t)
	f.script, f.stream = completing(), fakeStream()
	log := &logRec{}
	d, err := Start(context.Background(), f, opts(t.TempDir(), log))
	require.NoError(t, err)
	f.resumeErr = &virt.Error{Msg: "Timed out during operation: cannot acquire state change lock"}
	_, err = d.Resume()
	require.Error(t, err)
	assert.Contains(t, log.String(), "[DEB] Resuming domain\n[ERR] Problem resuming domain 'dom'\n[ERR] Timed out during operation: cannot acquire state change lock\n")
	f.resumeErr = nil
	d.Close() // the safety net tries again
	st, _ := f.State()
	assert.Equal(t, virt.StateRunning, st)
}

func TestBandwidthSetAndRestored(t *testing.T) {
	f := newFake(t)
	f.script, f.stream = completing(), fakeStream()
	o := opts(t.TempDir(), nil)
	o.Bandwidth = 4096
	d, err := Start(context.Background(), f, o)
	require.NoError(t, err)
	defer d.Close()
	assert.Equal(t, 2, f.called("migrate-set-parameters"), "set, then restored")
	assert.Equal(t, int64(134217728), f.bandwidth)
}

func TestStaleTempsSwept(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, ".dom.statefile-20240101-000000.gz.part-12345")
	other := filepath.Join(dir, ".domx.statefile-20240101-000000.gz.part-12345") // another domain's
	keep := filepath.Join(dir, "dom.statefile-20240101-000000.gz")
	for _, p := range []string{stale, other, keep} {
		require.NoError(t, os.WriteFile(p, []byte("x"), 0o600))
	}
	f := newFake(t)
	f.script, f.stream = completing(), fakeStream()
	log := &logRec{}
	d, err := Start(context.Background(), f, opts(dir, log))
	require.NoError(t, err)
	d.Close()
	assert.NoFileExists(t, stale)
	assert.FileExists(t, other)
	assert.FileExists(t, keep)
	assert.Contains(t, log.String(), "[DEB] Removed '"+stale+"' left by an interrupted state dump\n")
}

// QEMU dies during the migration (what exec: did under seccomp): the dump
// gives up at once, says so, and leaves nothing.
func TestDumpQEMUDies(t *testing.T) {
	dir := t.TempDir()
	f := newFake(t)
	f.script, f.stream, f.hold = []step{{status: "active"}, {status: "crash"}}, fakeStream(), true
	log := &logRec{}
	start := time.Now()
	_, err := Start(context.Background(), f, opts(dir, log))
	require.Error(t, err)
	assert.Less(t, time.Since(start), time.Second, "no waiting for a dead QEMU")
	assert.Equal(t, "cannot query the migration: Unable to read from monitor: Connection reset by peer", err.Error())
	assert.Contains(t, log.String(), "[ERR] Domain 'dom' is crashed after the state dump\n")
	assert.Empty(t, leftovers(t, dir))
	assert.Equal(t, 0, f.resumes)
}

func TestDumpAlreadyInterrupted(t *testing.T) {
	f := newFake(t)
	f.script, f.stream = completing(), fakeStream()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	dir := t.TempDir()
	_, err := Start(ctx, f, opts(dir, nil))
	require.EqualError(t, err, "interrupted")
	assert.Equal(t, 0, f.called("getfd"))
	assert.Empty(t, leftovers(t, dir))
}
