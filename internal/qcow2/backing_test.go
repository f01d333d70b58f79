package qcow2

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// target is a backing reference to set.
type target struct {
	name, format string
}

// odd backing file names: spaces, quotes, backslashes, UTF-8, a newline, a
// colon, relative and absolute.
var oddNames = []string{
	"base.qcow2",
	"x",
	"new name with spaces.qcow2",
	`it's "quoted".qcow2`,
	`back\slash\\.qcow2`,
	"ünïcødé 日本語.qcow2",
	"new\nline.qcow2",
	"a:b.qcow2",
	"../other dir/base.qcow2",
	"./sub/./base",
	"/var/lib/libvirt/images/base.qcow2",
}

// targets returns every odd name in both formats, removal, the errors of
// a missing or unknown format, and names of the given lengths (at and past
// a limit).
func targets(lengths ...int) []target {
	var ts []target
	for _, n := range oddNames {
		ts = append(ts, target{n, "qcow2"})
	}
	ts = append(ts, target{"base.raw", "raw"}, target{"", ""}, target{"", "qcow2"},
		target{"no format", ""}, target{"bad format", "qcow3"})
	return append(ts, lengthTargets(lengths)...)
}

// fewTargets is for the kinds of images where the name does not matter
// much: a short name, an odd one in the other format, removal, and names
// of the given lengths.
func fewTargets(lengths ...int) []target {
	ts := []target{{"base.qcow2", "qcow2"}, {"ünïcødé name with spaces.qcow2", "raw"}, {"", ""}}
	return append(ts, lengthTargets(lengths)...)
}

func lengthTargets(lengths []int) []target {
	var ts []target
	for _, n := range lengths {
		ts = append(ts, target{longName(n), "qcow2"})
	}
	return ts
}

// longName is a relative name of n bytes.
func longName(n int) string {
	return "dir/" + strings.Repeat("n", n-len("dir/.qcow2")) + ".qcow2"
}

// imageKind makes one kind of image without a backing reference.
type imageKind struct {
	name    string
	make    func(t *testing.T, path string)
	targets []target
}

func plain(opts string) func(t *testing.T, path string) {
	return func(t *testing.T, path string) { create(t, path, opts, "", "") }
}

// crafted makes a default image and edits its first cluster.
func crafted(edit func(c []byte)) func(t *testing.T, path string) {
	return func(t *testing.T, path string) {
		create(t, path, "", "", "")
		editHeader(t, path, edit)
	}
}

