package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// The qcow2 header (docs/interop/qcow2.txt in QEMU), as QEMU 7.2 reads and
// rewrites it. All numbers are big-endian.
//
//	0  magic "QFI\xfb"          4  version (2 or 3)
//	8  backing_file_offset     16  backing_file_size
//	20 cluster_bits            24  size (virtual, bytes)
//	32 crypt_method            36  l1_size
//	40 l1_table_offset         48  refcount_table_offset
//	56 refcount_table_clusters 60  nb_snapshots
//	64 snapshots_offset        72  end of a version 2 header
//	72 incompatible_features   80  compatible_features
//	88 autoclear_features      96  refcount_order
//	100 header_length          104 compression_type (1 byte), 7 bytes padding
//	112 end of the header QEMU writes for version 3
//
// Header extensions (magic, length, data padded to 8 bytes) follow the
// header up to the backing file name, which must lie in the first cluster.
const (
	v2HeaderLen = 72
	v3MinLen    = 104 // header_length may not be smaller
	v3HeaderLen = 112 // what QEMU writes (sizeof(QCowHeader))

	minClusterBits = 9
	maxClusterBits = 21 // 2 MiB: the most that is ever read into memory

	maxBackingName = 1023 // QEMU refuses longer backing file names
	maxFormatLen   = 15   // QEMU keeps the backing format in a char[16]
)

// Header extension magics.
const (
	extEnd           = 0x00000000
	extBackingFormat = 0xe2792aca
	extFeatureTable  = 0x6803f857
	extCryptoHeader  = 0x0537be77
	extBitmaps       = 0x23852875
	extDataFile      = 0x44415441
)

// Feature bits QEMU 7.2 knows.
const (
	incompatDirty       = 1 << 0
	incompatCorrupt     = 1 << 1
	incompatDataFile    = 1 << 2
	incompatCompression = 1 << 3
	incompatExtL2       = 1 << 4
	incompatKnown       = incompatDirty | incompatCorrupt | incompatDataFile | incompatCompression | incompatExtL2

	autoclearBitmaps     = 1 << 0
	autoclearDataFileRaw = 1 << 1
	autoclearKnown       = autoclearBitmaps | autoclearDataFileRaw
)

const (
	cryptNone = 0
	cryptLUKS = 2

	compressionZlib = 0
	compressionZstd = 1

	maxL1Bytes       = 32 << 20 // QCOW_MAX_L1_SIZE
	maxRefTableBytes = 8 << 20  // QCOW_MAX_REFTABLE_SIZE
	snapshotHdrLen   = 40       // sizeof(QCowSnapshotHeader)
	maxSnapshots     = 65536
)

var magic = []byte{'Q', 'F', 'I', 0xfb}

// ErrNotQcow2 means the file has no qcow2 header (a raw image, say).
var ErrNotQcow2 = errors.New("not a qcow2 image")

// extension is a header extension QEMU does not know, kept as it is.
type extension struct {
	magic uint32
	data  []byte
}

// header is a parsed qcow2 header: the fields, and the extensions and
// backing file name of the first cluster.
type header struct {
	version          uint32
	clusterBits      uint32
	size             uint64
	cryptMethod      uint32
	l1Size           uint32
	l1Offset         uint64
	refcountOffset   uint64
	refcountClusters uint32
	nbSnapshots      uint32
	snapshotsOffset  uint64

	incompatible, compatible, autoclear uint64
	refcountOrder                       uint32
	headerLength                        uint32
	compressionType                     uint8
	unknownFields                       []byte // v3 header bytes past 112, kept

	backingFile   string // "" when there is none
	backingFormat string
	hasFormat     bool   // a backing format extension is present
	dataFile      string // external data file extension, as QEMU reads it
	hasDataFile   bool
	hasBitmaps    bool   // a bitmaps extension that QEMU loads
	bitmapsExt    []byte // its data
	hasCrypto     bool
	unknownExts   []extension // in file order
}

func (h *header) clusterSize() int { return 1 << h.clusterBits }

