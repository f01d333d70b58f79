// Package restore writes a restore point out of the backup directory into a
// target directory, ready to be defined as a new domain next to the
// original: one standalone, sparse qcow2 file per disk (the chain flattened,
// read from the backup directory alone), the NVRAM, the domain definition
// with every disk and the NVRAM pointing into the target directory under a
// new name, and — for a point taken with -s — a libvirt save image that
// `virsh restore` resumes at the moment of the backup. It never overwrites a
// file, and removes what it wrote when it fails or is interrupted.
package restore

import (
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/copyfile"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/qcow2"
)

// ErrFailed means the restore failed; the reason has been reported.
var ErrFailed = errors.New("restore failed")

// Job is one restore.
type Job struct {
	P      *logging.Printer
	Dir    *backupdir.Dir
	Point  *backupdir.Point
	Target string // TARGETDIR
	Rate   int64  // bytes/s for the copies; 0: unlimited
	// Definition is the domain's current definition, used for a point
	// recorded without one (written before manifests); nil: none.
	Definition func() (string, error)

	created []string // final files written so far (removed on failure)
}

// output is one file the restore writes.
type output struct {
	name  string // in the target directory
	write func(ctx context.Context, tmp string) error
	what  string
}

// Run restores the point. The caller has verified it.
func (j *Job) Run(ctx context.Context) error {
	p := j.Point
	fail := func(format string, a ...any) error {
		j.P.Err(format, a...)
		j.cleanup()
		return ErrFailed
	}
	target, err := filepath.Abs(j.Target)
	if err != nil {
		return fail("Cannot use the target directory '%s': %v", j.Target, err)
	}
	if err := usable(target, j.Dir.Path); err != nil {
		return fail("Cannot restore into '%s': %v", j.Target, err)
	}
	def, err := j.definition()
	if err != nil {
		return fail("Cannot read the definition of '%s': %v", p.Domain, err)
	}
	newName := p.Domain + "-" + p.Moment
	var outs []output
	disks := map[string]string{} // target dev → restored file
	for _, d := range p.Disks {
		d := d
		chain := make([]qcow2.Image, len(d.Chain))
		for i, f := range d.Chain {
			chain[i] = qcow2.Image{Path: filepath.Join(j.Dir.Path, f), Format: d.Format[i]}
		}
		name := d.Name
		if name == "" {
			name = filepath.Base(d.Chain[len(d.Chain)-1])
		}
		disks[d.Target] = filepath.Join(target, name)
		outs = append(outs, output{name: name, what: "disk '" + d.Target + "'", write: func(ctx context.Context, tmp string) error {
			return j.Dir.Tool.Convert(ctx, chain, tmp, j.Rate)
		}})
	}
	nvram := ""
	if m := p.Manifest; m != nil && m.NVRAM != nil {
		src := filepath.Join(j.Dir.Path, m.NVRAM.Name)
		name := filepath.Base(m.NVRAM.Source)
		if name == "." || name == "/" || name == "" {
			name = newName + "_VARS.fd"
		}
		nvram = filepath.Join(target, name)
		outs = append(outs, output{name: name, what: "NVRAM", write: func(ctx context.Context, tmp string) error {
			return copyInto(ctx, src, tmp, j.Rate)
		}})
	}
	var xml string
	if def != "" {
		x, warnings, err := Rewrite(def, newName, disks, nvram, target)
		if err != nil {
			return fail("Cannot rewrite the definition of '%s': %v", p.Domain, err)
		}
		for _, w := range warnings {
			j.P.Warn("%s", w)
		}
		xml = x
		outs = append(outs, output{name: p.Domain + ".xml", what: "definition", write: func(_ context.Context, tmp string) error {
			return os.WriteFile(tmp, []byte(xml), 0o600)
		}})
	}
	if m := p.Manifest; m != nil && m.StateFile != "" && xml != "" {
		state := m.StateFile
		if !filepath.IsAbs(state) {
			state = filepath.Join(j.Dir.Path, state)
		}
		outs = append(outs, output{name: newName + ".save", what: "save image", write: func(ctx context.Context, tmp string) error {
			return writeSaveImage(ctx, state, xml, tmp)
		}})
	}
	for _, o := range outs {
		if _, err := os.Lstat(filepath.Join(target, o.name)); err == nil {
			return fail("Cannot restore into '%s': '%s' already exists (nothing is overwritten)", j.Target, o.name)
		}
	}
	for _, o := range outs {
		if err := ctx.Err(); err != nil {
			return fail("Restore of '%s' at %s interrupted", p.Domain, p.Moment)
		}
		dst := filepath.Join(target, o.name)
		if err := j.write(ctx, dst, o.write); err != nil {
			if ctx.Err() != nil {
				return fail("Restore of '%s' at %s interrupted", p.Domain, p.Moment)
			}
			return fail("Cannot write the %s of '%s' to '%s': %v", o.what, p.Domain, dst, err)
		}
		j.P.Info("Restored the %s of '%s' at %s to '%s'", o.what, p.Domain, p.Moment, dst)
	}
	if xml == "" {
		j.P.Warn("No definition of '%s' was saved with this restore point, and the domain is not defined: write one for the restored disks by hand", p.Domain)
		return nil
	}
	j.P.Warn("The restored definition keeps the MAC addresses of '%s': do not run both on one network", p.Domain)
	j.P.Info("Define it with: virsh define '%s' (domain '%s')", filepath.Join(target, p.Domain+".xml"), newName)
	if m := p.Manifest; m != nil && m.StateFile != "" {
		j.P.Info("Or resume it at %s with: virsh restore '%s'", p.Moment, filepath.Join(target, newName+".save"))
	}
	return nil
}

