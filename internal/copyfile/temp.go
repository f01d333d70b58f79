package copyfile

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// tempMarker sits between the destination's base name and the random suffix
// of a temporary file: "." + base(dst) + tempMarker + suffix.
const tempMarker = ".fi-backup-tmp-"

// suffixLen is the length of the random hex suffix (8 random bytes). A fixed
// length lets IsTemp recognise our files strictly.
const suffixLen = 16

// maxNameLen is NAME_MAX on Linux file systems.
const maxNameLen = 255

// createAttempts bounds the retries when a temp name is already taken; with 64
// random bits a second collision means someone is planting names.
const createAttempts = 16

// tempName returns the temporary name for the destination base name. The base
// is shortened when needed so the name stays within NAME_MAX.
func tempName(base, suffix string) string {
	keep := maxNameLen - 1 - len(tempMarker) - len(suffix)
	if len(base) > keep {
		base = base[:keep]
	}
	return "." + base + tempMarker + suffix
}

// randomSuffix returns suffixLen random lowercase hex characters.
func randomSuffix() (string, error) {
	var b [suffixLen / 2]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return hex.EncodeToString(b[:]), nil
}

// IsTemp reports whether a base name is one of Copy's temporary files.
func IsTemp(name string) bool {
	i := strings.LastIndex(name, tempMarker)
	if i < 2 || name[0] != '.' {
		return false // needs "." and a non-empty destination name before the marker
	}
	suffix := name[i+len(tempMarker):]
	if len(suffix) != suffixLen {
		return false
	}
	for _, c := range suffix {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// createTemp creates a new temporary file for dst with mode 0600 and returns
// its descriptor and path. The file is flock'ed for as long as the
// descriptor is open (until after the rename, or until the kernel closes it
// when the process dies), which is how CleanTemps tells a live copy's file
// from a dead one's.
//
// Where the file system can (O_TMPFILE: ext4, xfs, btrfs, tmpfs), the file
// is created without a name, locked, and only then linked under its
// temporary name, so no other process ever sees it unlocked. Elsewhere it
// is created by name with O_EXCL and locked right after; CleanTemps then
// spares young files (tempGrace). Either way the kernel refuses any
// existing name, including a planted symlink, so we never write through
// someone else's file; on a collision it retries with a new suffix. suffix
// is a parameter so tests can force collisions.
func createTemp(dst string, suffix func() (string, error)) (fd int, name string, err error) {
	dir, base := filepath.Dir(dst), filepath.Base(dst)
	fd, err = unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err == nil {
		if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
			unix.Close(fd)
			return -1, "", fmt.Errorf("lock temp: %w", err)
		}
		name, err := linkTemp(fd, dir, base, suffix)
		if err != nil {
			unix.Close(fd)
			return -1, "", err
		}
		return fd, name, nil
	}
	if !noTmpfile(err) {
		return -1, "", err
	}
	for range createAttempts {
		s, err := suffix()
		if err != nil {
			return -1, "", fmt.Errorf("random suffix: %w", err)
		}
		name = filepath.Join(dir, tempName(base, s))
		fd, err = unix.Open(name, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		if err != nil {
			return -1, "", err
		}
		if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
			unix.Close(fd)
			unix.Unlink(name)
			return -1, "", fmt.Errorf("lock temp: %w", err)
		}
		return fd, name, nil
	}
	return -1, "", unix.EEXIST
}

// linkTemp gives the unnamed file fd its temporary name in dir.
func linkTemp(fd int, dir, base string, suffix func() (string, error)) (string, error) {
	proc := fmt.Sprintf("/proc/self/fd/%d", fd)
	for range createAttempts {
		s, err := suffix()
		if err != nil {
			return "", fmt.Errorf("random suffix: %w", err)
		}
		name := filepath.Join(dir, tempName(base, s))
		err = unix.Linkat(unix.AT_FDCWD, proc, unix.AT_FDCWD, name, unix.AT_SYMLINK_FOLLOW)
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		return name, err
	}
	return "", unix.EEXIST
}

// noTmpfile reports whether an O_TMPFILE open failed because the file
// system (or kernel) cannot do it, rather than for a reason that a named
// create would hit too.
func noTmpfile(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EISDIR) || errors.Is(err, unix.EINVAL)
}

// tempGrace protects a temp file created by name (file systems without
// O_TMPFILE) in the instant between its creation and its flock.
const tempGrace = 2 * time.Second

// removeIfStale removes p when no live Copy holds it: the file is opened
// without following links and locked; a lock held by a running Copy, or a
// file younger than grace, is left alone.
func removeIfStale(p string, grace time.Duration) (bool, error) {
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return false, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || time.Since(time.Unix(st.Mtim.Unix())) < grace {
		return false, nil
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return false, nil // a Copy is writing it
		}
		return false, err
	}
	if err := unix.Unlink(p); err != nil && !errors.Is(err, unix.ENOENT) {
		return false, err
	}
	return true, nil
}

// graceFor is how young a temp file in dir must be to be spared: none
// where temp files are created unnamed and locked first, tempGrace where
// they are created by name.
func graceFor(dir string) time.Duration {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err == nil {
		unix.Close(fd)
		return 0
	}
	return tempGrace
}

// CleanTemps removes leftover temporary files of Copy (from a run that was
// killed before it could clean up) in dir and returns their paths. Only
// regular files are removed: a symlink or directory that merely looks like a
// temp name was not made by Copy and is left alone (and never followed).
// A temp file that a running Copy (in any process) is still writing is
// flock'ed by it and skipped, so CleanTemps is safe while other copies into
// dir run; on file systems without O_TMPFILE, files younger than a few
// seconds are skipped too.
// It keeps going after a failed removal and returns all errors joined.
func CleanTemps(dir string) ([]string, error) {
	return cleanTemps(dir, graceFor(dir))
}

func cleanTemps(dir string, grace time.Duration) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("clean temps: %w", err)
	}
	var removed []string
	var errs []error
	for _, e := range entries {
		if !IsTemp(e.Name()) || !e.Type().IsRegular() {
			continue
		}
		p := filepath.Join(dir, e.Name())
		ok, err := removeIfStale(p, grace)
		if err != nil {
			errs = append(errs, fmt.Errorf("clean temps: %w", err))
			continue
		}
		if ok {
			removed = append(removed, p)
		}
	}
	return removed, errors.Join(errs...)
}
