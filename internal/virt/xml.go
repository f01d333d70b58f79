package virt

import (
	"fmt"
	"strings"

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

// PointDisk edits a domain definition so that the disk with the given
// target runs on source (of format): its <source file>, its driver type,
// and no <backingStore> (libvirt reads the chain from the image headers
// when the domain starts). Everything else goes through libvirtxml
// unchanged; DiffOutside checks that afterwards against libvirt's own text.
func PointDisk(domainXML, target, source, format string) (string, error) {
	var def libvirtxml.Domain
	if err := def.Unmarshal(domainXML); err != nil {
		return "", fmt.Errorf("parse domain XML: %w", err)
	}
	if def.Devices != nil {
		for i := range def.Devices.Disks {
			d := &def.Devices.Disks[i]
			if d.Target == nil || d.Target.Dev != target {
				continue
			}
			if d.Source == nil || d.Source.File == nil {
				return "", fmt.Errorf("disk %s is not a file", target)
			}
			d.Source.File.File = source
			if format != "" {
				if d.Driver == nil {
					d.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu"}
				}
				d.Driver.Type = format
			}
			d.BackingStore = nil
			return def.Marshal()
		}
	}
	return "", fmt.Errorf("no disk %s in the definition", target)
}

// DiffOutside compares two domain definitions as libvirt writes them,
// leaving out the <disk> element of target in each: "" when they are the
// same, else the first line that differs.
func DiffOutside(a, b, target string) string {
	la, lb := strings.Split(withoutDisk(a, target), "\n"), strings.Split(withoutDisk(b, target), "\n")
	for i := 0; i < len(la) || i < len(lb); i++ {
		var x, y string
		if i < len(la) {
			x = la[i]
		}
		if i < len(lb) {
			y = lb[i]
		}
		if x != y {
			return fmt.Sprintf("%q became %q", strings.TrimSpace(x), strings.TrimSpace(y))
		}
	}
	return ""
}

// withoutDisk cuts the <disk>…</disk> element whose <target dev=…> is
// target out of libvirt's text (disks do not nest).
func withoutDisk(x, target string) string {
	var b strings.Builder
	for {
		i := strings.Index(x, "<disk ")
		if i < 0 {
			b.WriteString(x)
			return b.String()
		}
		j := strings.Index(x[i:], "</disk>")
		if j < 0 {
			b.WriteString(x)
			return b.String()
		}
		end := i + j + len("</disk>")
		elem := x[i:end]
		b.WriteString(x[:i])
		if !strings.Contains(elem, "<target dev='"+target+"'") && !strings.Contains(elem, `<target dev="`+target+`"`) {
			b.WriteString(elem)
		}
		x = x[end:]
	}
}

// BackupXML is the pair of documents virDomainBackupBegin takes for spec:
// the <domainbackup mode='push'> with every disk named (a disk left out of
// the backup says so: libvirt's default would back it up), and the
// <domaincheckpoint> created with it (a bitmap for the disks that asked for
// one, checkpoint='no' for every other).
func BackupXML(spec BackupSpec) (backupXML, checkpointXML string, err error) {
	push := &libvirtxml.DomainBackupPushDisks{}
	cps := &libvirtxml.DomainCheckpointDisks{}
	for _, d := range spec.Disks {
		pd := libvirtxml.DomainBackupPushDisk{Name: d.Target, Backup: "no"}
		if d.Path != "" {
			pd.Backup, pd.BackupMode = "yes", "full"
			if d.Incremental != "" {
				pd.BackupMode, pd.Incremental = "incremental", d.Incremental
			}
			pd.Driver = &libvirtxml.DomainBackupDiskDriver{Type: "qcow2"}
			pd.Target = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: d.Path}}
		}
		push.Disks = append(push.Disks, pd)
		cd := libvirtxml.DomainCheckpointDisk{Name: d.Target, Checkpoint: "no"}
		if d.Bitmap {
			cd.Checkpoint = "bitmap"
		}
		cps.Disks = append(cps.Disks, cd)
	}
	backupXML, err = (&libvirtxml.DomainBackup{Push: &libvirtxml.DomainBackupPush{Disks: push}}).Marshal()
	if err != nil {
		return "", "", fmt.Errorf("backup XML: %w", err)
	}
	checkpointXML, err = (&libvirtxml.DomainCheckpoint{Name: spec.Checkpoint, Disks: cps}).Marshal()
	if err != nil {
		return "", "", fmt.Errorf("checkpoint XML: %w", err)
	}
	return backupXML, checkpointXML, nil
}

// ParseBackupTargets lists the target files of a running backup job's
// <domainbackup> document (virDomainBackupGetXMLDesc).
func ParseBackupTargets(doc string) ([]string, error) {
	var b libvirtxml.DomainBackup
	if err := b.Unmarshal(doc); err != nil {
		return nil, fmt.Errorf("parse backup XML: %w", err)
	}
	var out []string
	if b.Push != nil && b.Push.Disks != nil {
		for _, d := range b.Push.Disks.Disks {
			if d.Target != nil && d.Target.File != nil && d.Target.File.File != "" {
				out = append(out, d.Target.File.File)
			}
		}
	}
	return out, nil
}

// ParseCheckpoint reads a <domaincheckpoint> document: its name and the
// disks it tracks with a bitmap.
func ParseCheckpoint(doc string) (Checkpoint, error) {
	var c libvirtxml.DomainCheckpoint
	if err := c.Unmarshal(doc); err != nil {
		return Checkpoint{}, fmt.Errorf("parse checkpoint XML: %w", err)
	}
	out := Checkpoint{Name: c.Name}
	if c.Disks != nil {
		for _, d := range c.Disks.Disks {
			if d.Checkpoint == "bitmap" {
				out.Bitmaps = append(out.Bitmaps, d.Name)
			}
			if d.Size > 0 {
				if out.Changed == nil {
					out.Changed = map[string]uint64{}
				}
				out.Changed[d.Name] = d.Size
			}
		}
	}
	return out, nil
}
