package qcow2

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// qemuChain is what qemu-img info --backing-chain lists for path (made
// absolute, as Tool.Chain passes it): filename and format of each element.
func qemuChain(t *testing.T, path string) ([]Image, error) {
	t.Helper()
	abs, err := filepath.Abs(path)
	require.NoError(t, err)
	out, err := qemuImg(t, "info", "--backing-chain", "--output=json", "-U", abs)
	if err != nil {
		return nil, &qemuError{string(out)}
	}
	var infos []struct {
		Filename string `json:"filename"`
		Format   string `json:"format"`
	}
	require.NoError(t, json.Unmarshal(out, &infos), "%s", out)
	var chain []Image
	for _, in := range infos {
		chain = append(chain, Image{Path: in.Filename, Format: in.Format})
	}
	return chain, nil
}

type qemuError struct{ msg string }

func (e *qemuError) Error() string { return e.msg }

// layer creates a qcow2 image at dir/name whose backing reference is
// backing (stored as given) in format format; no backing when "".
func layer(t *testing.T, dir, name, backing, format string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
	return create(t, p, "", backing, format)
}

// rawFile creates a raw image (not all zeros, no magic) at dir/name.
func rawFile(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
	require.NoError(t, os.WriteFile(p, []byte("a raw disk image, mostly empty\n"), 0o644))
	require.NoError(t, os.Truncate(p, 1<<20))
	return p
}

// dropFormat removes the backing format extension of a qcow2 image, keeping
// its backing file name, so that QEMU has to probe the backing file.
func dropFormat(t *testing.T, path string) {
	t.Helper()
	name, err := BackingFile(path)
	require.NoError(t, err)
	editHeader(t, path, func(c []byte) {
		writeExts(c, testExt{extFeatureTable, featureTable})
		off := v3HeaderLen + 8 + len(featureTable) + 8
		copy(c[off:], name)
		binary.BigEndian.PutUint64(c[8:], uint64(off))
		binary.BigEndian.PutUint32(c[16:], uint32(len(name)))
	})
}

// TestChainMatchesQemuImg builds chains of one to five files with relative
// and absolute references, spaces in names, raw bases, symbolic links and
// probed formats, and compares Chain with qemu-img info --backing-chain.
func TestChainMatchesQemuImg(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		build func(t *testing.T, dir string) string // returns the top
		want  int                                   // chain length
	}{
		{"one qcow2", func(t *testing.T, d string) string { return layer(t, d, "disk.qcow2", "", "") }, 1},
		{"one raw", func(t *testing.T, d string) string { return rawFile(t, d, "disk.img") }, 1},
		{"one empty raw", func(t *testing.T, d string) string {
			p := filepath.Join(d, "empty.img")
			require.NoError(t, os.WriteFile(p, nil, 0o644))
			return p
		}, 1},
		{"qcow2 on a raw base, relative", func(t *testing.T, d string) string {
			rawFile(t, d, "base.img")
			return layer(t, d, "top.qcow2", "base.img", "raw")
		}, 2},
		{"three with spaces in their names", func(t *testing.T, d string) string {
			layer(t, d, "base disk.qcow2", "", "")
			layer(t, d, "mid layer.qcow2", "base disk.qcow2", "qcow2")
			return layer(t, d, "top layer.qcow2", "mid layer.qcow2", "qcow2")
		}, 3},
		{"five: raw base, absolute, ../, ./ and sub/ references", func(t *testing.T, d string) string {
			base := rawFile(t, d, "images/base.raw")
			layer(t, d, "images/golden.qcow2", base, "raw")
			layer(t, d, "vm/l1.qcow2", "../images/golden.qcow2", "qcow2")
			layer(t, d, "vm/l2 with space.qcow2", "./l1.qcow2", "qcow2")
			return layer(t, d, "top.qcow2", "vm/l2 with space.qcow2", "qcow2")
		}, 5},
		{"four, all absolute", func(t *testing.T, d string) string {
			a := layer(t, d, "a/base.qcow2", "", "")
			b := layer(t, d, "b/1.qcow2", a, "qcow2")
			c := layer(t, d, "c/2.qcow2", b, "qcow2")
			return layer(t, d, "d/3.qcow2", c, "qcow2")
		}, 4},
		{"odd names: quotes, backslash, UTF-8", func(t *testing.T, d string) string {
			layer(t, d, `it's "quoted".qcow2`, "", "")
			layer(t, d, `back\slash.qcow2`, `it's "quoted".qcow2`, "qcow2")
			return layer(t, d, "ünïcødé 日本.qcow2", `back\slash.qcow2`, "qcow2")
		}, 3},
		{"no format extensions: probed qcow2, then raw", func(t *testing.T, d string) string {
			rawFile(t, d, "base.img")
			mid := layer(t, d, "mid.qcow2", "base.img", "raw")
			top := layer(t, d, "top.qcow2", "mid.qcow2", "qcow2")
			dropFormat(t, mid)
			dropFormat(t, top)
			return top
		}, 3},
		{"a backing file named through a symbolic link", func(t *testing.T, d string) string {
			layer(t, d, "real/base.qcow2", "", "")
			require.NoError(t, os.Symlink("real", filepath.Join(d, "link")))
			return layer(t, d, "top.qcow2", "link/base.qcow2", "qcow2")
		}, 2},
		{"raw format named for a qcow2 file ends the chain", func(t *testing.T, d string) string {
			layer(t, d, "base.qcow2", "", "")
			layer(t, d, "mid.qcow2", "base.qcow2", "qcow2")
			return layer(t, d, "top.qcow2", "mid.qcow2", "raw")
		}, 2},
		{"a qcow2 file given as top through a relative path", func(t *testing.T, d string) string {
			layer(t, d, "base.qcow2", "", "")
			top := layer(t, d, "top.qcow2", "base.qcow2", "qcow2")
			wd, err := os.Getwd()
			require.NoError(t, err)
			rel, err := filepath.Rel(wd, top)
			require.NoError(t, err)
			return rel
		}, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			top := tc.build(t, t.TempDir())
			want, qerr := qemuChain(t, top)
			require.NoError(t, qerr)
			got, err := Chain(top)
			require.NoError(t, err)
			assert.Equal(t, want, got)
			assert.Len(t, got, tc.want)
		})
	}
}

