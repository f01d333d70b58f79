// Package statedump writes a running domain's RAM and device state to
// "<dir>/<domain>.statefile-<ts>.gz" (fi-backup's -s), in the old tool's
// format: a gzip'ed QEMU migration stream.
//
// The old tool migrated to "exec:gzip -c > FILE". Since QEMU 7.0 libvirt's
// seccomp sandbox (spawn=deny) kills QEMU when it forks, so the guest
// crashed. Here QEMU never spawns anything: the tool hands QEMU the write end
// of a pipe (QMP "getfd" through libvirt, which needs a local UNIX-socket
// connection), migrates to "fd:<name>", and gzips the stream itself.
//
// Lifecycle:
//
//	d, err := Start(ctx, dom, opts) // migrate; on success the guest is paused (postmigrate)
//	defer d.Close()                 // safety net: resumes and discards if not done yet
//	... take the disk snapshot while the guest is paused ...
//	d.Resume()                      // resume before any copying
//	d.Commit() or d.Discard()       // fsync + rename to the final name, or remove
//
// Start cleans up after itself on every failure: it cancels the migration if
// it runs, resumes the guest if the migration paused it, and removes the
// partial file. A partial stream never carries the final name: it is written
// to a hidden temporary name in the same directory and renamed by Commit.
package statedump

import (
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fi-backup/fi-backup/internal/virt"
)

// Monitor is what the dump needs of a domain; virt.Domain has it.
type Monitor interface {
	Name() string
	State() (virt.State, error)
	QMP(cmd string) (string, error)
	QMPWithFile(cmd string, f *os.File) (string, error)
	Resume() error
}

// Logger receives the dump's messages; *logging.Printer is one.
type Logger interface {
	Err(format string, a ...any)
	Verb(format string, a ...any)
	Debug(format string, a ...any)
}

// Defaults.
const (
	DefaultTimeout    = 10 * time.Minute
	DefaultCancelWait = 30 * time.Second
	DefaultPoll       = 20 * time.Millisecond
	// FDName is the name under which QEMU holds the pipe between "getfd"
	// and "migrate".
	FDName = "fi-backup-state"
)

// Options configure a dump.
type Options struct {
	// Path is the final file name, e.g. /dir/dom.statefile-<ts>.gz. A
	// relative path is resolved against the process's working directory.
	Path string
	// Timeout bounds the migration from "migrate" to "completed"
	// (DefaultTimeout when 0). A migration that does not converge in time
	// is cancelled.
	Timeout time.Duration
	// CancelWait bounds the wait for QEMU to confirm a cancel, and for the
	// end of the stream after "completed" (DefaultCancelWait when 0).
	CancelWait time.Duration
	// Poll is the longest interval between two query-migrate calls; the
	// first polls come faster (DefaultPoll when 0).
	Poll time.Duration
	// Bandwidth, when > 0, sets QEMU's migration max-bandwidth (bytes/s)
	// for this dump and restores the previous value afterwards. It exists
	// for tests that need a slow dump.
	Bandwidth int64
	// Level is the gzip level (gzip.BestSpeed when 0).
	Level int
	Log   Logger

	// writer wraps the state file for the pump (tests make it fail).
	writer func(*os.File) io.Writer
}

func (o Options) withDefaults() Options {
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.CancelWait <= 0 {
		o.CancelWait = DefaultCancelWait
	}
	if o.Poll <= 0 {
		o.Poll = DefaultPoll
	}
	if o.Level == 0 {
		o.Level = gzip.BestSpeed
	}
	if o.Log == nil {
		o.Log = nopLogger{}
	}
	if o.writer == nil {
		o.writer = func(f *os.File) io.Writer { return f }
	}
	return o
}

type nopLogger struct{}

func (nopLogger) Err(string, ...any)   {}
func (nopLogger) Verb(string, ...any)  {}
func (nopLogger) Debug(string, ...any) {}

// Dump is a completed migration stream whose guest is paused. It is not
// safe for concurrent use.
type Dump struct {
	m    Monitor
	opt  Options
	log  Logger
	name string

	path string // final name
	tmp  string // temporary name while not committed
	f    *os.File

	oldBandwidth int64 // max-bandwidth to restore, when Bandwidth was set
	setBandwidth bool

	pausedAt time.Time // when the guest stopped (see Pause)
	raw      int64
	downtime time.Duration
	total    time.Duration

	resumed  bool
	pause    time.Duration
	finished bool // committed or discarded
}