// readCluster reads the first cluster of f: the header, its extensions and
// the backing file name. Like QEMU, which reads past the end of a file as
// zeros, it pads a short file with zeros. A file without the qcow2 magic
// is ErrNotQcow2.
func readCluster(f io.ReaderAt) ([]byte, error) {
	first := make([]byte, v3HeaderLen)
	n, err := f.ReadAt(first, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if n < len(magic) || !bytes.Equal(first[:len(magic)], magic) {
		return nil, ErrNotQcow2
	}
	bits := binary.BigEndian.Uint32(first[20:24])
	if bits < minClusterBits || bits > maxClusterBits {
		return nil, fmt.Errorf("unsupported cluster size: 2^%d", bits)
	}
	buf := make([]byte, 1<<bits)
	if _, err := f.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return buf, nil
}

// readHeader opens path and parses its header.
func readHeader(path string) (*header, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf, err := readCluster(f)
	if err != nil {
		return nil, err
	}
	return parseHeader(buf)
}

// parseHeader parses the first cluster of a qcow2 image (buf: exactly one
// cluster, as readCluster returns it) with the checks QEMU 7.2 makes when
// it opens an image, so that what QEMU refuses is refused here too. It
// never panics, whatever buf holds.
func parseHeader(buf []byte) (*header, error) {
	if len(buf) < v3HeaderLen || !bytes.Equal(buf[:4], magic) {
		return nil, ErrNotQcow2
	}
	be := binary.BigEndian
	h := &header{
		version:          be.Uint32(buf[4:8]),
		clusterBits:      be.Uint32(buf[20:24]),
		size:             be.Uint64(buf[24:32]),
		cryptMethod:      be.Uint32(buf[32:36]),
		l1Size:           be.Uint32(buf[36:40]),
		l1Offset:         be.Uint64(buf[40:48]),
		refcountOffset:   be.Uint64(buf[48:56]),
		refcountClusters: be.Uint32(buf[56:60]),
		nbSnapshots:      be.Uint32(buf[60:64]),
		snapshotsOffset:  be.Uint64(buf[64:72]),
	}
	backingOffset := be.Uint64(buf[8:16])
	backingSize := be.Uint32(buf[16:20])

	if h.version < 2 || h.version > 3 {
		return nil, fmt.Errorf("unsupported qcow2 version %d", h.version)
	}
	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return nil, fmt.Errorf("unsupported cluster size: 2^%d", h.clusterBits)
	}
	cs := uint64(h.clusterSize())
	if uint64(len(buf)) != cs {
		return nil, fmt.Errorf("header buffer of %d bytes for a cluster of %d", len(buf), cs)
	}
	if h.version == 2 {
		h.refcountOrder = 4
		h.headerLength = v2HeaderLen
	} else {
		h.incompatible = be.Uint64(buf[72:80])
		h.compatible = be.Uint64(buf[80:88])
		h.autoclear = be.Uint64(buf[88:96])
		h.refcountOrder = be.Uint32(buf[96:100])
		h.headerLength = be.Uint32(buf[100:104])
		if h.headerLength < v3MinLen {
			return nil, errors.New("qcow2 header too short")
		}
	}
	if uint64(h.headerLength) > cs {
		return nil, errors.New("qcow2 header exceeds cluster size")
	}
	if h.headerLength > v3HeaderLen {
		h.unknownFields = bytes.Clone(buf[v3HeaderLen:h.headerLength])
	}
	if backingOffset > cs {
		return nil, errors.New("invalid backing file offset")
	}
	if h.headerLength > v3MinLen {
		h.compressionType = buf[104]
	}
	if err := h.checkFeatures(); err != nil {
		return nil, err
	}
	if err := h.checkTables(); err != nil {
		return nil, err
	}
	extEndOffset := cs
	if backingOffset != 0 {
		extEndOffset = backingOffset
	}
	if err := h.parseExtensions(buf, uint64(h.headerLength), extEndOffset); err != nil {
		return nil, err
	}
	if h.incompatible&incompatDataFile != 0 && !h.hasDataFile {
		return nil, errors.New("image needs an external data file but names none")
	}
	if h.incompatible&incompatDataFile == 0 && h.autoclear&autoclearDataFileRaw != 0 {
		return nil, errors.New("data-file-raw requires a data file")
	}
	if backingOffset != 0 {
		// The name must fit in the first cluster; QEMU keeps it as a C
		// string, so it ends at the first NUL byte.
		if uint64(backingSize) > min(maxBackingName, cs-backingOffset) {
			return nil, errors.New("backing file name too long")
		}
		name := buf[backingOffset : backingOffset+uint64(backingSize)]
		h.backingFile = string(cString(name))
	}
	return h, nil
}

// checkFeatures refuses feature combinations QEMU 7.2 cannot open.
func (h *header) checkFeatures() error {
	switch h.compressionType {
	case compressionZlib:
		if h.incompatible&incompatCompression != 0 {
			return errors.New("compression type incompatible feature bit must not be set")
		}
	case compressionZstd:
		if h.incompatible&incompatCompression == 0 {
			return errors.New("compression type incompatible feature bit must be set")
		}
	default:
		return fmt.Errorf("unknown compression type %d", h.compressionType)
	}
	if unknown := h.incompatible &^ incompatKnown; unknown != 0 {
		return fmt.Errorf("unsupported qcow2 feature(s): unknown incompatible feature: %x", unknown)
	}
	if h.incompatible&incompatExtL2 != 0 && h.clusterSize()/32 < 1<<minClusterBits {
		return fmt.Errorf("unsupported subcluster size: %d", h.clusterSize()/32)
	}
	if h.refcountOrder > 6 {
		return errors.New("reference count entry width too large; may not exceed 64 bits")
	}
	return nil
}

