package copyfile

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// Options selects cp semantics.
type Options struct {
	// Preserve is cp -p: keep mode, owner/group and atime/mtime of the source
	// on the copy.
	Preserve bool

	// Prepare, when set, is called with the temporary file's path after the
	// data is written and before metadata, fsync and rename; an error aborts
	// the copy. fi-backup rewrites the copy's backing reference here, so a
	// copy is never visible at its final name with a host path in it, and
	// cp -p timestamps are set after the rewrite.
	Prepare func(tmp string) error

	// BeforeRename, when set, is called with the temporary file's path
	// once it is complete and durable (data, metadata, fsync) and right
	// before it is renamed over dst; an error aborts the copy and leaves
	// dst untouched. fi-backup decides here whether the copy about to be
	// replaced must be kept as a generation.
	BeforeRename func(tmp string) error

	// Limit, when set, bounds the rate at which data is copied (holes and
	// reflinks cost nothing). One limiter may be shared by concurrent
	// copies to bound their sum.
	Limit *rate.Limiter

	// readWriteOnly skips FICLONE and copy_file_range so tests can exercise
	// the read/write fallback on any file system.
	readWriteOnly bool

	// unshare lets dst be src itself (see Unshare).
	unshare bool
}

// Stats describes what a Copy did.
type Stats struct {
	// Bytes is the number of data bytes written or copied into the
	// destination; holes and all-zero blocks that were skipped do not count.
	// For a reflink it is the source's size, all of which is shared.
	Bytes int64
	// Reflinked is true when the whole file was cloned with FICLONE.
	Reflinked bool
}

// Copy copies the regular file src to the path dst atomically, keeping holes.
//
// The data goes to a new temporary file in dst's directory (see IsTemp),
// created with mode 0600 so nobody else can read it before the final chmod.
// After the data and metadata are written, the temporary file is fsynced and
// renamed over dst, and the directory is fsynced, so dst is at every moment
// either its old version or the complete copy. On any failure, including a
// cancelled ctx, the temporary file is removed and dst is left untouched.
//
// Without opt.Preserve the copy gets the source's permission bits minus the
// umask, belongs to the running user and has the current time as mtime (as
// cp without -p creating a new file). With opt.Preserve it gets the source's
// mode, owner, group, atime and mtime (as cp -p).
//
// Errors read like "copy SRC to DST: write: no space left on device" and wrap
// the cause, so errors.Is works with syscall errnos and context errors.
func Copy(ctx context.Context, src, dst string, opt Options) (Stats, error) {
	stats, err := copyFile(ctx, src, dst, opt)
	if err != nil {
		return stats, fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	return stats, nil
}

func copyFile(ctx context.Context, src, dst string, opt Options) (Stats, error) {
	if err := ctx.Err(); err != nil {
		return Stats{}, err
	}
	in, sst, err := openSource(src)
	if err != nil {
		return Stats{}, err
	}
	defer unix.Close(in)
	if !opt.unshare {
		if err := checkDestination(dst, sst); err != nil {
			return Stats{}, err
		}
	}
	out, tmp, err := createTemp(dst, randomSuffix)
	if err != nil {
		return Stats{}, wrap("create temp", err)
	}
	stats, err := writeTemp(ctx, in, out, tmp, sst, opt)
	if err == nil {
		err = ctx.Err() // last chance to abort before dst changes
	}
	if err == nil {
		return stats, commit(out, tmp, dst, opt.BeforeRename)
	}
	unix.Close(out)
	unix.Unlink(tmp)
	return stats, err
}

// openSource opens src for reading and checks that it is a regular file:
// copying a device or FIFO would never end or would not be an image.
func openSource(src string) (int, *unix.Stat_t, error) {
	fd, err := unix.Open(src, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, nil, wrap("open source", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, nil, wrap("stat source", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return -1, nil, errors.New("source is not a regular file")
	}
	return fd, &st, nil
}

// checkDestination fails early, before any data is copied, when the final
// rename would fail (dst is a directory) or would replace the source with a
// copy of itself (cp refuses that too).
func checkDestination(dst string, src *unix.Stat_t) error {
	var st unix.Stat_t
	err := unix.Lstat(dst, &st)
	switch {
	case errors.Is(err, unix.ENOENT):
		return nil
	case err != nil:
		return wrap("stat destination", err)
	case st.Mode&unix.S_IFMT == unix.S_IFDIR:
		return errors.New("destination is a directory")
	case st.Dev == src.Dev && st.Ino == src.Ino:
		return errors.New("source and destination are the same file")
	}
	return nil
}

// writeTemp fills the temporary file out with the data and metadata of the
// source in.
func writeTemp(ctx context.Context, in, out int, tmp string, sst *unix.Stat_t, opt Options) (Stats, error) {
	stats, err := writeData(ctx, in, out, sst.Size, opt)
	if err != nil {
		return stats, err
	}
	if opt.Prepare != nil {
		if err := opt.Prepare(tmp); err != nil {
			return stats, fmt.Errorf("prepare: %w", err)
		}
	}
	if opt.Preserve {
		return stats, preserveMetadata(out, sst)
	}
	return stats, setMode(out, sst)
}

// commit makes the temporary file durable and moves it over dst. Once the
// rename has happened the temporary name is gone, so a failing directory
// fsync is reported but nothing is removed.
func commit(out int, tmp, dst string, beforeRename func(string) error) error {
	err := wrap("fsync", unix.Fsync(out))
	if cerr := unix.Close(out); err == nil {
		err = wrap("close", cerr)
	}
	if err == nil && beforeRename != nil {
		err = beforeRename(tmp)
	}
	if err == nil {
		err = wrap("rename", unix.Rename(tmp, dst))
	}
	if err != nil {
		unix.Unlink(tmp)
		return err
	}
	return wrap("fsync directory", syncDir(filepath.Dir(dst)))
}

// syncDir fsyncs a directory so that a rename in it survives a crash.
func syncDir(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	err = unix.Fsync(fd)
	if cerr := unix.Close(fd); err == nil {
		err = cerr
	}
	return err
}

// wrap prefixes err with the failed operation, keeping nil as nil.
func wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", op, err)
}