func imageKinds(t *testing.T) []imageKind {
	dataDir := t.TempDir() // absolute, so copies of the image find it
	short := fewTargets(1023)
	return []imageKind{
		{"v3", plain(""), targets(1023, 1024)},
		{"v2 compat=0.10", plain("compat=0.10"), targets(1023, 1024)},
		{"v3 4 KiB clusters, no feature table", plain("cluster_size=4k"), fewTargets(1023, 1024)},
		// 512 - 112 header - 16 format extension - 8 end marker = 376
		{"v3 512-byte clusters", plain("cluster_size=512"), fewTargets(376, 377)},
		{"v2 512-byte clusters", plain("compat=0.10,cluster_size=512"), fewTargets(416, 417)},
		{"v3 2 MiB clusters", plain("cluster_size=2M"), short},
		{"lazy refcounts, zstd, extended L2, 64-bit refcounts", plain("lazy_refcounts=on,compression_type=zstd,extended_l2=on,refcount_bits=64"), short},
		{"1-bit refcounts", plain("refcount_bits=1"), short},
		{"preallocated metadata", func(t *testing.T, path string) {
			mustQemuImg(t, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, "1M")
		}, short},
		{"external data file", func(t *testing.T, path string) {
			create(t, path, "data_file="+filepath.Join(dataDir, "data file.raw"), "", "")
		}, short},
		{"raw external data file", func(t *testing.T, path string) {
			create(t, path, "data_file="+filepath.Join(dataDir, "raw data.raw")+",data_file_raw=on", "", "")
		}, short},
		{"with data and an internal snapshot", func(t *testing.T, path string) {
			create(t, path, "", "", "")
			out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", path).CombinedOutput()
			require.NoError(t, err, "%s", out)
			mustQemuImg(t, "snapshot", "-c", "before", path)
		}, short},
		{"unknown extensions (QEMU keeps them, reversed)", crafted(func(c []byte) {
			writeExts(c, testExt{0x11111111, []byte("first")}, testExt{0x22222222, []byte("second, longer")},
				testExt{extFeatureTable, featureTable}, testExt{0x33333333, nil})
		}), short},
		// 65536 - 112 - 16 - 392 - 64008 - 8 = 1000 bytes left for the name
		{"unknown extension filling the cluster", crafted(func(c []byte) {
			writeExts(c, testExt{0x44444444, bytes.Repeat([]byte{0xab}, 64000)}, testExt{extFeatureTable, featureTable})
		}), fewTargets(1000, 1001)},
		{"unknown autoclear bits (QEMU clears them)", crafted(func(c []byte) {
			binary.BigEndian.PutUint64(c[88:], 1<<2|1<<5)
		}), short},
		{"bitmaps autoclear bit without bitmaps", crafted(func(c []byte) {
			binary.BigEndian.PutUint64(c[88:], autoclearBitmaps)
		}), short},
		{"unknown compatible bits", crafted(func(c []byte) {
			binary.BigEndian.PutUint64(c[80:], 1<<0|1<<7)
		}), short},
		{"header length 104 (no compression type)", crafted(func(c []byte) {
			binary.BigEndian.PutUint32(c[100:], 104)
			writeExts(c, testExt{extFeatureTable, featureTable})
		}), short},
		{"header length 128 (fields QEMU does not know)", crafted(func(c []byte) {
			binary.BigEndian.PutUint32(c[100:], 128)
			copy(c[112:128], "future fields!!!")
			writeExts(c, testExt{extFeatureTable, featureTable})
		}), short},
		{"size not a multiple of 512", crafted(func(c []byte) {
			binary.BigEndian.PutUint64(c[24:], 16<<20+1000)
		}), short},
		{"bitmaps extension without its autoclear bit (QEMU drops it)", func(t *testing.T, path string) {
			create(t, path, "", "", "")
			mustQemuImg(t, "bitmap", "--add", path, "b0")
			editHeader(t, path, func(c []byte) { binary.BigEndian.PutUint64(c[88:], 0) })
		}, short},
		{"a format extension naming nothing", crafted(func(c []byte) {
			writeExts(c, testExt{extBackingFormat, nil}, testExt{extFeatureTable, featureTable})
		}), short},
	}
}

// starts are the backing references an image has before the rewrite:
// none, a short one and a long one (so that the new name is longer, then
// shorter, than the old).
var starts = []struct {
	what string
	target
}{{"none", target{"", ""}}, {"short", target{"b", "qcow2"}}, {"long", target{longName(300), "raw"}}} // 300 fits in 512-byte clusters

// startsFor picks the starts for a kind of image: all three where every
// odd name is tried; no reference and a long one where names of the limit's
// length are; only no reference for the kinds that are about other parts
// of the header (each takes a qemu-img run per target).
func startsFor(kind imageKind) []int {
	switch {
	case len(kind.targets) >= 10:
		return []int{0, 1, 2}
	case len(kind.targets) > len(fewTargets(1023)):
		return []int{0, 2}
	}
	return []int{0}
}

// TestSetBackingMatchesQemuImg rewrites copies of many kinds of images with
// qemu-img rebase -u and with SetBacking and compares the files with cmp:
// they must be identical, and where qemu-img refuses SetBacking must refuse
// too and leave the file untouched.
func TestSetBackingMatchesQemuImg(t *testing.T) {
	t.Parallel()
	for _, kind := range imageKinds(t) {
		t.Run(kind.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			orig := filepath.Join(dir, "image.qcow2")
			kind.make(t, orig)
			for _, i := range startsFor(kind) {
				from := starts[i]
				start := orig
				if from.name != "" {
					start = filepath.Join(dir, "start-"+from.what)
					copyFile(t, orig, start)
					if out, err := qemuImg(t, "rebase", "-u", "-f", "qcow2", "-b", from.name, "-F", from.format, start); err != nil {
						// A raw external data file takes no backing file.
						t.Logf("no start %s: %s", from.what, out)
						continue
					}
				}
				for _, to := range kind.targets {
					compareWithQemuImg(t, start, to, "from "+from.what+" to "+describe(to))
				}
			}
		})
	}
}