// Path is the state file's final name.
func (d *Dump) Path() string { return d.path }

// RawSize is the size of the (uncompressed) migration stream.
func (d *Dump) RawSize() int64 { return d.raw }

// Downtime is QEMU's own measure of the stop-and-copy phase.
func (d *Dump) Downtime() time.Duration { return d.downtime }

// MigrationTime is the migration's total time as QEMU reports it.
func (d *Dump) MigrationTime() time.Duration { return d.total }

// Pause is how long the guest was paused: from the moment QEMU stopped its
// vCPUs for the final stop-and-copy phase (the moment we saw "completed"
// minus QEMU's reported downtime) until Resume returned. It covers QEMU's
// downtime, our polling latency, the end of the stream, whatever the caller
// did while paused (the disk snapshot) and the resume. Zero before Resume.
func (d *Dump) Pause() time.Duration { return d.pause }

// Start dumps the state of the running domain m into a temporary file next
// to opt.Path. On success the stream is complete and the guest is paused
// (QEMU's postmigrate state); the caller must call Resume and then Commit or
// Discard (Close does whatever is left). On failure the cause has been
// logged with Err, the guest runs (it was resumed if the dump paused it),
// no file is left behind, and the error is returned.
func Start(ctx context.Context, m Monitor, opt Options) (*Dump, error) {
	opt = opt.withDefaults()
	d := &Dump{m: m, opt: opt, log: opt.Log, name: m.Name()}
	fail := func(format string, a ...any) (*Dump, error) {
		err := fmt.Errorf(format, a...)
		d.log.Err("Failed to dump the state of '%s': %v", d.name, err)
		d.discard()
		return nil, err
	}
	if ctx.Err() != nil {
		return fail("%v", interrupted(ctx))
	}
	p, err := filepath.Abs(opt.Path)
	if err != nil {
		return fail("cannot resolve '%s': %v", opt.Path, err)
	}
	d.path = p
	st, err := m.State()
	if err != nil {
		return fail("cannot read the domain state: %s", virt.Describe(err))
	}
	if st != virt.StateRunning && st != virt.StateBlocked {
		// A guest paused by someone else stays as it was: the dump would
		// have to resume it (or leave it paused for ever, as the old tool
		// could).
		return fail("the domain is %s, not running", st)
	}
	if mig, err := queryMigrate(m); err != nil {
		return fail("cannot query QEMU's migration state: %v", err)
	} else if !mig.Terminal() {
		return fail("a migration of the domain is already running (status %q)", mig.Status)
	}
	dir := filepath.Dir(d.path)
	d.sweepStale(dir)
	f, err := os.CreateTemp(dir, "."+filepath.Base(d.path)+".part-*")
	if err != nil {
		return fail("cannot create the state file in '%s': %v", dir, unwrapPath(err))
	}
	d.f, d.tmp = f, f.Name()
	// The old tool's progress lines, at the matching moments.
	d.log.Debug("Waiting for dump file '%s' to be created", d.path)
	d.log.Debug("Dump file '%s' created", d.path)
	r, w, err := os.Pipe()
	if err != nil {
		return fail("cannot create a pipe: %v", err)
	}
	growPipe(r)
	if opt.Bandwidth > 0 {
		if err := d.limitBandwidth(opt.Bandwidth); err != nil {
			_ = r.Close()
			_ = w.Close()
			return fail("cannot set the migration bandwidth: %v", err)
		}
	}
	d.log.Debug("Dumping the state of '%s' through a pipe (QMP getfd + migrate to fd:%s) into '%s'", d.name, FDName, d.tmp)
	reply, err := m.QMPWithFile(command("getfd", map[string]string{"fdname": FDName}), w)
	_ = w.Close() // QEMU holds its own copy now; EOF comes when QEMU closes it
	if err == nil {
		_, err = ParseReply(reply)
	}
	if err != nil {
		_ = r.Close()
		d.restoreBandwidth()
		return fail("cannot pass the state pipe to QEMU: %s", virt.Describe(err))
	}
	pm, err := startPump(r, opt.writer(f), opt.Level)
	if err != nil {
		_ = r.Close()
		d.closeFD()
		d.restoreBandwidth()
		return fail("cannot start compression: %v", err)
	}
	started := time.Now()
	reply, err = m.QMP(command("migrate", map[string]string{"uri": "fd:" + FDName}))
	if err == nil {
		_, err = ParseReply(reply)
	}
	if err != nil {
		// QEMU keeps the named descriptor when migrate did not take it.
		d.closeFD()
		return d.abort(r, pm, fmt.Errorf("QEMU refused the migration: %s", virt.Describe(err)))
	}
	d.log.Debug("Waiting for '%s' to be paused", d.name)
	mig, err := d.wait(ctx, pm, started)
	if err != nil {
		return d.abort(r, pm, err)
	}
	d.log.Debug("Domain paused!")
	completedAt := time.Now()
	d.pausedAt = completedAt
	if mig.Downtime != nil && *mig.Downtime >= 0 {
		d.downtime = time.Duration(*mig.Downtime) * time.Millisecond
		d.pausedAt = completedAt.Add(-d.downtime)
	}
	if mig.TotalTime != nil {
		d.total = time.Duration(*mig.TotalTime) * time.Millisecond
	}
	// QEMU closes its end right after "completed": wait for the pump to
	// read the end of the stream and finish the gzip member.
	endWait := time.NewTimer(opt.CancelWait)
	defer endWait.Stop()
	select {
	case <-pm.done:
	case <-ctx.Done():
		return d.abort(r, pm, interrupted(ctx))
	case <-endWait.C:
		return d.abort(r, pm, errors.New("QEMU did not close the state stream after the migration completed"))
	}
	_ = r.Close()
	if err := pm.Err(); err != nil {
		return d.abort(r, pm, fmt.Errorf("cannot write the state file: %v", unwrapPath(err)))
	}
	raw, eof, head, readErr := pm.result()
	switch {
	case readErr != nil:
		return d.abort(r, pm, fmt.Errorf("cannot read the state stream: %v", readErr))
	case !eof:
		return d.abort(r, pm, errors.New("the state stream ended early"))
	case string(head) != string(streamMagic):
		return d.abort(r, pm, fmt.Errorf("the stream does not start with QEMU's migration header (got %q)", head))
	}
	d.raw = raw
	d.restoreBandwidth()
	d.log.Debug("Migration of '%s' completed in %s (QEMU: total %s, downtime %s); stream %d bytes",
		d.name, fmtDur(completedAt.Sub(started)), fmtDur(d.total), fmtDur(d.downtime), raw)
	return d, nil
}

