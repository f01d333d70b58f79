package restore

import (
	"fmt"
	"os"
	"path/filepath"

	"libvirt.org/go/libvirtxml"
)

// Rewrite turns a domain definition into the restored domain's: a new name
// (so that it is defined next to the original, never over it), no UUID
// (libvirt makes one), each restored disk (by target) on its flattened file
// with no backing store, the NVRAM on its restored copy, and serial or
// console output that went to a file going to a file of its own in logDir
// (never into the original's log, nor into a directory that may be gone).
// Everything else is kept as it is; files it names that do not exist (a
// direct-boot kernel, a firmware, an ISO, a disk that was not backed up)
// are reported in the warnings.
func Rewrite(def, name string, disks map[string]string, nvram, logDir string) (string, []string, error) {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(def); err != nil {
		return "", nil, err
	}
	var warnings []string
	missing := func(path, what string) {
		if path == "" {
			return
		}
		if _, err := os.Stat(path); err != nil {
			warnings = append(warnings, fmt.Sprintf("'%s' (%s in the definition) does not exist: the restored domain needs it to start", path, what))
		}
	}
	dom.Name, dom.UUID = name, ""
	if dom.OS != nil {
		if nvram != "" && dom.OS.NVRam != nil {
			dom.OS.NVRam.NVRam = nvram
		}
		missing(dom.OS.Kernel, "the kernel")
		missing(dom.OS.Initrd, "the initrd")
		if dom.OS.Loader != nil {
			missing(dom.OS.Loader.Path, "the firmware")
		}
	}
	if dom.Devices != nil {
		for i := range dom.Devices.Disks {
			d := &dom.Devices.Disks[i]
			tgt := ""
			if d.Target != nil {
				tgt = d.Target.Dev
			}
			if file, ok := disks[tgt]; ok {
				d.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: file}}
				if d.Driver == nil {
					d.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu"}
				}
				d.Driver.Type = "qcow2"
				d.BackingStore = nil
				continue
			}
			if d.Source != nil && d.Source.File != nil {
				missing(d.Source.File.File, "disk '"+tgt+"', not restored")
			}
		}
	}
	if dom.Devices != nil && logDir != "" {
		logs := map[string]string{}
		relog := func(src *libvirtxml.DomainChardevSource) {
			if src == nil || src.File == nil || src.File.Path == "" {
				return
			}
			p, ok := logs[src.File.Path]
			if !ok {
				p = filepath.Join(logDir, fmt.Sprintf("%s.console%d.log", name, len(logs)))
				logs[src.File.Path] = p
			}
			src.File.Path = p
		}
		for i := range dom.Devices.Serials {
			relog(dom.Devices.Serials[i].Source)
		}
		for i := range dom.Devices.Consoles {
			relog(dom.Devices.Consoles[i].Source)
		}
	}
	x, err := dom.Marshal()
	return x, warnings, err
}
