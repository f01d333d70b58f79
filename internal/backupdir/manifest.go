package backupdir

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/fi-backup/fi-backup/internal/snapshot"
)

// Every successful backup of a domain writes, last (after every copy is
// durable), the record of its restore point under
//
//	DIR/.fi-backup/<domain>/<moment>.json     the manifest (this file's types)
//	DIR/.fi-backup/<domain>/<moment>.sha256   the same checksums for sha256sum -c (run in DIR)
//	DIR/.fi-backup/<domain>/<moment>.xml      the domain's definition
//	DIR/.fi-backup/<domain>/<moment>.nvram    its UEFI variables, if it has any
//
// The flat disk copies stay exactly where the old tool put them; a manifest
// names the ones its restore point needs (relative to DIR, top first).

// MetaDir is the directory of the restore points' records, inside DIR.
const MetaDir = ".fi-backup"

// ManifestSchema is the version of the manifest format. Readers ignore
// fields they do not know; a schema newer than theirs is refused.
const ManifestSchema = 1

// Methods of making a restore point.
const (
	MethodSnapshot = "snapshot" // online: external disk-only snapshot, copy of the frozen chain
	MethodOffline  = "offline"  // shut-off (or paused) domain copied as it is
	MethodCBT      = "cbt"      // online: libvirt's backup API with checkpoints
)

// Manifest records one restore point.
type Manifest struct {
	Schema    int    `json:"schema"`
	Tool      string `json:"tool"`
	Domain    string `json:"domain"`
	UUID      string `json:"uuid,omitempty"`
	Moment    string `json:"moment"` // YYYYMMDD-HHMMSS, local time, as in the snapshot names
	Time      string `json:"time"`   // the moment in RFC 3339, with the offset
	Method    string `json:"method"`
	Quiesced  bool   `json:"quiesced"`
	StateFile string `json:"state_file,omitempty"` // -s: relative to DIR when inside it, else absolute
	XML       string `json:"xml,omitempty"`        // relative to DIR
	NVRAM     *File  `json:"nvram,omitempty"`
	Disks     []Disk `json:"disks"`
}

// Disk is one disk of a restore point.
type Disk struct {
	Target   string `json:"target"`           // vda, ...
	Device   string `json:"device"`           // disk, cdrom, ...
	Source   string `json:"source,omitempty"` // host path of the disk's image at the moment
	Name     string `json:"name,omitempty"`   // the file name a restore gives the disk
	BackedUp bool   `json:"backed_up"`
	Reason   string `json:"reason,omitempty"` // why it was not backed up
	Chain    []File `json:"chain,omitempty"`  // top first
}

// File is one file of the backup directory a restore point needs.
type File struct {
	Name        string `json:"file"` // relative to DIR
	Source      string `json:"source,omitempty"`
	Size        int64  `json:"size"`
	VirtualSize int64  `json:"virtual_size,omitempty"`
	Format      string `json:"format,omitempty"`
	SHA256      string `json:"sha256"`
	// Copied says this run copied the file (it was not up to date): a
	// file a run copied is part of that run's point, never a restore point
	// of its own, even when it is not the top of the chain (an offline
	// copy). Files of the old tool a run found up to date are not marked.
	Copied bool `json:"copied,omitempty"`
}

// When parses the manifest's moment.
func (m *Manifest) When() (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, m.Time); err == nil {
		return t, nil
	}
	return time.ParseInLocation(snapshot.TimestampLayout, m.Moment, time.Local)
}

// Files lists every backup file the manifest names (disk chains, NVRAM,
// definition), each once.
func (m *Manifest) Files() []string {
	seen := map[string]bool{}
	var out []string
	add := func(n string) {
		if n != "" && !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	for _, d := range m.Disks {
		for _, f := range d.Chain {
			add(f.Name)
		}
	}
	if m.NVRAM != nil {
		add(m.NVRAM.Name)
	}
	return out
}

// MetaPath is the path of a domain's record file for a moment and suffix.
func (d *Dir) MetaPath(domain, moment, suffix string) string {
	return filepath.Join(d.Path, MetaDir, domain, moment+suffix)
}

// MetaRel is the same path relative to DIR.
func MetaRel(domain, moment, suffix string) string {
	return filepath.Join(MetaDir, domain, moment+suffix)
}

// ReadManifest reads one manifest file.
func ReadManifest(path string) (*Manifest, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseManifest(b)
}

// ParseManifest parses a manifest; unknown fields are ignored, a newer
// schema is refused.
func ParseManifest(b []byte) (*Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("not a manifest: %w", err)
	}
	switch {
	case m.Schema < 1:
		return nil, errors.New("not a manifest: no schema")
	case m.Schema > ManifestSchema:
		return nil, fmt.Errorf("manifest schema %d is newer than this fi-backup's (%d)", m.Schema, ManifestSchema)
	case m.Domain == "" || m.Moment == "":
		return nil, errors.New("not a manifest: no domain or moment")
	}
	return &m, nil
}