// TestChainErrors: where qemu-img info --backing-chain fails, Chain fails
// too, never returning a shorter chain; a loop is found even when every
// name is new.
func TestChainErrors(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, want string
		build      func(t *testing.T, dir string) string
		askQemu    bool // qemu-img can be asked without network or hangs
	}{
		{"missing base", "no such file", func(t *testing.T, d string) string {
			layer(t, d, "mid.qcow2", "gone.qcow2", "qcow2")
			return layer(t, d, "top.qcow2", "mid.qcow2", "qcow2")
		}, true},
		{"missing top", "no such file", func(t *testing.T, d string) string {
			return filepath.Join(d, "nothing.qcow2")
		}, true},
		{"loop", "infinite loop", func(t *testing.T, d string) string {
			layer(t, d, "a.qcow2", "b.qcow2", "qcow2")
			return layer(t, d, "b.qcow2", "a.qcow2", "qcow2")
		}, true},
		{"loop through ever longer names", "infinite loop", func(t *testing.T, d string) string {
			return layer(t, d, "self.qcow2", "./self.qcow2", "qcow2")
		}, false}, // qemu-img goes on until the name is too long
		{"FIFO as backing file", "not a regular file", func(t *testing.T, d string) string {
			require.NoError(t, unix.Mkfifo(filepath.Join(d, "fifo"), 0o644))
			return layer(t, d, "top.qcow2", "fifo", "qcow2")
		}, false}, // qemu-img would wait for a writer
		{"directory as backing file", "not a regular file", func(t *testing.T, d string) string {
			require.NoError(t, os.Mkdir(filepath.Join(d, "dir"), 0o755))
			return layer(t, d, "top.qcow2", "dir", "qcow2")
		}, true},
		{"qcow2 format named for a raw file", "not a qcow2 image", func(t *testing.T, d string) string {
			rawFile(t, d, "base.img")
			return layer(t, d, "top.qcow2", "base.img", "qcow2")
		}, true},
		{"broken header in the middle", "unsupported cluster size", func(t *testing.T, d string) string {
			layer(t, d, "base.qcow2", "", "")
			mid := layer(t, d, "mid.qcow2", "base.qcow2", "qcow2")
			editHeader(t, mid, func(c []byte) { binary.BigEndian.PutUint32(c[20:], 30) })
			return layer(t, d, "top.qcow2", "mid.qcow2", "qcow2")
		}, true},
		{"protocol prefix", "protocol prefix", func(t *testing.T, d string) string {
			return layer(t, d, "top.qcow2", "nbd:localhost:10809", "raw")
		}, false},
		{"format this package cannot read", "not supported", func(t *testing.T, d string) string {
			mustQemuImg(t, "create", "-q", "-f", "vmdk", filepath.Join(d, "base.vmdk"), "1M")
			return layer(t, d, "top.qcow2", "base.vmdk", "vmdk")
		}, false}, // qemu-img reads vmdk; Chain says it cannot
		{"qcow version 1 top", "not supported", func(t *testing.T, d string) string {
			p := filepath.Join(d, "old.qcow")
			mustQemuImg(t, "create", "-q", "-f", "qcow", p, "1M")
			return p
		}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			top := tc.build(t, t.TempDir())
			if tc.askQemu {
				_, qerr := qemuChain(t, top)
				require.Error(t, qerr, "qemu-img must fail on this chain")
				t.Logf("qemu-img: %v", qerr)
			}
			got, err := Chain(top)
			require.Error(t, err, "got a chain %v", got)
			assert.Nil(t, got)
			assert.ErrorContains(t, err, tc.want)
			assert.Equal(t, tc.want == "not supported" || tc.want == "protocol prefix", errors.Is(err, ErrUnsupported),
				"only what qemu-img might read is ErrUnsupported")
			t.Logf("Chain: %v", err)
		})
	}
}