// wait polls query-migrate until the migration completes, fails, times out
// or ctx is cancelled, or the state file cannot be written.
func (d *Dump) wait(ctx context.Context, pm *pump, started time.Time) (Migration, error) {
	deadline := time.NewTimer(d.opt.Timeout)
	defer deadline.Stop()
	interval := time.Millisecond
	tick := time.NewTimer(interval)
	defer tick.Stop()
	last := ""
	for {
		select {
		case <-ctx.Done():
			return Migration{}, interrupted(ctx)
		case <-deadline.C:
			return Migration{}, fmt.Errorf("the migration did not complete within %s", d.opt.Timeout)
		case <-pm.failed:
			return Migration{}, fmt.Errorf("cannot write the state file: %v", unwrapPath(pm.Err()))
		case <-tick.C:
		}
		mig, err := queryMigrate(d.m)
		if err != nil {
			return Migration{}, fmt.Errorf("cannot query the migration: %v", err)
		}
		if mig.Status != last {
			last = mig.Status
			d.log.Debug("Migration status of '%s' after %s: %s", d.name, fmtDur(time.Since(started)), mig.Status)
		}
		switch mig.Status {
		case "completed":
			return mig, nil
		case "failed":
			desc := mig.ErrorDesc
			if desc == "" {
				desc = "no reason given"
			}
			return Migration{}, fmt.Errorf("the migration failed: %s", desc)
		case "cancelling", "cancelled":
			return Migration{}, errors.New("the migration was cancelled by someone else")
		case "none":
			return Migration{}, errors.New("QEMU reports no migration")
		}
		interval = min(interval*2, d.opt.Poll)
		tick.Reset(interval)
	}
}

// abort is every failure path once the state pipe exists: log the cause,
// stop the migration, close the pipe, resume the guest if the migration
// paused it, remove the partial file.
func (d *Dump) abort(r *os.File, pm *pump, cause error) (*Dump, error) {
	d.log.Err("Failed to dump the state of '%s': %v", d.name, cause)
	d.cancelMigration()
	// A QEMU still writing now gets EPIPE and fails the migration; the
	// pump's blocked Read returns.
	_ = r.Close()
	<-pm.done
	d.restoreBandwidth()
	_ = d.resume()
	d.discard()
	return nil, cause
}

