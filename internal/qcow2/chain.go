package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Chain walks the backing chain of the image at path natively, reading
// headers, and returns it top first, as
// `qemu-img info --backing-chain --output=json -U` on the absolute path
// would list it (filename and format of each element):
//
//   - the top is path made absolute (filepath.Abs);
//   - a backing file name is taken as QEMU 7.2 takes it: an absolute name
//     as it is; a relative one appended to the directory of the image that
//     names it, the way qemu-img builds its full-backing-filename (no
//     cleaning: "/d/./x" and "/d/../e/x" stay as they are);
//   - an element's format is the one its parent's backing format extension
//     names; without one (and for the top) it is probed as QEMU does:
//     qcow2 by its magic, raw for anything that no other image format
//     claims; a raw file ends the chain.
//
// A missing or unreadable link is an error, never a shorter chain; so are a
// loop, a backing file name with a protocol prefix ("nbd:", "json:"...), and
// any format other than qcow2 and raw (qemu-img could read it; this walk
// cannot, so it says so instead of guessing: those errors wrap
// ErrUnsupported, and a caller may ask qemu-img instead).
func Chain(path string) ([]Image, error) {
	name, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	var chain []Image
	seen := map[[2]uint64]bool{}
	format := "" // probe
	for {
		img, backing, backingFormat, err := chainElement(name, format, seen)
		if err != nil {
			if len(chain) > 0 {
				prev := chain[len(chain)-1]
				return nil, fmt.Errorf("backing file of %s: %w", prev.Path, err)
			}
			return nil, err
		}
		chain = append(chain, img)
		if backing == "" {
			return chain, nil
		}
		next, err := fullBackingName(name, backing)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		name, format = next, backingFormat
	}
}

// ErrUnsupported means a chain holds what Chain does not read (another
// image format, a protocol such as nbd:) though qemu-img might.
var ErrUnsupported = errors.New("not supported")

// chainElement opens one element of a chain, checks it against the ones
// seen before (by device and inode: different names can reach one file)
// and returns it with its backing reference, if any.
func chainElement(name, format string, seen map[[2]uint64]bool) (img Image, backing, backingFormat string, err error) {
	// O_NONBLOCK: opening a FIFO must not hang the walk.
	f, err := os.OpenFile(name, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return Image{}, "", "", err
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return Image{}, "", "", fmt.Errorf("%s: %w", name, err)
	}
	if t := st.Mode & unix.S_IFMT; t != unix.S_IFREG && t != unix.S_IFBLK {
		return Image{}, "", "", fmt.Errorf("%s: not a regular file or block device", name)
	}
	id := [2]uint64{st.Dev, st.Ino}
	if seen[id] {
		return Image{}, "", "", fmt.Errorf("%s: backing file creates an infinite loop", name)
	}
	seen[id] = true
	if format == "" {
		format, err = probe(f, name, st.Size)
		if err != nil {
			return Image{}, "", "", fmt.Errorf("%s: %w", name, err)
		}
	}
	img = Image{Path: name, Format: format}
	switch format {
	case "raw":
		return img, "", "", nil
	case "qcow2":
	default:
		return Image{}, "", "", fmt.Errorf("%s: image format %q is %w", name, format, ErrUnsupported)
	}
	buf, err := readCluster(f)
	if err != nil {
		return Image{}, "", "", fmt.Errorf("%s: %w", name, err)
	}
	h, err := parseHeader(buf)
	if err != nil {
		return Image{}, "", "", fmt.Errorf("%s: %w", name, err)
	}
	// An empty backing format extension means no format: probe.
	return img, h.backingFile, h.backingFormat, nil
}

// fullBackingName is QEMU's full backing filename of backing, named by the
// image at current (an absolute path): absolute names as they are, relative
// ones appended to current's directory (everything up to its last '/').
func fullBackingName(current, backing string) (string, error) {
	if hasProtocol(backing) {
		return "", fmt.Errorf("backing file name %q has a protocol prefix: %w", backing, ErrUnsupported)
	}
	if strings.HasPrefix(backing, "/") {
		return backing, nil
	}
	return current[:strings.LastIndexByte(current, '/')+1] + backing, nil
}

// hasProtocol is QEMU's path_has_protocol: a ':' before any '/'.
func hasProtocol(name string) bool {
	i := strings.IndexAny(name, ":/")
	return i >= 0 && name[i] == ':'
}

// otherFormats are the signatures by which QEMU's format probes recognise
// images that are neither qcow2 nor raw.
var otherFormats = []struct {
	off    int
	sig    string
	format string
}{
	{0, "QED\x00", "qed"},
	{0, "KDMV", "vmdk"},
	{0, "COWD", "vmdk"},
	{0, "# Disk DescriptorFile", "vmdk"},
	{0x40, "\x7f\x10\xda\xbe", "vdi"},
	{0, "conectix", "vpc"},
	{0, "vhdxfile", "vhdx"},
	{0, "LUKS\xba\xbe", "luks"},
	{0, "WithoutFreeSpace", "parallels"},
	{0, "WithouFreSpacExt", "parallels"},
	{0, "Bochs Virtual HD Image", "bochs"},
	{0, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n", "cloop"},
}

// probe guesses an image's format from its first bytes, as QEMU does when
// no format is given: qcow2 for a qcow2 magic with version 2 or later (and
// at least a whole header), raw when no format claims the file. Formats
// this package cannot read are errors.
func probe(f io.ReaderAt, name string, size int64) (string, error) {
	buf := make([]byte, 2048)
	n, err := f.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", err
	}
	buf = buf[:n]
	if len(buf) >= 8 && bytes.Equal(buf[:4], magic) {
		version := binary.BigEndian.Uint32(buf[4:8])
		switch {
		case version >= 2 && size >= v3HeaderLen:
			return "qcow2", nil
		case version == 1:
			return "", fmt.Errorf(`image format "qcow" is %w`, ErrUnsupported)
		}
	}
	for _, o := range otherFormats {
		if len(buf) >= o.off+len(o.sig) && string(buf[o.off:o.off+len(o.sig)]) == o.sig {
			return "", fmt.Errorf("image format %q is %w", o.format, ErrUnsupported)
		}
	}
	if strings.HasSuffix(name, ".dmg") {
		return "", fmt.Errorf(`image format "dmg" is %w`, ErrUnsupported)
	}
	return "raw", nil
}
