package copyfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// Reasons returned by NeedCopy, for a debug line.
const (
	ReasonMissing  = "destination missing"
	ReasonNewer    = "source newer than destination"
	ReasonUpToDate = "destination is up to date"
)

// NeedCopy implements the decision of `cp -u`: copy when the destination is
// missing (dst == nil) or when the source's mtime is later than the
// destination's. Like GNU cp, it compares at the resolution of the
// destination's file system (res; 0 or 1ns means nanoseconds): the source's
// time is truncated to it first, because a copy on a file system that keeps
// whole (or even) seconds can never carry the source's exact time, and
// would otherwise look older than its source on every run.
//
// A source or destination that is not a regular file is an error: replacing a
// directory (or a device) with an image file is never what the caller meant.
func NeedCopy(src, dst os.FileInfo, res time.Duration) (need bool, reason string, err error) {
	if src == nil {
		return false, "", fmt.Errorf("need copy: no source file info")
	}
	if !src.Mode().IsRegular() {
		return false, "", fmt.Errorf("need copy: source %s is not a regular file (%s)", src.Name(), src.Mode().Type())
	}
	if dst == nil {
		return true, ReasonMissing, nil
	}
	if !dst.Mode().IsRegular() {
		return false, "", fmt.Errorf("need copy: destination %s is not a regular file (%s)", dst.Name(), dst.Mode().Type())
	}
	if truncateTime(src.ModTime(), res).After(dst.ModTime()) {
		return true, ReasonNewer, nil
	}
	return false, ReasonUpToDate, nil
}

// truncateTime rounds t down to a multiple of res since the Unix epoch.
func truncateTime(t time.Time, res time.Duration) time.Time {
	if res <= time.Nanosecond {
		return t
	}
	ns := t.UnixNano()
	r := ns % int64(res)
	if r < 0 {
		r += int64(res)
	}
	return time.Unix(0, ns-r)
}

// probeTime is what TimeResolution asks the file system to store: an odd
// second and a nanosecond part with every decimal digit set, so that what
// comes back shows how much was kept.
var probeTime = unix.Timespec{Sec: 1700000001, Nsec: 123456789}

// TimeResolution finds out how precisely the file system holding dir keeps
// modification times (1ns on ext4 with large inodes, xfs, btrfs, tmpfs; 1s on
// ext4 with 128-byte inodes, ext3 and some NFS servers; 100ns on NTFS/CIFS;
// 2s on FAT), by setting a known time on a scratch file and reading it back.
func TimeResolution(dir string) (time.Duration, error) {
	f, err := os.CreateTemp(dir, ".fi-backup-probe-*")
	if err != nil {
		return 0, errors.Unwrap(err)
	}
	name := f.Name()
	defer os.Remove(name)
	defer f.Close()
	ts := []unix.Timespec{probeTime, probeTime}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, name, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return 0, fmt.Errorf("set time on %s: %w", filepath.Base(name), err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, err
	}
	return resolutionFrom(st.Mtim), nil
}

// resolutionFrom derives the resolution from how probeTime came back.
func resolutionFrom(got unix.Timespec) time.Duration {
	if got.Sec != probeTime.Sec {
		return 2 * time.Second // an odd second was not kept: FAT
	}
	for res := int64(1); res < 1e9; res *= 10 {
		if got.Nsec == probeTime.Nsec/res*res {
			return time.Duration(res)
		}
	}
	return time.Second
}
