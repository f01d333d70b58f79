package backupdir

import (
	"context"
	"os"
	"path/filepath"

	"github.com/fi-backup/fi-backup/internal/copyfile"
)

// SaveDefinition writes a restore point's domain definition next to its
// manifest and returns its name relative to DIR. The file is 0600: the
// definition is taken with its secrets (a restore must recreate them), and
// the directory holds the guest's disks anyway.
func (d *Dir) SaveDefinition(domain, moment, xml string) (string, error) {
	if err := os.MkdirAll(filepath.Join(d.Path, MetaDir, domain), 0o700); err != nil {
		return "", err
	}
	if err := writeAtomic(d.MetaPath(domain, moment, ".xml"), []byte(xml)); err != nil {
		return "", err
	}
	return MetaRel(domain, moment, ".xml"), nil
}

// SaveNVRAM copies a domain's UEFI variable store next to its manifest
// (same copy engine as the disks) and returns what the manifest records.
func (d *Dir) SaveNVRAM(ctx context.Context, domain, moment, src string) (*File, error) {
	if err := os.MkdirAll(filepath.Join(d.Path, MetaDir, domain), 0o700); err != nil {
		return nil, err
	}
	dst := d.MetaPath(domain, moment, ".nvram")
	if _, err := copyfile.Copy(ctx, src, dst, copyfile.Options{Limit: d.Limit}); err != nil {
		return nil, err
	}
	st, err := os.Stat(dst)
	if err != nil {
		return nil, err
	}
	sum, err := copyfile.HashFile(dst)
	if err != nil {
		return nil, err
	}
	return &File{Name: MetaRel(domain, moment, ".nvram"), Source: src, Size: st.Size(), Format: "raw", SHA256: sum}, nil
}
