// Package lock takes the per-domain lock of fi-backup: an flock(2) on
// /var/lock/<domain>.fi-backup.lock, the same path and the same kind of lock
// the old fi-backup.sh takes, so the old script and this program exclude each
// other on a domain.
//
// Unlike the script, the lock file is never deleted (B5): deleting a locked
// path lets a second process create and lock a new inode at the same name
// while a third still holds the old one.
package lock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// DefaultDir is where the old tool kept its lock files.
const DefaultDir = "/var/lock"

// ErrLocked means another process holds the domain's lock.
var ErrLocked = errors.New("lock is held by another process")

// Path returns the lock file path of a domain in dir.
func Path(dir, domain string) string {
	return filepath.Join(dir, domain+".fi-backup.lock")
}

// Lock is a held domain lock.
type Lock struct {
	f *os.File
}

// TryLock takes the domain's lock without waiting. It returns ErrLocked
// (wrapped) when another process holds it, and any other error as it is (an
// unwritable lock directory is not "another instance", B6).
func TryLock(dir, domain string) (*Lock, error) {
	if domain == "" || strings.ContainsRune(domain, '/') || domain == "." || domain == ".." {
		return nil, fmt.Errorf("domain name %q cannot be used in a lock file name", domain)
	}
	p := Path(dir, domain)
	// O_WRONLY|O_CREAT like the shell redirection the script used, but
	// without O_TRUNC: truncating is pointless and the file stays empty.
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|syscall.O_CLOEXEC|syscall.O_NOFOLLOW, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		_ = f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w", p, ErrLocked)
		}
		return nil, fmt.Errorf("flock %s: %w", p, err)
	}
	return &Lock{f: f}, nil
}

// Unlock releases the lock. The file stays where it is.
func (l *Lock) Unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the only descriptor drops the flock
	l.f = nil
	return err
}