// cancelMigration sends migrate_cancel unless the migration has ended and
// waits (bounded) for QEMU to confirm.
func (d *Dump) cancelMigration() {
	mig, err := queryMigrate(d.m)
	if err == nil && mig.Terminal() {
		return
	}
	d.log.Debug("Cancelling the migration of '%s'", d.name)
	if reply, err := d.m.QMP(command("migrate_cancel", nil)); err != nil {
		d.log.Debug("migrate_cancel: %s", virt.Describe(err))
	} else if _, err := ParseReply(reply); err != nil {
		d.log.Debug("migrate_cancel: %v", err)
	}
	stop := time.Now().Add(d.opt.CancelWait)
	for time.Now().Before(stop) {
		mig, err := queryMigrate(d.m)
		if err == nil && mig.Terminal() {
			d.log.Debug("Migration of '%s' ended: %s", d.name, mig.Status)
			return
		}
		if err != nil && !alive(d.m) {
			return // QEMU is gone: nothing left to cancel
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.log.Err("QEMU did not confirm the cancel of the migration of '%s' within %s: closing the stream", d.name, d.opt.CancelWait)
}

// closeFD drops the descriptor QEMU holds under FDName (best effort).
func (d *Dump) closeFD() {
	_, _ = d.m.QMP(command("closefd", map[string]string{"fdname": FDName}))
}

// Resume resumes the guest if it is paused and reports the pause. It is
// idempotent: later calls return the first result's pause.
func (d *Dump) Resume() (time.Duration, error) {
	if d.resumed {
		return d.pause, nil
	}
	err := d.resume()
	return d.pause, err
}

func (d *Dump) resume() error {
	st, err := d.m.State()
	if err != nil {
		d.log.Err("Problem resuming domain '%s'", d.name)
		d.log.Err("Cannot read the state of '%s': %s", d.name, virt.Describe(err))
		return err
	}
	switch st {
	case virt.StatePaused:
	case virt.StateRunning, virt.StateBlocked:
		d.resumed = true
		d.log.Debug("Domain '%s' is %s: nothing to resume", d.name, st)
		return nil
	default:
		// Not our doing as far as we can tell, but say it loudly: the
		// guest was running when the dump started.
		d.resumed = true
		d.log.Err("Domain '%s' is %s after the state dump", d.name, st)
		return fmt.Errorf("domain is %s", st)
	}
	d.log.Debug("Resuming domain")
	if err := d.m.Resume(); err != nil {
		// QEMU restarts the guest itself after a failed or cancelled
		// migration; a resume racing with that fails harmlessly.
		if st2, err2 := d.m.State(); err2 != nil || st2 != virt.StateRunning {
			d.log.Err("Problem resuming domain '%s'", d.name)
			d.log.Err("%s", virt.Describe(err))
			return err
		}
	}
	now := time.Now()
	d.resumed = true
	d.log.Verb("Domain resumed")
	if !d.pausedAt.IsZero() {
		d.pause = now.Sub(d.pausedAt)
		d.log.Verb("Domain '%s' was paused for %s", d.name, fmtDur(d.pause))
	}
	return nil
}

// Commit makes the state file durable under its final name: fsync, rename
// (never over an existing file), fsync the directory. On failure the
// temporary file is removed.
func (d *Dump) Commit() error {
	if d.finished {
		return errors.New("state file already committed or discarded")
	}
	err := d.f.Sync()
	if cerr := d.f.Close(); err == nil {
		err = cerr
	}
	d.f = nil
	if err != nil {
		d.discard()
		return fmt.Errorf("cannot write the state file: %v", unwrapPath(err))
	}
	if err := renameNoReplace(d.tmp, d.path); err != nil {
		d.discard()
		return fmt.Errorf("cannot rename the state file to '%s': %v", d.path, err)
	}
	d.finished = true
	if err := syncDir(filepath.Dir(d.path)); err != nil {
		return fmt.Errorf("cannot sync directory '%s': %v", filepath.Dir(d.path), err)
	}
	return nil
}

// Discard removes the state file (a dump no disk snapshot matches).
func (d *Dump) Discard() { d.discard() }

func (d *Dump) discard() {
	if d.finished {
		return
	}
	d.finished = true
	if d.f != nil {
		_ = d.f.Close()
		d.f = nil
	}
	if d.tmp != "" {
		if err := os.Remove(d.tmp); err == nil {
			d.log.Debug("Removed temporary state file '%s'", d.tmp)
		} else if !errors.Is(err, os.ErrNotExist) {
			d.log.Err("Cannot remove partial state file '%s': %v", d.tmp, unwrapPath(err))
		}
	}
}

// Close resumes the guest and discards the file unless that was done
// already. Use it in a defer right after Start.
func (d *Dump) Close() {
	if d == nil {
		return
	}
	if !d.resumed {
		_ = d.resume()
	}
	d.discard()
}

func (d *Dump) limitBandwidth(bw int64) error {
	reply, err := d.m.QMP(command("query-migrate-parameters", nil))
	if err != nil {
		return errors.New(virt.Describe(err))
	}
	ret, err := ParseReply(reply)
	if err != nil {
		return err
	}
	var params struct {
		MaxBandwidth *int64 `json:"max-bandwidth"`
	}
	if err := json.Unmarshal(ret, &params); err != nil || params.MaxBandwidth == nil {
		return fmt.Errorf("query-migrate-parameters has no max-bandwidth: %s", shorten(string(ret)))
	}
	if err := d.setMaxBandwidth(bw); err != nil {
		return err
	}
	d.oldBandwidth, d.setBandwidth = *params.MaxBandwidth, true
	d.log.Debug("Migration max-bandwidth of '%s' set to %d bytes/s (was %d)", d.name, bw, d.oldBandwidth)
	return nil
}

func (d *Dump) restoreBandwidth() {
	if !d.setBandwidth {
		return
	}
	d.setBandwidth = false
	if err := d.setMaxBandwidth(d.oldBandwidth); err != nil {
		d.log.Debug("Cannot restore the migration max-bandwidth of '%s': %v", d.name, err)
	}
}

func (d *Dump) setMaxBandwidth(bw int64) error {
	reply, err := d.m.QMP(command("migrate-set-parameters", map[string]int64{"max-bandwidth": bw}))
	if err != nil {
		return errors.New(virt.Describe(err))
	}
	_, err = ParseReply(reply)
	return err
}

// staleRE matches the temporary names of this domain's earlier dumps; the
// caller holds the domain's lock, so nobody else writes them.
var staleRE = regexp.MustCompile(`^[0-9]{8}-[0-9]{6}\.gz\.part-[0-9]+$`)

func (d *Dump) sweepStale(dir string) {
	prefix := "." + d.name + ".statefile-"
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		n := e.Name()
		if !strings.HasPrefix(n, prefix) || !staleRE.MatchString(n[len(prefix):]) || !e.Type().IsRegular() {
			continue
		}
		p := filepath.Join(dir, n)
		if err := os.Remove(p); err == nil {
			d.log.Debug("Removed '%s' left by an interrupted state dump", p)
		}
	}
}

// alive reports whether the domain still has a QEMU process.
func alive(m Monitor) bool {
	st, err := m.State()
	return err == nil && (st == virt.StateRunning || st == virt.StateBlocked || st == virt.StatePaused)
}

func queryMigrate(m Monitor) (Migration, error) {
	reply, err := m.QMP(command("query-migrate", nil))
	if err != nil {
		return Migration{}, errors.New(virt.Describe(err))
	}
	return ParseMigration(reply)
}

// interrupted is why ctx ended: a cause given to it explains itself (the
// command line's says "interrupted by SIGTERM"); a plain cancel or deadline
// is said as such.
func interrupted(ctx context.Context) error {
	c := context.Cause(ctx)
	switch {
	case c == nil || errors.Is(c, context.Canceled):
		return errors.New("interrupted")
	case errors.Is(c, context.DeadlineExceeded):
		return fmt.Errorf("interrupted (%w)", c)
	}
	return c
}

// renameNoReplace renames without replacing an existing file (a state file
// of another run in the same second stays as it is).
func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// File system without RENAME_NOREPLACE: link (fails on an existing
		// name) then unlink.
		if err = os.Link(from, to); err == nil {
			return os.Remove(from)
		}
		return unwrapPath(err)
	}
	if errors.Is(err, unix.EEXIST) {
		return errors.New("the file already exists")
	}
	return err
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// unwrapPath drops the "op path:" prefix of *PathError/*LinkError, whose
// path the message around it already names.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	var le *os.LinkError
	if errors.As(err, &le) {
		return le.Err
	}
	return err
}

func fmtDur(d time.Duration) string {
	return strconv.FormatFloat(d.Seconds(), 'f', 3, 64) + "s"
}
