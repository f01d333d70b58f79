package backup

import (
	"context"
	"path/filepath"
	"strings"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/report"
	"github.com/fi-backup/fi-backup/internal/snapshot"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// copied is what one disk's copy left in the backup directory.
type copied struct {
	disk  virt.Disk
	top   virt.Image       // the layer that holds the moment (host)
	chain []virt.Image     // host chain from top down
	files []backupdir.File // its copies, top first
}

// record writes the restore point's manifest, definition and NVRAM copy:
// last, after every copy is durable, so that a manifest only ever stands
// for a complete restore point.
func (r *Runner) record(ctx context.Context, dom virt.Domain, at time.Time, method string, all []virt.Disk, disks []copied, stateFile string) error {
	name := dom.Name()
	moment := at.Format(snapshot.TimestampLayout)
	m := &backupdir.Manifest{
		Schema: backupdir.ManifestSchema, Tool: r.tool, Domain: name,
		Moment: moment, Time: at.Format(time.RFC3339), Method: method,
		Quiesced: r.cfg.Quiesce && method != backupdir.MethodOffline,
	}
	if u, err := dom.UUID(); err == nil {
		m.UUID = u
	}
	if stateFile != "" {
		m.StateFile = stateFile
		if rel, err := filepath.Rel(r.dir.Path, stateFile); err == nil && !strings.HasPrefix(rel, "..") {
			m.StateFile = rel
		}
	}
	byTarget := map[string]copied{}
	for _, c := range disks {
		byTarget[c.disk.Target] = c
	}
	for _, d := range all {
		md := backupdir.Disk{Target: d.Target, Device: d.Device, Source: d.Source}
		if c, ok := byTarget[d.Target]; ok {
			md.BackedUp, md.Source, md.Chain = true, c.top.Path, c.files
			md.Name = snapshot.DiskName(c.chain)
		} else {
			md.Reason = notBackedUp(d)
		}
		m.Disks = append(m.Disks, md)
	}
	def, err := dom.Definition()
	if err != nil {
		r.p.Err("Cannot read the definition of '%s': %s", name, virt.Describe(err))
		return ErrFailed
	}
	if m.XML, err = r.dir.SaveDefinition(name, moment, def); err != nil {
		r.p.Err("Cannot save the definition of '%s': %v", name, err)
		return ErrFailed
	}
	if nv := nvramOf(def); nv != "" {
		if m.NVRAM, err = r.dir.SaveNVRAM(ctx, name, moment, nv); err != nil {
			r.p.Err("Cannot save the NVRAM of '%s' ('%s'): %v", name, nv, err)
			return ErrFailed
		}
	}
	if err := r.dir.WriteManifest(m); err != nil {
		r.p.Err("Cannot write the manifest of '%s' at %s: %v", name, moment, err)
		return ErrFailed
	}
	r.p.Debug("Restore point %s of '%s' recorded in '%s'", moment, name, r.dir.MetaPath(name, moment, ".json"))
	r.note(func(d *report.Domain) { d.Moment = moment })
	return nil
}

// notBackedUp says why a disk is not part of a restore point.
func notBackedUp(d virt.Disk) string {
	switch {
	case d.Device != "disk":
		return d.Device
	case d.Source == "":
		return "no local file (" + d.Type + ")"
	case d.Snapshot == "no":
		return "snapshot='no'"
	case d.ReadOnly:
		return "read-only"
	}
	return "not backed up"
}

// nvramOf is the UEFI variable store a definition names, if any.
func nvramOf(def string) string {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(def); err != nil || dom.OS == nil || dom.OS.NVRam == nil {
		return ""
	}
	return dom.OS.NVRam.NVRam
}