// checkTables makes QEMU's sanity checks of the tables the header points to
// (offsets aligned to clusters, sizes within QEMU's limits).
func (h *header) checkTables() error {
	cs := uint64(h.clusterSize())
	if h.refcountClusters == 0 {
		return errors.New("image does not contain a reference count table")
	}
	if err := checkTable(h.refcountOffset, uint64(h.refcountClusters), cs, maxRefTableBytes, cs, "reference count table"); err != nil {
		return err
	}
	if err := checkTable(h.snapshotsOffset, uint64(h.nbSnapshots), snapshotHdrLen, snapshotHdrLen*maxSnapshots, cs, "snapshot table"); err != nil {
		return err
	}
	if err := checkTable(h.l1Offset, uint64(h.l1Size), 8, maxL1Bytes, cs, "active L1 table"); err != nil {
		return err
	}
	// Every L2 table maps cluster_size/8 clusters (/16 with extended L2
	// entries); the L1 table must reach the end of the virtual disk.
	l2Bits := uint64(h.clusterBits) - 3
	if h.incompatible&incompatExtL2 != 0 {
		l2Bits--
	}
	shift := l2Bits + uint64(h.clusterBits)
	need := h.size >> shift
	if h.size&(1<<shift-1) != 0 {
		need++
	}
	if need > 1<<31-1 {
		return errors.New("image is too big")
	}
	if uint64(h.l1Size) < need {
		return errors.New("L1 table is too small")
	}
	return nil
}

// checkTable is QEMU's qcow2_validate_table.
func checkTable(offset, entries, entryLen, maxBytes, clusterSize uint64, name string) error {
	if entries > maxBytes/entryLen {
		return fmt.Errorf("%s too large", name)
	}
	const int64Max = 1<<63 - 1
	if int64Max-entries*entryLen < offset || offset%clusterSize != 0 {
		return fmt.Errorf("%s offset invalid", name)
	}
	return nil
}

// parseExtensions reads the header extensions in buf[start:end] as QEMU's
// qcow2_read_extensions does.
func (h *header) parseExtensions(buf []byte, start, end uint64) error {
	be := binary.BigEndian
	for off := start; off < end; {
		if off+8 > end {
			return errors.New("header extension too large")
		}
		m, n := be.Uint32(buf[off:off+4]), uint64(be.Uint32(buf[off+4:off+8]))
		off += 8
		if n > end-off {
			return errors.New("header extension too large")
		}
		data := buf[off : off+n]
		switch m {
		case extEnd:
			return nil
		case extBackingFormat:
			if n > maxFormatLen {
				return fmt.Errorf("backing format extension of %d bytes is too large", n)
			}
			h.backingFormat, h.hasFormat = string(cString(data)), true
		case extFeatureTable:
			// Only names for error messages; QEMU writes its own.
		case extCryptoHeader:
			if h.cryptMethod != cryptLUKS {
				return errors.New("crypto header extension only expected with LUKS encryption")
			}
			if n != 16 {
				return fmt.Errorf("crypto header extension of %d bytes, expected 16", n)
			}
			h.hasCrypto = true
		case extBitmaps:
			if n != 24 {
				return errors.New("bitmaps extension: invalid length")
			}
			if h.autoclear&autoclearBitmaps == 0 {
				// Written by a program without bitmap support: QEMU
				// considers the bitmaps inconsistent and drops the
				// extension.
				break
			}
			if err := checkBitmapsExt(data, uint64(h.clusterSize())); err != nil {
				return err
			}
			h.hasBitmaps, h.bitmapsExt = true, bytes.Clone(data)
		case extDataFile:
			h.dataFile, h.hasDataFile = string(cString(data)), true
		default:
			h.unknownExts = append(h.unknownExts, extension{magic: m, data: bytes.Clone(data)})
		}
		off += (n + 7) &^ 7
	}
	return nil
}

// checkBitmapsExt makes QEMU's checks of a bitmaps extension.
func checkBitmapsExt(data []byte, clusterSize uint64) error {
	be := binary.BigEndian
	count, reserved := be.Uint32(data[0:4]), be.Uint32(data[4:8])
	dirSize, dirOffset := be.Uint64(data[8:16]), be.Uint64(data[16:24])
	switch {
	case reserved != 0:
		return errors.New("bitmaps extension: reserved field is not zero")
	case count > 65535:
		return fmt.Errorf("bitmaps extension: %d bitmaps exceed the supported maximum", count)
	case count == 0:
		return errors.New("found bitmaps extension with zero bitmaps")
	case dirOffset%clusterSize != 0:
		return errors.New("bitmaps extension: invalid bitmap directory offset")
	case dirSize > 64<<20:
		return errors.New("bitmaps extension: bitmap directory too large")
	}
	return nil
}

// cString is b up to its first NUL byte: what QEMU keeps of a string it
// reads into a C buffer.
func cString(b []byte) []byte {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return b[:i]
	}
	return b
}
