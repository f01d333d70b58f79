package qcow2

import (
	"bytes"
	"encoding/binary"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// seedImage is the first cluster of a small, valid image built from
// scratch (no qemu-img needed): 1 MiB virtual size, the tables right after
// the header cluster.
func seedImage(t testing.TB, version, clusterBits uint32, backing, format string, exts ...extension) []byte {
	t.Helper()
	cs := uint64(1) << clusterBits
	h := &header{
		version:          version,
		clusterBits:      clusterBits,
		size:             1 << 20,
		l1Size:           64,
		l1Offset:         3 * cs,
		refcountOffset:   cs,
		refcountClusters: 1,
		refcountOrder:    4,
		unknownExts:      exts,
	}
	out, err := h.rewrite(backing, format)
	require.NoError(t, err)
	return out
}

// seeds are the fuzz test's seed corpus, which every normal test run checks.
func seeds(t testing.TB) [][]byte {
	v3 := seedImage(t, 3, 16, "base image.qcow2", "qcow2", extension{0x12345678, []byte("unknown")})
	dataFile := bytes.Clone(seedImage(t, 3, 12, "", ""))
	binary.BigEndian.PutUint64(dataFile[72:], incompatDataFile)
	writeExts(dataFile, testExt{extDataFile, []byte("data.raw")})
	longHeader := bytes.Clone(seedImage(t, 3, 9, "", ""))
	binary.BigEndian.PutUint32(longHeader[100:], 120)
	bitmaps := bytes.Clone(seedImage(t, 3, 9, "", ""))
	binary.BigEndian.PutUint64(bitmaps[88:], autoclearBitmaps)
	writeExts(bitmaps, testExt{extBitmaps, binary.BigEndian.AppendUint64(
		binary.BigEndian.AppendUint64([]byte{0, 0, 0, 1, 0, 0, 0, 0}, 64), 4096)})
	return [][]byte{
		v3,
		v3[:200],
		seedImage(t, 2, 9, "../other/base", "raw"),
		seedImage(t, 3, 9, "", ""),
		seedImage(t, 3, 12, "/abs/base.qcow2", "qcow2", extension{1, nil}, extension{2, []byte{1, 2, 3}}),
		dataFile,
		longHeader,
		bitmaps,
		[]byte("QFI\xfb"),
		[]byte("not an image at all"),
		nil,
	}
}

// FuzzHeader feeds garbage to the header reader behind BackingFile, Chain
// and SetBacking: it must never panic, and whatever it accepts and
// SetBacking would write must read back with the new reference and the
// same fields. `go test -fuzz=FuzzHeader ./internal/qcow2/` explores; a
// normal test run checks the seed corpus.
func FuzzHeader(f *testing.F) {
	for _, s := range seeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		_, _ = probe(r, "fuzz", int64(len(data)))
		buf, err := readCluster(r)
		if err != nil {
			return
		}
		h, err := parseHeader(buf)
		if err != nil {
			return
		}
		for _, name := range []string{"", "new backing file"} {
			if h.checkWritable(name) != nil {
				continue
			}
			out, err := h.rewrite(name, "qcow2")
			if err != nil {
				require.ErrorIs(t, err, ErrHeaderFull)
				continue
			}
			require.Len(t, out, h.clusterSize())
			again, err := parseHeader(out)
			require.NoError(t, err, "SetBacking would write a header it cannot read")
			assert.Equal(t, name, again.backingFile)
			if name != "" {
				assert.Equal(t, "qcow2", again.backingFormat)
			}
			assertSameImage(t, h, again)
		}
	})
}

// assertSameImage checks that a rewrite kept everything but the backing
// reference, as QEMU rewrites it.
func assertSameImage(t *testing.T, before, after *header) {
	t.Helper()
	assert.Equal(t, before.version, after.version)
	assert.Equal(t, before.clusterBits, after.clusterBits)
	assert.Equal(t, before.size/512*512, after.size)
	assert.Equal(t, before.l1Size, after.l1Size)
	assert.Equal(t, before.l1Offset, after.l1Offset)
	assert.Equal(t, before.refcountOffset, after.refcountOffset)
	assert.Equal(t, before.refcountClusters, after.refcountClusters)
	assert.Equal(t, before.nbSnapshots, after.nbSnapshots)
	assert.Equal(t, before.snapshotsOffset, after.snapshotsOffset)
	assert.Equal(t, before.incompatible, after.incompatible)
	assert.Equal(t, before.compatible, after.compatible)
	assert.Equal(t, before.autoclear&autoclearKnown, after.autoclear)
	assert.Equal(t, before.refcountOrder, after.refcountOrder)
	assert.Equal(t, before.compressionType, after.compressionType)
	assert.Equal(t, before.unknownFields, after.unknownFields)
	assert.Equal(t, before.hasBitmaps, after.hasBitmaps)
	assert.Equal(t, before.bitmapsExt, after.bitmapsExt)
	if before.incompatible&incompatDataFile != 0 {
		assert.Equal(t, before.dataFile, after.dataFile)
	} else { // QEMU drops a data file extension without its feature bit
		assert.False(t, after.hasDataFile)
	}
	want := slices.Clone(before.unknownExts)
	slices.Reverse(want)
	assert.Equal(t, len(want), len(after.unknownExts))
	for i := range min(len(want), len(after.unknownExts)) {
		assert.Equal(t, want[i].magic, after.unknownExts[i].magic)
		assert.True(t, bytes.Equal(want[i].data, after.unknownExts[i].data))
	}
}

// TestSeedsParse: the seeds are what they claim to be, so the fuzz test
// starts from images that get past the header checks.
func TestSeedsParse(t *testing.T) {
	s := seeds(t)
	for i, want := range []string{"base image.qcow2", "", "../other/base", "", "/abs/base.qcow2", "", ""} {
		buf, err := readCluster(bytes.NewReader(s[i]))
		require.NoError(t, err, "seed %d", i)
		h, err := parseHeader(buf)
		require.NoError(t, err, "seed %d", i)
		assert.Equal(t, want, h.backingFile, "seed %d", i)
	}
	buf, err := readCluster(bytes.NewReader(s[7]))
	require.NoError(t, err)
	h, err := parseHeader(buf)
	require.NoError(t, err)
	assert.True(t, h.hasBitmaps)
}
