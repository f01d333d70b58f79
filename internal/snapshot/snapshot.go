// Package snapshot takes the backup's snapshot: one atomic, external,
// disk-only, metadata-less libvirt snapshot of every disk of a running
// domain, named bimg-YYYYMMDD-HHMMSS, with the guest's file systems frozen
// through its agent on request (-q). It also owns the overlay naming rule
// (libvirt's, which the old tool relied on) and the checks that must pass
// before a snapshot is taken, because a refused run must not leave an
// overlay behind.
//
//	before:  vm.qcow2 (active)
//	after:   vm.qcow2 ◄── vm.bimg-T (active, new; vm.qcow2 is now read-only)
package snapshot

import (
	"errors"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// TimestampLayout is the old tool's `date +%Y%m%d-%H%M%S` (local time).
const TimestampLayout = "20060102-150405"

// Name is the snapshot name of a run at t: "bimg-" plus the timestamp.
func Name(t time.Time) string { return "bimg-" + t.Format(TimestampLayout) }

// OverlayName is libvirt's rule for naming an external snapshot file:
// drop the last ".ext" of the path when it is in the final component, then
// append "." and the snapshot name.
func OverlayName(src, snapshot string) string {
	p := src
	if i := strings.LastIndexByte(p, '.'); i >= 0 && !strings.Contains(p[i:], "/") {
		p = p[:i]
	}
	return p + "." + snapshot
}

var overlayRE = regexp.MustCompile(`\.bimg-[0-9]{8}-[0-9]{6}$`)

// IsOverlay reports whether path carries this tool's overlay name.
func IsOverlay(path string) bool { return overlayRE.MatchString(path) }

// Domain is what the snapshot needs of a domain; virt.Domain has it.
type Domain interface {
	Name() string
	Disks() ([]virt.Disk, error)
	Snapshot(spec virt.SnapshotSpec) error
}

// Plan returns the domain's disks the backup copies (file disks, as the
// old tool's domblklist filter chose them), after checking that libvirt
// reports the whole backing chain of each: a chain that cannot be copied
// must fail the run before the snapshot, not after it. Problems are
// reported on p.
func Plan(p *logging.Printer, dom Domain) ([]virt.Disk, error) {
	all, err := dom.Disks()
	if err != nil {
		p.Err("Cannot read the disks of '%s': %s", dom.Name(), virt.Describe(err))
		return nil, ErrRefused
	}
	disks := virt.FileDisks(all)
	for _, d := range disks {
		if err := Complete(d); err != nil {
			p.Err("Cannot back up disk '%s' of '%s': %v", d.Target, dom.Name(), err)
			return nil, ErrRefused
		}
	}
	return disks, nil
}

// Complete reports why a disk's chain, as libvirt describes it, cannot be
// copied; nil when it can.
func Complete(d virt.Disk) error {
	switch {
	case d.ChainErr != nil:
		return d.ChainErr
	case !d.Complete:
		return errors.New("libvirt does not report its backing chain")
	}
	return nil
}

// ErrRefused means the snapshot (or its preparation) failed; the reason has
// been reported.
var ErrRefused = errors.New("snapshot refused")

// Take takes the snapshot named name of every disk of dom, atomically (all
// disks or none), printing the old tool's lines; quiesce freezes the guest's
// file systems through qemu-guest-agent for the moment of the snapshot.
func Take(p *logging.Printer, dom Domain, name string, quiesce bool) error {
	q := ""
	if quiesce {
		p.Debug("Quiesce requested")
		q = " --quiesce"
	}
	// The virsh command that does the same (no virsh is run).
	p.Verb("/usr/bin/virsh -q snapshot-create-as %s %s --no-metadata --disk-only --atomic%s", dom.Name(), name, q)
	if err := dom.Snapshot(virt.SnapshotSpec{Name: name, Quiesce: quiesce}); err != nil {
		p.Err("Snapshot for '%s' failed! %s", dom.Name(), virt.Describe(err))
		switch {
		case errors.Is(err, virt.ErrPermission):
			p.Err("Check apparmor status or check if running with sufficient permissions")
		case errors.Is(err, virt.ErrNameCollision):
			p.Err("Two disks of '%s' would get the same overlay name (e.g. disk.img and disk.qcow2 in one directory): rename one of the images", dom.Name())
		case errors.Is(err, virt.ErrNotLocalFile):
			p.Err("Disks that are not local files (block devices, network disks) must carry snapshot='no' in the definition of '%s' to be left out of the snapshot", dom.Name())
		}
		return ErrRefused
	}
	p.Verb("Snapshot for block devices of '%s' successful", dom.Name())
	return nil
}

// DiskName is the file name a restore gives a disk whose chain (top first)
// is chain: the disk's own image, i.e. the first file below this tool's
// overlays (a generation's suffix dropped), or the bottom one when every
// file is an overlay.
func DiskName(chain []virt.Image) string {
	if len(chain) == 0 {
		return ""
	}
	name := chain[len(chain)-1].Path
	for _, img := range chain {
		if !IsOverlay(img.Path) {
			name = img.Path
			break
		}
	}
	base := filepath.Base(name)
	if i := strings.Index(base, ".gen-"); i > 0 {
		base = base[:i]
	}
	return base
}
