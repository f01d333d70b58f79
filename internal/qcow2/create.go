package qcow2

import (
	"encoding/binary"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// The layout `qemu-img create -f qcow2` gives a new image with its defaults.
const (
	createClusterBits   = 16 // 64 KiB clusters
	createRefcountOrder = 4  // 16-bit refcounts
)

// Create makes path (created or truncated) the empty qcow2 image of size
// bytes (rounded up to 512, as QEMU keeps sizes in sectors) that
// `qemu-img create -f qcow2 [-b BACKING -F FORMAT -u] PATH SIZE` makes with
// its defaults (version 3, 64 KiB clusters, 16-bit refcounts, zlib, no
// preallocation), byte for byte (see the tests), without a process: with
// a backing reference (stored as given, e.g. relative to the image's
// directory) it is an overlay of it. Nothing is fsynced; a failed Create
// may leave a partial file at path.
func Create(path string, size int64, backing, format string) error {
	if err := createImage(path, size, backing, format); err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	return nil
}

func createImage(path string, size int64, backing, format string) error {
	if err := checkBackingArgs(backing, format); err != nil {
		return err
	}
	if size <= 0 {
		return fmt.Errorf("invalid size %d", size)
	}
	cs := int64(1) << createClusterBits
	size = (size + 511) / 512 * 512
	perL1 := cs * (cs / 8) // the bytes one L1 entry maps
	l1Size := (size + perL1 - 1) / perL1
	if l1Size*8 > 32*cs {
		return fmt.Errorf("size %d is too large", size)
	}
	// Cluster 0 the header, 1 the refcount table, 2 its one refcount
	// block, 3… the L1 table.
	h := &header{
		version: 3, clusterBits: createClusterBits, size: uint64(size),
		l1Size: uint32(l1Size), l1Offset: uint64(3 * cs),
		refcountOffset: uint64(cs), refcountClusters: 1,
		refcountOrder: createRefcountOrder,
	}
	head, err := h.rewrite(backing, format)
	if err != nil {
		return err
	}
	be := binary.BigEndian
	table := make([]byte, cs)
	be.PutUint64(table, uint64(2*cs))
	block := make([]byte, cs)
	used := 3 + (l1Size*8+cs-1)/cs
	for i := int64(0); i < used; i++ {
		be.PutUint16(block[2*i:], 1)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW, 0o644)
	if err != nil {
		return err
	}
	for i, c := range [][]byte{head, table, block} {
		if err == nil {
			_, err = f.WriteAt(c, int64(i)*cs)
		}
	}
	if err == nil {
		// The L1 table is all zeros: a hole reads as such.
		err = f.Truncate(3*cs + l1Size*8)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