func describe(tg target) string {
	n := tg.name
	if len(n) > 40 {
		n = fmt.Sprintf("%s… (%d bytes)", n[:20], len(n))
	}
	return fmt.Sprintf("%q (%s)", n, tg.format)
}

// compareWithQemuImg rebases two copies of src, one with qemu-img and one
// with SetBacking, and compares them.
func compareWithQemuImg(t *testing.T, src string, to target, what string) {
	t.Helper()
	dir := t.TempDir()
	withQemu, native := filepath.Join(dir, "qemu-img"), filepath.Join(dir, "native")
	copyFile(t, src, withQemu)
	copyFile(t, src, native)
	args := []string{"rebase", "-u", "-f", "qcow2", "-b", to.name}
	if to.format != "" {
		args = append(args, "-F", to.format)
	}
	out, qerr := qemuImg(t, append(args, withQemu)...)
	nerr := SetBacking(native, to.name, to.format)
	if qerr != nil {
		if assert.Error(t, nerr, "%s: qemu-img refused (%s), SetBacking must refuse too", what, bytes.TrimSpace(out)) {
			t.Logf("%s: qemu-img: %s; SetBacking: %v", what, bytes.TrimSpace(out), nerr)
		}
		assertSameFile(t, src, native, what+": a refused rewrite must not touch the file")
		return
	}
	if !assert.NoError(t, nerr, "%s: qemu-img succeeded", what) {
		return
	}
	assertSameFile(t, withQemu, native, what)
	got, err := BackingFile(native)
	require.NoError(t, err, what)
	assert.Equal(t, to.name, got, what)
}

// assertSameFile compares two files with the real cmp(1).
func assertSameFile(t *testing.T, a, b, what string) {
	t.Helper()
	out, err := exec.Command("cmp", a, b).CombinedOutput()
	assert.NoError(t, err, "%s: %s", what, out)
}

// TestSetBackingRefuses: images that qemu-img would change beyond the
// header (dirty bit: refcount repair), or cannot open for writing, are
// refused, with a reason, and left untouched.
func TestSetBackingRefuses(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cases := []struct {
		name, want string
		make       func(path string)
	}{
		{"dirty", "not closed cleanly", func(p string) {
			create(t, p, "lazy_refcounts=on", "", "")
			editHeader(t, p, func(c []byte) { binary.BigEndian.PutUint64(c[72:], incompatDirty) })
		}},
		{"corrupt", "corrupt", func(p string) {
			create(t, p, "", "", "")
			editHeader(t, p, func(c []byte) { binary.BigEndian.PutUint64(c[72:], incompatCorrupt) })
		}},
		{"encrypted", "encrypted", func(p string) {
			args := []string{"create", "-q", "--object", "secret,id=s0,data=secret", "-f", "qcow2",
				"-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", p, "16M"}
			// qemu-img times a PBKDF run with the thread's CPU clock to
			// size the key slots; on a busy machine it can read no CPU
			// time at all and gives up. That says nothing about the image
			// code under test: ask again, a bounded number of times.
			var out []byte
			var err error
			for i := 0; i < 5; i++ {
				if out, err = qemuImg(t, args...); err == nil || !bytes.Contains(out, []byte("Unable to get accurate CPU usage")) {
					break
				}
			}
			require.NoError(t, err, "qemu-img %q: %s", args, out)
		}},
		{"crypt method in the header", "encrypted", func(p string) {
			create(t, p, "", "", "")
			editHeader(t, p, func(c []byte) { binary.BigEndian.PutUint32(c[32:], cryptLUKS) })
		}},
		{"unknown incompatible feature", "unsupported qcow2 feature", func(p string) {
			create(t, p, "", "", "")
			editHeader(t, p, func(c []byte) { binary.BigEndian.PutUint64(c[72:], 1<<20) })
		}},
		{"version 4", "unsupported qcow2 version", func(p string) {
			create(t, p, "", "", "")
			editHeader(t, p, func(c []byte) { binary.BigEndian.PutUint32(c[4:], 4) })
		}},
		{"raw file", "not a qcow2 image", func(p string) {
			require.NoError(t, os.WriteFile(p, bytes.Repeat([]byte("raw disk"), 8192), 0o644))
		}},
		{"empty file", "not a qcow2 image", func(p string) {
			require.NoError(t, os.WriteFile(p, nil, 0o644))
		}},
	}
	for _, tc := range cases {
		p := filepath.Join(dir, tc.name)
		tc.make(p)
		before, err := os.ReadFile(p)
		require.NoError(t, err)
		err = SetBacking(p, "base.qcow2", "qcow2")
		assert.ErrorContains(t, err, tc.want, tc.name)
		assert.ErrorContains(t, err, p, "the error names the file")
		after, err := os.ReadFile(p)
		require.NoError(t, err)
		assert.True(t, bytes.Equal(before, after), "%s: the file was changed", tc.name)
	}
	err := SetBacking(filepath.Join(dir, "missing"), "b", "qcow2")
	assert.ErrorIs(t, err, os.ErrNotExist)
}

