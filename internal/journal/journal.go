// Package journal keeps the per-domain record of an operation in flight
// that outlives the process when it is killed: a block job (libvirt keeps
// running it), a -s state dump (the guest stays paused), a --cbt push backup
// (QEMU keeps writing its target, libvirt has already made its checkpoint). The record is
// written before the operation starts and removed when it is over; the next
// run finds it under the domain's lock and finishes the job (see the owners
// of each kind: blockjob for block jobs, backup for dumps, cbt for push
// backups).
//
// The records live next to the lock files in /var/lock, which every local
// user may write to, and they make root abort jobs and resume guests. So a
// record is written without ever following a link (a fresh O_EXCL temporary
// file renamed into place, mode 0600), and read only when it is a regular
// file owned by this process's user that nobody else may write.
package journal

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Record is one domain's operation in flight.
type Record struct {
	Domain string `json:"domain"`
	Kind   string `json:"kind"`           // defined by the owner, e.g. "blockcommit", "dump"
	Disk   string `json:"disk,omitempty"` // target of a block job, e.g. "vda"
	Top    string `json:"top,omitempty"`  // the disk's active image when the job started
	Base   string `json:"base,omitempty"` // the image a commit writes into
	// Chain is the disk's chain (top first) before an offline
	// consolidation: what it may delete once the disk left it.
	Chain []string `json:"chain,omitempty"`
	// A --cbt push backup: the checkpoint it creates, the files it writes
	// (temporary and final names), the backup directory and the moment of
	// its restore point, and whether it may have left the guest frozen.
	Checkpoint string   `json:"checkpoint,omitempty"`
	Files      []string `json:"files,omitempty"`
	Dir        string   `json:"dir,omitempty"`
	Moment     string   `json:"moment,omitempty"`
	Quiesce    bool     `json:"quiesce,omitempty"`
	PID        int      `json:"pid"` // the process that wrote it
}

// ErrUntrusted marks a journal file this tool did not write (or may not
// trust): it is never acted upon.
var ErrUntrusted = errors.New("untrusted journal")

const suffix = ".fi-backup.job"

// Store is the directory of the journals (the lock directory).
type Store struct{ Dir string }

// Path is the journal file of a domain.
func (s Store) Path(dom string) string { return filepath.Join(s.Dir, dom+suffix) }

// Write records r for its domain, replacing any earlier record.
func (s Store) Write(r Record) error {
	r.PID = os.Getpid()
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return err
	}
	tmp := filepath.Join(s.Dir, "."+r.Domain+suffix+"."+hex.EncodeToString(rnd[:]))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		// rename replaces whatever sits at the name (a planted link too)
		// without following it.
		err = os.Rename(tmp, s.Path(r.Domain))
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}

// Clear removes a domain's record; no record is not an error.
func (s Store) Clear(dom string) error {
	if err := os.Remove(s.Path(dom)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Read returns a domain's record, nil when there is none, and an error
// wrapping ErrUntrusted when the file is not one this tool wrote.
func (s Store) Read(dom string) (*Record, error) {
	p := s.Path(dom)
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOENT):
		return nil, nil
	case errors.Is(err, unix.ELOOP):
		return nil, fmt.Errorf("%w: %s is a symbolic link", ErrUntrusted, p)
	case err != nil:
		return nil, fmt.Errorf("open %s: %w", p, err)
	}
	f := os.NewFile(uintptr(fd), p)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", p, err)
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrUntrusted, p)
	case int(st.Uid) != os.Geteuid():
		return nil, fmt.Errorf("%w: %s belongs to uid %d, not to uid %d", ErrUntrusted, p, st.Uid, os.Geteuid())
	case st.Mode&0o022 != 0:
		return nil, fmt.Errorf("%w: %s may be written by others (mode %04o)", ErrUntrusted, p, st.Mode&0o7777)
	}
	b, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%w: %s is not a fi-backup journal: %v", ErrUntrusted, p, err)
	}
	if r.Domain != dom {
		return nil, fmt.Errorf("%w: %s names domain '%s'", ErrUntrusted, p, r.Domain)
	}
	return &r, nil
}

// Domains lists the domains that have a journal file (trusted or not).
func (s Store) Domains() []string {
	entries, err := os.ReadDir(s.Dir)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), suffix)
		if ok && name != "" && !strings.HasPrefix(e.Name(), ".") {
			out = append(out, name)
		}
	}
	return out
}
