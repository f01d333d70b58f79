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

	// PrepareHead, when > 0, promises that Prepare changes no byte at or
	// past offset PrepareHead (fi-backup rewrites the qcow2 header
	// cluster). Those first bytes are then copied first and Prepare is
	// called on them alone, so that with Hash the hash follows the rest
	// of the copy as it is written instead of reading the whole copy again
	// after it. 0: Prepare may change anything; it runs after the copy.
	PrepareHead int64

	// BeforeRename, when set, is called with the temporary file's path
	// once it is complete and durable (data, metadata, fsync) and right
	// before it is renamed over dst; an error aborts the copy and leaves
	// dst untouched. fi-backup decides here whether the copy about to be
	// replaced must be kept as a generation. With Hash, it must not change
	// the file's content: the hash is already taken.
	BeforeRename func(tmp string) error

	// Hash asks for the SHA-256 of the copy in Stats.SHA256. The
	// temporary file is read back through the page cache on another core
	// (holes hashed as zeros without being read): while it is copied when
	// there is no Prepare or PrepareHead bounds it (from the moment Prepare
	// has rewritten the head), else after Prepare (so the hash covers a
	// rewritten header) while the metadata is set and the final fsync
	// waits for the disk.
	Hash bool

	// Progress, when set, is called on the goroutine running Copy after
	// each chunk of data (at most 16 MiB) with the number of bytes of the
	// source's data extents handled so far, holes not counted: it climbs to
	// about the source's allocated size (st_blocks), what a progress bar
	// shows as its total. A reflinked copy reports the whole size at once.
	// It must return quickly: the copy waits for it.
	Progress func(done int64)

	// Limit, when set, bounds the rate at which data is copied (holes and
	// reflinks cost nothing). One limiter may be shared by concurrent
	// copies to bound their sum.
	Limit *rate.Limiter

	// readWriteOnly skips FICLONE and copy_file_range so tests can exercise
	// the read/write fallback on any file system.
	readWriteOnly bool

	// syncRange replaces sync_file_range(2) in tests; nil: the real one.
	syncRange syncRangeFunc

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
	// SHA256 is, with Options.Hash, the SHA-256 of the whole content of
	// dst as the copy left it (holes read as zeros), in lowercase hex:
	// what `sha256sum dst` prints. Empty without Options.Hash or when the
	// copy failed.
	SHA256 string
}

// Copy copies the regular file src to the path dst atomically, keeping holes.
//
// The data goes to a new temporary file in dst's directory (see IsTemp),
// created with mode 0600 so nobody else can read it before the final chmod.
// After the data and metadata are written, the temporary file is fsynced and
// renamed over dst, and the directory is fsynced, so dst is at every moment
// either its old version or the complete copy. On any failure, including a
// cancelled ctx, the temporary file is removed and dst is left untouched.
// The writeback of the data is started while it is copied, chunk by chunk
// (sync_file_range), so the copy runs at the disk's pace with few dirty
// pages and the final fsync has little left to wait for.
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
	stats, hashing, err := writeTemp(ctx, in, out, tmp, sst, opt)
	if err == nil {
		err = ctx.Err() // last chance to abort before dst changes
	}
	if err == nil {
		err = commit(out, tmp, dst, opt.BeforeRename, hashing, &stats)
		if err != nil {
			stats.SHA256 = ""
		}
		return stats, err
	}
	hashing.abort() // it reads out: it must be over before out is closed
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
// source in. With opt.Hash, the hash of the final content is under way when
// it returns without error: without Prepare, nothing changes the data once
// it is copied, so the hash follows the copy as it is written; with
// Prepare, it starts once Prepare is done.
func writeTemp(ctx context.Context, in, out int, tmp string, sst *unix.Stat_t, opt Options) (Stats, *pendingHash, error) {
	var (
		prog     *progress
		hashing  *pendingHash
		err      error
		prepared bool
		atHead   func() error
	)
	prepare := func() error {
		prepared = true
		if err := opt.Prepare(tmp); err != nil {
			return fmt.Errorf("prepare: %w", err)
		}
		return nil
	}
	switch {
	case opt.Hash && opt.Prepare == nil:
		prog = newProgress()
		if hashing, err = startHash(ctx, out, prog); err != nil {
			return Stats{}, nil, err
		}
	case opt.Hash && opt.PrepareHead > 0:
		prog = newProgress()
		atHead = func() error {
			if err := prepare(); err != nil {
				return err
			}
			var err error
			hashing, err = startHash(ctx, out, prog)
			return err
		}
	}
	stats, err := writeData(ctx, in, out, sst.Size, opt, prog, atHead)
	if err == nil && opt.Prepare != nil && !prepared {
		err = prepare()
	}
	if err == nil && opt.Hash && hashing == nil {
		var st unix.Stat_t
		if err = wrap("stat temp", unix.Fstat(out, &st)); err == nil {
			hashing, err = startHash(ctx, out, finished(st.Size))
		}
	}
	if err == nil {
		if opt.Preserve {
			err = preserveMetadata(out, sst)
		} else {
			err = setMode(out, sst)
		}
	}
	if err != nil {
		prog.fail()
		hashing.abort() // it reads out: it must be over before out is closed
		return stats, nil, err
	}
	return stats, hashing, nil
}

// commit makes the temporary file durable and moves it over dst; the hash,
// if any, is taken while fsync waits. Once the rename has happened the
// temporary name is gone, so a failing directory fsync is reported but
// nothing is removed.
func commit(out int, tmp, dst string, beforeRename func(string) error, hashing *pendingHash, stats *Stats) error {
	err := wrap("fsync", unix.Fsync(out))
	if err != nil {
		hashing.abort()
	} else {
		stats.SHA256, err = hashing.wait()
	}
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
