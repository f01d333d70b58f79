package backupdir

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fi-backup/fi-backup/internal/copyfile"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// A --cbt run writes each disk's restore point as one new qcow2 file made
// by libvirt's push backup, into the same flat directory and the same kind
// of chain as the copies of the snapshot method:
//
//	vm.cbt-T1 ◄── vm.cbt-T2 ◄── vm.cbt-T3     (full, then increments; relative references)
//
// <disk's image minus its last .ext>.cbt-<moment>: never a name the
// snapshot method uses. The full file has no backing file; each increment
// names the previous file by its relative name. A target is written under
// a hidden temporary name (.<name>.fi-backup-cbt), which is also the claim
// on the name, and renamed only once its job has succeeded and QEMU has let
// go of it: no final name ever holds a partial file.

// idFile holds the directory's id, which names its checkpoints on the
// domains (fi-backup-<id>-<moment>): two backup directories of one domain
// never take each other's checkpoints for their own.
const idFile = "id"

var idRE = regexp.MustCompile(`^[0-9a-f]{16}$`)

// ID is the backup directory's id, made (at random, atomically: the first
// of two concurrent runs wins) when the directory has none yet.
func (d *Dir) ID() (string, error) {
	p := filepath.Join(d.Path, MetaDir, idFile)
	if id, err := readID(p); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return id, err
	}
	if err := os.MkdirAll(filepath.Join(d.Path, MetaDir), 0o700); err != nil {
		return "", err
	}
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(filepath.Dir(p), ".id.tmp-*")
	if err != nil {
		return "", err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	_, err = f.WriteString(hex.EncodeToString(b[:]) + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", err
	}
	// link fails on an existing name: whoever came first keeps its id.
	if err := os.Link(tmp, p); err != nil && !errors.Is(err, fs.ErrExist) {
		return "", err
	}
	if err := syncDir(filepath.Dir(p)); err != nil {
		return "", err
	}
	return readID(p)
}

func readID(p string) (string, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(string(b))
	if !idRE.MatchString(id) {
		return "", fmt.Errorf("'%s' does not hold a backup directory id (16 hex digits)", p)
	}
	return id, nil
}

var cbtRE = regexp.MustCompile(`\.cbt-[0-9]{8}-[0-9]{6}$`)

// IsCBT reports whether a backup file carries the name of a --cbt backup.
func IsCBT(name string) bool { return cbtRE.MatchString(name) }

// CBTName is the name of a disk's --cbt backup file at a moment: the disk's
// own image name without its last ".ext", then ".cbt-<moment>".
func CBTName(disk, moment string) string {
	if i := strings.LastIndexByte(disk, '.'); i > 0 {
		disk = disk[:i]
	}
	return disk + ".cbt-" + moment
}

// LatestCBT is the newest restore point of domain made by --cbt, nil when
// there is none.
func (d *Dir) LatestCBT(domain string) *Manifest {
	ms := d.Manifests(domain, nil)
	for i := len(ms) - 1; i >= 0; i-- {
		if ms[i].Method == MethodCBT {
			return ms[i]
		}
	}
	return nil
}

// ChainIntact reports why a recorded chain can no longer be extended: a
// file is missing or its size is not the recorded one ("" when intact).
func (d *Dir) ChainIntact(chain []File) string {
	for _, f := range chain {
		st, err := os.Stat(filepath.Join(d.Path, f.Name))
		switch {
		case err != nil:
			return fmt.Sprintf("'%s' is missing", f.Name)
		case st.Size() != f.Size:
			return fmt.Sprintf("'%s' has %d bytes, its manifest says %d", f.Name, st.Size(), f.Size)
		}
	}
	return ""
}

// CBTTarget is one disk's file of a --cbt run.
type CBTTarget struct {
	Name    string      // final name, in DIR
	Backing string      // the previous file's name (an increment), "" for a full backup
	Size    int64       // the disk's virtual size
	Mode    os.FileMode // the final file's permission bits
}

// Final is the target's final path, absolute (libvirt takes no other).
func (d *Dir) Final(t CBTTarget) string { return filepath.Join(d.abs(), t.Name) }

// Temp is the hidden name the target is written under, absolute.
func (d *Dir) Temp(t CBTTarget) string {
	return filepath.Join(d.abs(), "."+t.Name+".fi-backup-cbt")
}

func (d *Dir) abs() string {
	if p, err := filepath.Abs(d.Path); err == nil {
		return p
	}
	return d.Path
}