// TestSetBackingKeepsBitmaps: qemu-img rebase -u loads an image's
// persistent bitmaps and stores them again at new clusters; SetBacking
// leaves them where they are. Its file differs from the original in the
// first cluster only, its header is qemu-img's but for the bitmap
// directory's offset, qemu-img check finds it clean, and qemu-img info
// lists the same bitmaps and backing reference as for qemu-img's file.
func TestSetBackingKeepsBitmaps(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	orig := filepath.Join(dir, "orig.qcow2")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "old base.qcow2"), nil, 0o644))
	require.NoError(t, os.Truncate(filepath.Join(dir, "old base.qcow2"), 16<<20))
	create(t, orig, "", "old base.qcow2", "raw")
	mustQemuImg(t, "bitmap", "--add", orig, "daily")
	mustQemuImg(t, "bitmap", "--add", "--granularity", "128k", orig, "weekly")
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 1M", orig).CombinedOutput()
	require.NoError(t, err, "%s", out)
	withQemu, native := filepath.Join(dir, "qemu-img"), filepath.Join(dir, "native")
	copyFile(t, orig, withQemu)
	copyFile(t, orig, native)
	mustQemuImg(t, "rebase", "-u", "-f", "qcow2", "-b", "new base.qcow2", "-F", "qcow2", withQemu)
	require.NoError(t, SetBacking(native, "new base.qcow2", "qcow2"))

	before, err := os.ReadFile(orig)
	require.NoError(t, err)
	after, err := os.ReadFile(native)
	require.NoError(t, err)
	byQemu, err := os.ReadFile(withQemu)
	require.NoError(t, err)
	cluster := 64 << 10
	require.Len(t, after, len(before))
	assert.True(t, bytes.Equal(before[cluster:], after[cluster:]), "SetBacking changed more than the first cluster")
	assert.False(t, len(byQemu) == len(before) && bytes.Equal(before[cluster:], byQemu[cluster:]),
		"qemu-img no longer moves the bitmaps: compare the files byte for byte instead")

	hq, err := parseHeader(byQemu[:cluster])
	require.NoError(t, err)
	hn, err := parseHeader(after[:cluster])
	require.NoError(t, err)
	assert.Equal(t, hq.bitmapsExt[:16], hn.bitmapsExt[:16], "bitmap count and directory size")
	hq.bitmapsExt, hn.bitmapsExt = nil, nil
	hq.refcountOffset, hn.refcountOffset = 0, 0 // qemu-img may grow the refcount table for the new clusters
	hq.refcountClusters, hn.refcountClusters = 0, 0
	assert.Equal(t, hq, hn, "the headers differ beyond the bitmap directory")

	create(t, filepath.Join(dir, "new base.qcow2"), "", "", "")
	out, err = qemuImg(t, "check", native)
	assert.NoError(t, err, "qemu-img check: %s", out)
	assert.Contains(t, string(out), "No errors were found")
	assert.Equal(t, imageInfo(t, withQemu), imageInfo(t, native))
	t.Log(imageInfo(t, native))
}

// imageInfo is what qemu-img info says about an image's backing reference
// and bitmaps.
func imageInfo(t *testing.T, path string) string {
	t.Helper()
	out, err := qemuImg(t, "info", "--output=json", "-U", path)
	require.NoError(t, err, "%s", out)
	var info struct {
		Backing       string `json:"backing-filename"`
		BackingFormat string `json:"backing-filename-format"`
		Specific      struct {
			Data struct {
				Bitmaps json.RawMessage `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	require.NoError(t, json.Unmarshal(out, &info))
	return fmt.Sprintf("%s (%s) %s", info.Backing, info.BackingFormat, info.Specific.Data.Bitmaps)
}
