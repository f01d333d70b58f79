package backup

import (
	"context"
	"path/filepath"
	"time"

	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/report"
	"github.com/fi-backup/fi-backup/internal/snapshot"
	"github.com/fi-backup/fi-backup/internal/statedump"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// stateFile is the old name: "<dir>/<domain>.statefile-<ts>.gz". A relative
// dir is resolved against the tool's working directory (B21: the old tool
// let QEMU resolve it against QEMU's own).
func stateFile(dir, domain string, ts time.Time) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return filepath.Join(abs, domain+".statefile-"+ts.Format(snapshot.TimestampLayout)+".gz"), nil
}

// startDump runs the -s dump. On success the guest is paused and the caller
// must finish it with finishDump; on failure everything is cleaned up and
// reported ("[ERR] Domain state dump failed!" last).
func (r *Runner) startDump(ctx context.Context, dom virt.Domain, ts time.Time) (*statedump.Dump, error) {
	name := dom.Name()
	r.act(report.ActionDump)
	r.p.Verb("Dumping domain state")
	path, err := stateFile(r.cfg.DumpDir, name, ts)
	if err != nil {
		r.p.Err("Cannot resolve the dump state directory '%s': %v", r.cfg.DumpDir, err)
		r.p.Err("Domain state dump failed!")
		return nil, ErrFailed
	}
	r.p.Debug("Dumping the state of '%s' to '%s'", name, path)
	opt := statedump.Options{Path: path, Log: r.p, Timeout: r.cfg.DumpTimeout, Bandwidth: r.cfg.DumpBandwidth}
	// A run killed while the guest is paused (the dump leaves it paused
	// until the snapshot is taken) must not leave it paused for ever: the
	// journal tells the next run to resume it (recover).
	if err := r.journal.Write(journal.Record{Domain: name, Kind: kindDump}); err != nil {
		r.p.Err("Cannot write the journal of '%s': %v", name, err)
		r.p.Err("Domain state dump failed!")
		return nil, ErrFailed
	}
	d, err := statedump.Start(ctx, dom, opt)
	if err != nil {
		r.clearJournal(name) // Start resumed the guest
		r.p.Err("Domain state dump failed!")
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
		r.p.Verb("State dump discarded: no disk snapshot matches it")
		return resumeErr
	}
	if err := d.Commit(); err != nil {
		r.p.Err("Cannot save the state file: %v", err)
		r.p.Err("Domain state dump failed!")
		return ErrFailed
	}
	r.p.Debug("State of domain saved in '%s' (%d bytes of migration stream)", d.Path(), d.RawSize())
	if resumeErr != nil {
		return ErrFailed
	}
	return nil
}