// definition is the definition to restore: the one saved with the point,
// or the domain's current one for a point recorded without it.
func (j *Job) definition() (string, error) {
	if m := j.Point.Manifest; m != nil && m.XML != "" {
		b, err := os.ReadFile(filepath.Join(j.Dir.Path, m.XML))
		return string(b), err
	}
	if j.Definition == nil {
		return "", nil
	}
	x, err := j.Definition()
	if err != nil {
		return "", nil // the domain is gone: disks only
	}
	j.P.Warn("No definition was saved with this restore point of '%s': the restored one is its current definition", j.Point.Domain)
	return x, nil
}

// write produces dst through a temporary file in its directory, renamed
// into place without ever replacing a file.
func (j *Job) write(ctx context.Context, dst string, fill func(context.Context, string) error) error {
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return err
	}
	tmp := filepath.Join(filepath.Dir(dst), "."+filepath.Base(dst)+".fi-backup-restore-"+hex.EncodeToString(rnd[:]))
	err := fill(ctx, tmp)
	if err == nil {
		err = os.Chmod(tmp, 0o600) // a guest's disk: as private as the backups
	}
	if err == nil {
		err = syncFile(tmp)
	}
	if err == nil {
		err = unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, dst, unix.RENAME_NOREPLACE)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return err
	}
	j.created = append(j.created, dst)
	return nil
}

// cleanup removes what an unfinished restore wrote.
func (j *Job) cleanup() {
	for _, f := range j.created {
		if err := os.Remove(f); err == nil {
			j.P.Debug("Removed '%s' of the unfinished restore", f)
		}
	}
	j.created = nil
}

func syncFile(p string) error {
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// usable checks that the target directory exists, takes files, and is not
// the backup directory itself.
func usable(target, backupDir string) error {
	st, err := os.Stat(target)
	if err != nil || !st.IsDir() {
		return errors.New("it doesn't exist or is not a directory")
	}
	if bst, err := os.Stat(backupDir); err == nil && os.SameFile(st, bst) {
		return errors.New("it is the backup directory")
	}
	f, err := os.CreateTemp(target, ".fi-backup-probe-*")
	if err != nil {
		return errors.Unwrap(err)
	}
	name := f.Name()
	_ = f.Close()
	return os.Remove(name)
}

// copyInto copies a small file (the NVRAM) with the copy engine.
func copyInto(ctx context.Context, src, dst string, rate int64) error {
	opt := copyfile.Options{}
	if rate > 0 {
		opt.Limit = copyfile.NewLimiter(rate)
	}
	_, err := copyfile.Copy(ctx, src, dst, opt)
	return err
}

// saveMagic and the header layout are libvirt's qemu save image format
// (virQEMUSaveHeader, version 2): magic, version, data_len, was_running,
// compressed (0: raw), cookieOffset, unused[14], all little endian, then the
// domain XML (NUL-terminated), then the raw migration stream.
const saveMagic = "LibvirtQemudSave"

// writeSaveImage wraps a -s state file (a gzip'ed QEMU migration stream)
// into a libvirt save image of the domain definition xml.
func writeSaveImage(ctx context.Context, stateFile, xml, dst string) error {
	in, err := os.Open(stateFile)
	if err != nil {
		return err
	}
	defer in.Close()
	zr, err := gzip.NewReader(in)
	if err != nil {
		return fmt.Errorf("the state file is not gzip: %w", err)
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	data := append([]byte(xml), 0)
	hdr := make([]byte, 0, 16+4*19)
	hdr = append(hdr, saveMagic...)
	for _, v := range []uint32{2, uint32(len(data)), 1, 0, 0} {
		hdr = binary.LittleEndian.AppendUint32(hdr, v)
	}
	hdr = append(hdr, make([]byte, 4*14)...)
	_, err = out.Write(append(hdr, data...))
	if err == nil {
		_, err = io.Copy(out, ctxReader{ctx, zr})
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		err = fmt.Errorf("the state file is truncated: %w", err)
	}
	return err
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
