package backup

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/fi-backup/fi-backup/internal/statedump"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// Environment knobs of the -s state dump.
const (
	// envDumpTimeout bounds the migration (a Go duration such as "90s";
	// default statedump.DefaultTimeout). A guest dirtying RAM faster than
	// it can be written never converges: it is cancelled and resumed.
	envDumpTimeout = "FI_BACKUP_DUMP_TIMEOUT"
	// envDumpBandwidth is for tests only: QEMU's migration max-bandwidth
	// in bytes/s during the dump, to make a dump slow enough to interrupt.
	envDumpBandwidth = "FI_BACKUP_TEST_DUMP_BANDWIDTH"
)

// stateFile is the old name: "<dir>/<domain>.statefile-<ts>.gz". A relative
// dir is resolved against the tool's working directory (B21: the old tool
// let QEMU resolve it against QEMU's own).
func stateFile(dir, domain string, ts time.Time) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return filepath.Join(abs, domain+".statefile-"+ts.Format(virt.TimestampLayout)+".gz"), nil
}

// startDump runs the -s dump. On success the guest is paused and the caller
// must finish it with finishDump; on failure everything is cleaned up and
// reported ("[ERR] Domain state dump failed!" last).
func (r *Runner) startDump(ctx context.Context, dom virt.Domain, ts time.Time) (*statedump.Dump, error) {
	name := dom.Name()
	r.P.Verb("Dumping domain state")
	path, err := stateFile(r.DumpDir, name, ts)
	if err != nil {
		r.P.Err("Cannot resolve the dump state directory '%s': %v", r.DumpDir, err)
		r.P.Err("Domain state dump failed!")
		return nil, ErrFailed
	}
	r.P.Debug("Dumping the state of '%s' to '%s'", name, path)
	opt := statedump.Options{Path: path, Log: r.P}
	if v := os.Getenv(envDumpTimeout); v != "" {
		if d, err := time.ParseDuration(v); err == nil && d > 0 {
			opt.Timeout = d
		} else {
			r.P.Warn("Ignoring %s='%s': not a positive duration", envDumpTimeout, v)
		}
	}
	if v := os.Getenv(envDumpBandwidth); v != "" {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n > 0 {
			opt.Bandwidth = n
		} else {
			r.P.Warn("Ignoring %s='%s': not a positive number of bytes/s", envDumpBandwidth, v)
		}
	}
	// A run killed while the guest is paused (the dump leaves it paused
	// until the snapshot is taken) must not leave it paused for ever: the
	// journal tells the next run to resume it (recoverJobs, Offline).
	if err := r.writeJournal(jobJournal{Domain: name, Kind: journalDump}); err != nil {
		r.P.Err("Cannot write the journal of '%s': %v", name, err)
		r.P.Err("Domain state dump failed!")
		return nil, ErrFailed
	}
	d, err := statedump.Start(ctx, dom, opt)
	if err != nil {
		r.clearJournal(name) // Start resumed the guest
		r.P.Err("Domain state dump failed!")
		return nil, ErrFailed
	}
	return d, nil
}

// finishDump resumes the guest and then keeps the state file (the disk
// snapshot matching it exists) or removes it (keep false: no snapshot
// matches it). It reports failures itself.
func (r *Runner) finishDump(d *statedump.Dump, keep bool) error {
	_, resumeErr := d.Resume()
	if !keep {
		d.Discard()
		r.P.Verb("State dump discarded: no disk snapshot matches it")
		return resumeErr
	}
	if err := d.Commit(); err != nil {
		r.P.Err("Cannot save the state file: %v", err)
		r.P.Err("Domain state dump failed!")
		return ErrFailed
	}
	r.P.Debug("State of domain saved in '%s' (%d bytes of migration stream)", d.Path(), d.RawSize())
	if resumeErr != nil {
		return ErrFailed
	}
	return nil
}
