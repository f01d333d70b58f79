package virt

import (
	"fmt"

	"libvirt.org/go/libvirtxml"
)

// ParseDisks reads every <disk> of a domain XML document, with the backing
// chain from its <backingStore> elements. Paths are taken exactly as libvirt
// wrote them: spaces, quotes and backslashes survive (B16, B18, B19).
func ParseDisks(domainXML string) ([]Disk, error) {
	var def libvirtxml.Domain
	if err := def.Unmarshal(domainXML); err != nil {
		return nil, fmt.Errorf("parse domain XML: %w", err)
	}
	if def.Devices == nil {
		return nil, nil
	}
	disks := make([]Disk, 0, len(def.Devices.Disks))
	for _, d := range def.Devices.Disks {
		disks = append(disks, diskFromXML(d))
	}
	return disks, nil
}

func diskFromXML(d libvirtxml.DomainDisk) Disk {
	out := Disk{Device: d.Device, ReadOnly: d.ReadOnly != nil, Snapshot: d.Snapshot}
	if out.Device == "" {
		out.Device = "disk"
	}
	if d.Target != nil {
		out.Target = d.Target.Dev
	}
	if d.Alias != nil {
		out.Alias = d.Alias.Name
	}
	if d.Driver != nil {
		out.Format = d.Driver.Type
	}
	if d.Mirror != nil {
		out.Mirror = &Mirror{Job: d.Mirror.Job, Ready: d.Mirror.Ready}
		if d.Mirror.Source != nil && d.Mirror.Source.File != nil {
			out.Mirror.Source = d.Mirror.Source.File.File
		}
	}
	path, typ := sourcePath(d.Source)
	out.Type = typ
	out.Source = path
	if path == "" {
		return out
	}
	out.Chain = []Image{{Path: path, Format: out.Format}}
	for bs := d.BackingStore; ; bs = bs.BackingStore {
		if bs == nil {
			// No <backingStore> at all: libvirt did not probe (inactive XML).
			return out
		}
		// The terminator <backingStore/> decodes as a non-nil element whose
		// Source has no file.
		if bs.Source == nil || (bs.Source.File == nil && bs.Source.Block == nil && bs.Source.Network == nil && bs.Source.Volume == nil) {
			out.Complete = true
			return out
		}
		p, t := sourcePath(bs.Source)
		if p == "" {
			out.ChainErr = fmt.Errorf("backing store of type %q below %q is not a local file", t, out.Chain[len(out.Chain)-1].Path)
			return out
		}
		f := ""
		if bs.Format != nil {
			f = bs.Format.Type
		}
		out.Chain = append(out.Chain, Image{Path: p, Format: f})
	}
}

// FileDisks are the disks the old tool backed up and consolidated
// (`virsh domblklist --details` rows of device "disk"): device "disk" with a
// source path.
func FileDisks(disks []Disk) []Disk {
	var out []Disk
	for _, d := range disks {
		if d.Device == "disk" && d.Source != "" {
			out = append(out, d)
		}
	}
	return out
}

func sourcePath(s *libvirtxml.DomainDiskSource) (path, typ string) {
	switch {
	case s == nil:
		return "", "file"
	case s.File != nil:
		return s.File.File, "file"
	case s.Block != nil:
		return s.Block.Dev, "block"
	case s.Network != nil:
		return "", "network"
	case s.Volume != nil:
		return "", "volume"
	case s.Dir != nil:
		return "", "dir"
	}
	return "", "file"
}

// SnapshotXML is the <domainsnapshot> document for a name-only external
// snapshot, byte-identical to what virsh snapshot-create-as sends.
func SnapshotXML(name string) (string, error) {
	return (&libvirtxml.DomainSnapshot{Name: name}).Marshal()
}