// ReserveCBT claims the names of a run's targets at moment: each temporary
// name is created exclusively (so two runs never write one file), then the
// final name and the domain's manifest for that moment must not exist. It
// reports false, leaving nothing behind, when the moment is taken (the
// caller tries the next second).
func (d *Dir) ReserveCBT(domain, moment string, ts []CBTTarget) (bool, error) {
	if _, err := os.Lstat(d.MetaPath(domain, moment, ".json")); err == nil {
		return false, nil
	}
	var made []string
	undo := func() {
		for _, p := range made {
			_ = os.Remove(p)
		}
	}
	for _, t := range ts {
		f, err := os.OpenFile(d.Temp(t), os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
		if errors.Is(err, fs.ErrExist) {
			undo()
			return false, nil
		}
		if err != nil {
			undo()
			return false, err
		}
		_ = f.Close()
		made = append(made, d.Temp(t))
		if _, err := os.Lstat(d.Final(t)); err == nil {
			undo()
			return false, nil
		}
	}
	return true, nil
}

// CreateCBT makes a target's (reserved) temporary file the empty qcow2
// image the push backup fills: standalone for a full backup, else an
// overlay of the previous file by its relative name (qcow2.Create: no
// qemu-img process).
func (d *Dir) CreateCBT(t CBTTarget) error {
	tmp := d.Temp(t)
	if err := qcow2.Create(tmp, t.Size, t.Backing, "qcow2"); err != nil {
		return err
	}
	return os.Chmod(tmp, 0o600)
}

// FinishCBT gives a target whose job succeeded its final name: it waits
// (at most wait) until QEMU has closed it — QEMU still writes the image's
// metadata for a moment after the job's end — and its header says it was
// closed cleanly (qcow2.CheckClosed), then sets its mode, makes it durable
// and renames it without replacing anything. It returns the file as a
// manifest records it.
func (d *Dir) FinishCBT(ctx context.Context, t CBTTarget, wait time.Duration) (File, error) {
	tmp, final := d.Temp(t), d.Final(t)
	end := time.Now().Add(wait)
	for {
		if err := ctx.Err(); err != nil {
			return File{}, err // stopped (SIGINT/SIGTERM): no restore point is made
		}
		err := qcow2.CheckClosed(tmp)
		if err == nil {
			break
		}
		if !errors.Is(err, qcow2.ErrLocked) || time.Now().After(end) {
			return File{}, err
		}
		time.Sleep(5 * time.Millisecond)
	}
	f, err := os.OpenFile(tmp, os.O_RDWR|unix.O_NOFOLLOW, 0)
	if err != nil {
		return File{}, err
	}
	err = f.Chmod(t.Mode.Perm())
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return File{}, err
	}
	if err := renameNoReplace(tmp, final); err != nil {
		return File{}, err
	}
	if err := syncDir(d.Path); err != nil {
		return File{}, err
	}
	if err := d.step("cbt-renamed"); err != nil {
		return File{}, err
	}
	return d.describeCBT(t.Name)
}

// describeCBT is what a manifest records of a --cbt file: no host source
// (it is no copy of a host file, so retention never takes a host file for
// merged because of it), and Copied: this run made it.
func (d *Dir) describeCBT(name string) (File, error) {
	// Hashed afresh: no earlier manifest's hash of the name may stand in.
	sum, err := copyfile.HashFile(filepath.Join(d.Path, name))
	if err != nil {
		return File{}, err
	}
	f, err := d.describe(name, virt.Image{}, sum)
	f.Copied = true
	return f, err
}

// renameNoReplace renames without replacing an existing file.
func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// A file system without RENAME_NOREPLACE: link (fails on an
		// existing name), then unlink.
		if err = os.Link(from, to); err == nil {
			return os.Remove(from)
		}
		return err
	}
	if errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("'%s' already exists", to)
	}
	return err
}

// AdmitCBT checks that the backup file system can take a --cbt run of
// domain that writes about need bytes (the data of its full backups, the
// changes of its increments).
func (d *Dir) AdmitCBT(domain string, need int64) error {
	var fs unix.Statfs_t
	if err := unix.Statfs(d.Path, &fs); err != nil {
		return nil // unknown: the job will tell
	}
	if have := int64(fs.Bavail) * int64(fs.Bsize); need > have {
		d.P.Err("Not enough free space in '%s' for the backup of '%s': it writes up to %s, and %s are free", d.Path, domain, human(need), human(have))
		return ErrFailed
	}
	return nil
}

// Allocated is the space a file takes on its file system.
func Allocated(path string) int64 { return allocated(path) }
