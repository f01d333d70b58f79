package copyfile

import (
	"errors"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// setMode gives the copy the mode cp without -p gives a new file: the
// source's permission bits minus the umask. Owner (the running user) and
// mtime (the time of writing) are already right.
func setMode(fd int, src *unix.Stat_t) error {
	return wrap("chmod", unix.Fchmod(fd, src.Mode&0o777&^processUmask()))
}

// preserveMetadata is cp -p: owner, group, mode (including setuid, setgid
// and sticky bits) and atime/mtime of the source. The chown comes first
// because it clears setuid/setgid, the times last so nothing bumps them.
func preserveMetadata(fd int, src *unix.Stat_t) error {
	mode := src.Mode & 0o7777
	owned, err := chownLikeSource(fd, src)
	if err != nil {
		return err
	}
	if !owned {
		// Never hand out setuid/setgid bits on a file owned by someone else.
		mode &^= unix.S_ISUID | unix.S_ISGID
	}
	if err := unix.Fchmod(fd, mode); err != nil {
		return wrap("chmod", err)
	}
	return wrap("utimes", futimens(fd, src.Atim, src.Mtim))
}

// chownLikeSource gives the copy the source's owner and group. Like cp -p, an
// unprivileged user who may not do that keeps the file (with the group if
// possible) instead of failing; for root a failing chown is an error.
func chownLikeSource(fd int, src *unix.Stat_t) (owned bool, err error) {
	err = unix.Fchown(fd, int(src.Uid), int(src.Gid))
	if err == nil {
		return true, nil
	}
	if os.Geteuid() == 0 || !(errors.Is(err, unix.EPERM) || errors.Is(err, unix.EINVAL)) {
		return false, wrap("chown", err)
	}
	_ = unix.Fchown(fd, -1, int(src.Gid)) // best effort, as cp
	return false, nil
}

// futimens sets atime and mtime of an open file at nanosecond precision.
// utimensat with a NULL path acts on the descriptor itself, which avoids
// looking the temporary name up again.
func futimens(fd int, atime, mtime unix.Timespec) error {
	ts := [2]unix.Timespec{atime, mtime}
	_, _, e := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(&ts[0])), 0, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// processUmask returns the umask without changing it (Linux >= 4.7 shows it
// in /proc/self/status), so that files created concurrently by other
// goroutines are not affected.
func processUmask() uint32 {
	if b, err := os.ReadFile("/proc/self/status"); err == nil {
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(line, "Umask:"); ok {
				if m, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32); err == nil {
					return uint32(m)
				}
			}
		}
	}
	// No /proc: read it by setting it. The temporary value is the most
	// restrictive one, so a file created by another goroutine in that window
	// fails closed (too strict) rather than open.
	old := unix.Umask(0o777)
	unix.Umask(old)
	return uint32(old)
}

// OnlineMode is the mode an online copy of a file of mode src gets: the
// source's permission bits minus the umask (a backup file is never more
// readable than what it backs up).
func OnlineMode(src os.FileMode) os.FileMode {
	return src.Perm() &^ os.FileMode(processUmask())
}
