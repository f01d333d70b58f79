package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// imageFormats are the backing formats SetBacking writes: the image formats
// of QEMU 7.2 (`qemu-img --help`) that a file of a backing chain can have.
// qemu-img refuses names it does not know; protocol and filter drivers
// (file, nbd, throttle...) make no sense in an image header.
var imageFormats = map[string]bool{
	"bochs": true, "cloop": true, "dmg": true, "luks": true, "parallels": true,
	"qcow": true, "qcow2": true, "qed": true, "raw": true, "vdi": true,
	"vhdx": true, "vmdk": true, "vpc": true,
}

// ErrHeaderFull means the new backing file name (with the header and its
// extensions) does not fit in the image's first cluster; the image is left
// as it was. qemu-img says "No space left in the file header".
var ErrHeaderFull = errors.New("no space left in the file header")

// HeadMax bounds what SetBacking rewrites: the first cluster of an image,
// and a cluster is at most 2 MiB.
const HeadMax = 1 << maxClusterBits

// SetBacking makes the qcow2 image at path reference backing (format
// format) as its backing file, without touching any data: what
// `qemu-img rebase -u -f qcow2 -b backing -F format path` does, and byte
// for byte the same file as QEMU 7.2's qemu-img writes. backing "" removes
// the reference (format is then ignored, as qemu-img does); otherwise the
// format is required.
//
// Like qemu-img it rewrites the whole first cluster: the header (unknown
// autoclear feature bits cleared, the header length of a version 3 image
// brought to 112 bytes plus any fields QEMU does not know), the backing
// format extension, the external data file name, QEMU's feature name table
// (version 3 with clusters over 4 KiB), unknown extensions (in the reverse
// of their order in the file, as QEMU keeps them), the end marker and the
// name; the rest of the cluster is zeroed. Then the file is fdatasync'ed
// (qemu-img flushes when it closes the image), so the new reference is
// durable when SetBacking returns.
//
// Persistent dirty bitmaps (libvirt checkpoints) are the one difference:
// qemu-img loads them when it opens the image and stores them again when it
// closes it, at newly allocated clusters, so its file differs beyond the
// header. SetBacking leaves them where they are and keeps the bitmaps
// extension (and its autoclear bit) as it is: the data they describe does
// not change. The file is then the one qemu-img writes but for the bitmap
// directory's place; qemu-img check finds it clean and lists the same
// bitmaps (see the tests).
//
// Images that qemu-img would change beyond the header otherwise, or would
// refuse, are refused with an error and left untouched: not closed cleanly
// (dirty bit: qemu-img repairs refcounts first), marked corrupt, encrypted,
// a raw external data file given a backing file, unknown incompatible
// features. SetBacking takes no lock: the image must not be in use, as for
// qemu-img rebase.
func SetBacking(path, backing, format string) error {
	if err := setBacking(path, backing, format); err != nil {
		return fmt.Errorf("set backing file of %s to %q: %w", path, backing, err)
	}
	return nil
}

func setBacking(path, backing, format string) error {
	if err := checkBackingArgs(backing, format); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf, err := readCluster(f)
	if err != nil {
		return err
	}
	h, err := parseHeader(buf)
	if err != nil {
		return err
	}
	if err := h.checkWritable(backing); err != nil {
		return err
	}
	out, err := h.rewrite(backing, format)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(out, 0); err != nil {
		return err
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("fdatasync: %w", err)
	}
	return f.Close()
}

// checkBackingArgs refuses what qemu-img rebase refuses, before the image
// is opened.
func checkBackingArgs(backing, format string) error {
	if backing == "" {
		return nil
	}
	switch {
	case strings.IndexByte(backing, 0) >= 0:
		return errors.New("backing file name contains a NUL byte")
	case len(backing) > maxBackingName:
		return fmt.Errorf("backing file name of %d bytes: at most %d are possible", len(backing), maxBackingName)
	case format == "":
		return errors.New("backing format must be specified")
	case !imageFormats[format]:
		return fmt.Errorf("invalid format name: %q", format)
	}
	return nil
}

// checkWritable refuses the images that qemu-img rebase -u would not open
// for writing, or would change beyond the first cluster.
func (h *header) checkWritable(backing string) error {
	switch {
	case h.incompatible&incompatCorrupt != 0:
		return errors.New("image is corrupt; cannot be opened read/write")
	case h.incompatible&incompatDirty != 0:
		return errors.New("image was not closed cleanly (dirty bit set): qemu-img would repair its refcounts; run qemu-img check -r all first")
	case h.cryptMethod != cryptNone || h.hasCrypto:
		return errors.New("encrypted images are not supported")
	case backing != "" && h.autoclear&autoclearDataFileRaw != 0:
		return errors.New("an image whose external data file is raw cannot have a backing file")
	}
	return nil
}