// WriteManifest writes the manifest and its sha256sum file, each through a
// temporary file renamed into place; the JSON comes last, so a manifest
// exists only once everything it stands for does.
func (d *Dir) WriteManifest(m *Manifest) error {
	dir := filepath.Join(d.Path, MetaDir, m.Domain)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	var sums strings.Builder
	for _, d := range m.Disks {
		for _, f := range d.Chain {
			writeSum(&sums, f)
		}
	}
	if m.NVRAM != nil {
		writeSum(&sums, *m.NVRAM)
	}
	if err := writeAtomic(d.MetaPath(m.Domain, m.Moment, ".sha256"), []byte(sums.String())); err != nil {
		return err
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return writeAtomic(d.MetaPath(m.Domain, m.Moment, ".json"), append(b, '\n'))
}

func writeSum(b *strings.Builder, f File) {
	if f.SHA256 == "" || strings.Contains(b.String(), "  "+f.Name+"\n") {
		return
	}
	fmt.Fprintf(b, "%s  %s\n", f.SHA256, f.Name)
}

// writeAtomic writes data to path: temporary file, fsync, rename, fsync of
// the directory.
func writeAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(0o600)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// Manifests reads every manifest of a domain, oldest first. Files that are
// not manifests are reported through bad (path, error) and skipped.
func (d *Dir) Manifests(domain string, bad func(string, error)) []*Manifest {
	dir := filepath.Join(d.Path, MetaDir, domain)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []*Manifest
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		p := filepath.Join(dir, e.Name())
		m, err := ReadManifest(p)
		if err != nil {
			if bad != nil {
				bad(p, err)
			}
			continue
		}
		if m.Domain != domain || m.Moment+".json" != e.Name() {
			if bad != nil {
				bad(p, fmt.Errorf("it names domain '%s' at %s", m.Domain, m.Moment))
			}
			continue
		}
		out = append(out, m)
	}
	sortManifests(out)
	return out
}

func sortManifests(ms []*Manifest) {
	sort.SliceStable(ms, func(i, j int) bool {
		ti, ei := ms[i].When()
		tj, ej := ms[j].When()
		if ei == nil && ej == nil && !ti.Equal(tj) {
			return ti.Before(tj)
		}
		return ms[i].Moment < ms[j].Moment
	})
}

// ManifestDomains lists the domains that have a record directory in DIR.
func (d *Dir) ManifestDomains() []string {
	entries, err := os.ReadDir(filepath.Join(d.Path, MetaDir))
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out
}

// knownHash is the checksum a manifest recorded for a backup file of the
// given size, so that a file copied by an earlier run is not read again to
// be listed in this run's manifest. The newest manifest that names the file
// wins.
func (d *Dir) knownHash(name string, size int64) string {
	d.st().hashMu.Lock()
	defer d.st().hashMu.Unlock()
	if d.st().hashes == nil {
		d.st().hashes = map[string]File{}
		for _, dom := range d.ManifestDomains() {
			for _, m := range d.Manifests(dom, nil) { // oldest first: newer ones overwrite
				for _, disk := range m.Disks {
					for _, f := range disk.Chain {
						d.st().hashes[f.Name] = f
					}
				}
			}
		}
	}
	if f, ok := d.st().hashes[name]; ok && f.Size == size {
		return f.SHA256
	}
	return ""
}

// fileHash is the SHA-256 of a backup file: recorded by a manifest, or read.
func (d *Dir) fileHash(name string) (string, int64, error) {
	st, err := os.Stat(filepath.Join(d.Path, name))
	if err != nil {
		return "", 0, err
	}
	if h := d.knownHash(name, st.Size()); h != "" {
		return h, st.Size(), nil
	}
	h, err := hashFile(filepath.Join(d.Path, name))
	return h, st.Size(), err
}
