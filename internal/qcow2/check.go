package qcow2

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Check runs `qemu-img check` on one image alone (its backing chain is not
// opened, so a file can be checked wherever its backing reference points).
// Formats without checks (raw) pass.
func (t Tool) Check(ctx context.Context, path, format string) error {
	if format == "raw" {
		return nil
	}
	if format == "" {
		format = "qcow2"
	}
	_, err := t.run(ctx, "check", "-U", ImageOpts(format, path, nil))
	return err
}

// ImageOpts is a json: image name for qemu-img that opens path with the
// given format and, instead of the backing reference stored in its header,
// the explicit chain below it (paths with formats, top first; none: no
// backing file at all). It reads a chain from the backup directory alone,
// whatever its headers say.
func ImageOpts(format, path string, below []Image) string {
	b, _ := json.Marshal(imageOpts(format, path, below))
	return "json:" + string(b)
}

func imageOpts(format, path string, below []Image) map[string]any {
	o := map[string]any{
		"driver": format,
		"file":   map[string]any{"driver": "file", "filename": path},
	}
	if format == "qcow2" {
		if len(below) == 0 {
			o["backing"] = nil
		} else {
			o["backing"] = imageOpts(formatOr(below[0].Format), below[0].Path, below[1:])
		}
	}
	return o
}

// Convert flattens a chain (top first) into one standalone, sparse qcow2
// file at dst (`qemu-img convert -O qcow2`), reading only the given files,
// at most rate bytes/s when rate > 0.
func (t Tool) Convert(ctx context.Context, chain []Image, dst string, rate int64) error {
	if len(chain) == 0 {
		return nil
	}
	args := []string{"convert", "-O", "qcow2"}
	if rate > 0 {
		args = append(args, "-r", strconv.FormatInt(rate, 10))
	}
	_, err := t.run(ctx, append(args, ImageOpts(formatOr(chain[0].Format), chain[0].Path, chain[1:]), dst)...)
	return err
}

func formatOr(f string) string {
	if strings.TrimSpace(f) == "" {
		return "qcow2"
	}
	return f
}

// Commit writes the data of the layers from top down to (not including)
// base into base (`qemu-img commit -d`), following the images' own backing
// references, at most rate bytes/s when rate > 0. The layers are left as
// they were.
func (t Tool) Commit(ctx context.Context, top, base string, rate int64) error {
	_, err := t.run(ctx, commitArgs(base, rate, top)...)
	return err
}

// CommitIn is Commit inside dir for a chain named explicitly, top first,
// by names relative to dir: chain[0 … base-1] go into chain[base], and no
// file outside the chain is opened, whatever the headers say. The chain is
// given down to its bottom, so that the base keeps its own backing file (a
// partial cluster written into it is completed from there). The names must
// be those the headers hold (relative, as this tool writes them): QEMU
// finds the base by the name its parent references.
func (t Tool) CommitIn(ctx context.Context, dir string, chain []Image, base int, rate int64) error {
	if base < 1 || base >= len(chain) {
		return nil
	}
	_, err := t.runIn(ctx, dir, commitArgs(chain[base].Path, rate, ImageOpts(formatOr(chain[0].Format), chain[0].Path, chain[1:]))...)
	return err
}

func commitArgs(base string, rate int64, image string) []string {
	args := []string{"commit", "-q", "-d", "-b", base}
	if rate > 0 {
		args = append(args, "-r", strconv.FormatInt(rate, 10))
	}
	return append(args, image)
}

// Flatten copies into image everything its backing files hold for it and
// drops its backing reference (`qemu-img rebase -b ""`, safe mode): the
// image then stands alone with the same content. Interrupted, the image
// still reads the same through its backing files.
func (t Tool) Flatten(ctx context.Context, image, format string) error {
	_, err := t.run(ctx, "rebase", "-q", "-f", formatOr(format), "-b", "", image)
	return err
}

// ErrLocked means a QEMU process holds the image open for writing.
var ErrLocked = errors.New("image in use by QEMU")

// qemuWriteLock is the byte QEMU's file locking locks (shared) in every
// image a QEMU process holds open with the write permission: 100 (its base
// for the permissions it takes) + 1 (the write permission's bit). qemu-img
// without -U refuses an image while that byte is locked.
const qemuWriteLock = 101

// CheckClosed reports whether QEMU is done with a qcow2 image it wrote (a
// backup target right after its job ended): ErrLocked while a QEMU process
// still holds it open for writing (QEMU's own lock, tested without taking
// it), an error when its header is not one QEMU would open or still says
// the image is dirty (not closed cleanly) or corrupt. It starts no process,
// so the caller can ask again every few milliseconds.
func CheckClosed(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: qemuWriteLock, Len: 1}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return fmt.Errorf("test QEMU's lock of %s: %w", path, err)
	}
	if lk.Type != unix.F_UNLCK {
		return fmt.Errorf("%w: %s", ErrLocked, path)
	}
	buf, err := readCluster(f)
	if err != nil {
		return err
	}
	h, err := parseHeader(buf)
	switch {
	case err != nil:
		return fmt.Errorf("%s: %w", path, err)
	case h.incompatible&incompatCorrupt != 0:
		return fmt.Errorf("%s: QEMU marked the image corrupt", path)
	case h.incompatible&incompatDirty != 0:
		return fmt.Errorf("%s: the image was not closed cleanly (dirty)", path)
	}
	return nil
}