// featureTable is the feature name table QEMU 7.2 writes: entries of one
// byte type (0 incompatible, 1 compatible, 2 autoclear), one byte bit
// number and a 46-byte, NUL-padded name.
var featureTable = func() []byte {
	features := []struct {
		typ, bit byte
		name     string
	}{
		{0, 0, "dirty bit"},
		{0, 1, "corrupt bit"},
		{0, 2, "external data file"},
		{0, 3, "compression type"},
		{0, 4, "extended L2 entries"},
		{1, 0, "lazy refcounts"},
		{2, 0, "bitmaps"},
		{2, 1, "raw external data"},
	}
	t := make([]byte, 0, 48*len(features))
	for _, f := range features {
		var e [48]byte
		e[0], e[1] = f.typ, f.bit
		copy(e[2:], f.name)
		t = append(t, e[:]...)
	}
	return t
}()

// rewrite returns the first cluster as QEMU's qcow2_update_header writes
// it after the backing reference was changed to backing and format.
func (h *header) rewrite(backing, format string) ([]byte, error) {
	be := binary.BigEndian
	out := make([]byte, h.clusterSize())
	copy(out, magic)
	be.PutUint32(out[4:], h.version)
	be.PutUint32(out[20:], h.clusterBits)
	be.PutUint64(out[24:], h.size/512*512) // QEMU keeps the size in sectors
	be.PutUint32(out[32:], h.cryptMethod)
	be.PutUint32(out[36:], h.l1Size)
	be.PutUint64(out[40:], h.l1Offset)
	be.PutUint64(out[48:], h.refcountOffset)
	be.PutUint32(out[56:], h.refcountClusters)
	be.PutUint32(out[60:], h.nbSnapshots)
	be.PutUint64(out[64:], h.snapshotsOffset)
	w := clusterWriter{buf: out, pos: v2HeaderLen}
	if h.version >= 3 {
		be.PutUint64(out[72:], h.incompatible)
		be.PutUint64(out[80:], h.compatible)
		be.PutUint64(out[88:], h.autoclear&autoclearKnown) // QEMU clears the bits it does not know
		be.PutUint32(out[96:], h.refcountOrder)
		be.PutUint32(out[100:], uint32(v3HeaderLen+len(h.unknownFields)))
		out[104] = h.compressionType
		w.pos = v3HeaderLen
		w.put(h.unknownFields)
	}
	if backing != "" {
		w.ext(extBackingFormat, []byte(format))
	}
	if h.incompatible&incompatDataFile != 0 && h.hasDataFile {
		w.ext(extDataFile, []byte(h.dataFile))
	}
	if h.version >= 3 && h.clusterSize() > 4096 {
		w.ext(extFeatureTable, featureTable)
	}
	if h.hasBitmaps {
		w.ext(extBitmaps, h.bitmapsExt)
	}
	for i := len(h.unknownExts) - 1; i >= 0; i-- {
		w.ext(h.unknownExts[i].magic, h.unknownExts[i].data)
	}
	w.ext(extEnd, nil)
	if backing != "" {
		off := w.pos
		w.put([]byte(backing))
		be.PutUint64(out[8:], uint64(off))
		be.PutUint32(out[16:], uint32(len(backing)))
	}
	if w.full {
		return nil, ErrHeaderFull
	}
	return out, nil
}

// clusterWriter appends to a zeroed cluster and notes when something does
// not fit.
type clusterWriter struct {
	buf  []byte
	pos  int
	full bool
}

func (w *clusterWriter) put(b []byte) {
	if w.full || len(b) > len(w.buf)-w.pos {
		w.full = true
		return
	}
	w.pos += copy(w.buf[w.pos:], b)
}

// ext appends a header extension: magic, length, data padded to 8 bytes.
func (w *clusterWriter) ext(m uint32, data []byte) {
	padded := (len(data) + 7) &^ 7
	if w.full || 8+padded > len(w.buf)-w.pos {
		w.full = true
		return
	}
	binary.BigEndian.PutUint32(w.buf[w.pos:], m)
	binary.BigEndian.PutUint32(w.buf[w.pos+4:], uint32(len(data)))
	copy(w.buf[w.pos+8:], data)
	w.pos += 8 + padded
}
