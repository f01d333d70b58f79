package blockjob

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// offDom is a shut-off domain as libvirt shows it: its definition is what
// Disks parses; started, it runs on the definition it had at that moment.
type offDom struct {
	def      string
	state    virt.State
	live     string // the disk a started domain runs on
	redefs   int
	onDefine func(d *offDom, n int) // after the n-th Redefine
	tamper   func(xml string) string
}

func (d *offDom) Name() string               { return "dom" }
func (d *offDom) State() (virt.State, error) { return d.state, nil }
func (d *offDom) Definition() (string, error) {
	if d.tamper != nil {
		return d.tamper(d.def), nil
	}
	return d.def, nil
}
func (d *offDom) Redefine(xml string) error {
	d.def = xml
	d.redefs++
	if d.onDefine != nil {
		d.onDefine(d, d.redefs)
	}
	return nil
}
func (d *offDom) Disks() ([]virt.Disk, error) {
	disks, err := virt.ParseDisks(d.def)
	if err == nil && d.state == virt.StateRunning {
		disks[0].Source = d.live
	}
	return disks, err
}

// start starts the domain on its current definition.
func (d *offDom) start() {
	disks, _ := virt.ParseDisks(d.def)
	d.state, d.live = virt.StateRunning, disks[0].Source
}

func domXML(source string) string {
	return fmt.Sprintf(`<domain type="qemu">
  <name>dom</name>
  <memory unit="KiB">32768</memory>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2"></driver>
      <source file="%s"></source>
      <target dev="vda" bus="virtio"></target>
    </disk>
    <serial type="pty"></serial>
  </devices>
</domain>`, source)
}

// fakeImages records the merges asked for; fail makes them fail.
type fakeImages struct {
	commits [][2]string // top, base
	flatten []string
	fail    error
}

func (f *fakeImages) Commit(_ context.Context, top, base string, _ int64) error {
	f.commits = append(f.commits, [2]string{top, base})
	return f.fail
}
func (f *fakeImages) Flatten(_ context.Context, image, _ string) error {
	f.flatten = append(f.flatten, image)
	return f.fail
}

// offChain is a host chain top ← bimg-1 ← disk.qcow2 ← template, as files
// (their content does not matter here), and the chain reader for it after
// the merge (the base's chain is base ← template).
func offChain(t *testing.T) (files []string, chainOf ChainOf) {
	dir := t.TempDir()
	for _, n := range []string{"disk.bimg-20240101-000002", "disk.bimg-20240101-000001", "disk.qcow2", "template.qcow2"} {
		p := filepath.Join(dir, n)
		require.NoError(t, os.WriteFile(p, []byte(n), 0o600))
		files = append(files, p)
	}
	img := func(ps ...string) []virt.Image {
		var out []virt.Image
		for _, p := range ps {
			out = append(out, virt.Image{Path: p, Format: "qcow2"})
		}
		return out
	}
	chainOf = func(_ context.Context, p string) ([]virt.Image, error) {
		for i, f := range files {
			if f == p {
				return img(files[i:]...), nil
			}
		}
		return nil, errors.New("no such file")
	}
	return files, chainOf
}

func existing(files []string) []string {
	var out []string
	for _, f := range files {
		if _, err := os.Stat(f); err == nil {
			out = append(out, filepath.Base(f))
		}
	}
	return out
}

// TestOfflineCommit: the overlays go into the base named explicitly, the
// definition's disk names the base (nothing else changes), the overlays —
// and only they — are deleted, the journal goes.
func TestOfflineCommit(t *testing.T) {
	c, out := newConsolidator(t, Commit)
	files, chainOf := offChain(t)
	dom := &offDom{def: domXML(files[0]), state: virt.StateShutoff}
	img := &fakeImages{}
	require.NoError(t, c.Offline(context.Background(), dom, img, chainOf, users{}))
	assert.Equal(t, [][2]string{{files[0], files[2]}}, img.commits, "into the base, never the template")
	disks, err := virt.ParseDisks(dom.def)
	require.NoError(t, err)
	assert.Equal(t, files[2], disks[0].Source)
	assert.Empty(t, virt.DiffOutside(domXML(files[0]), dom.def, "vda"))
	assert.Equal(t, []string{"disk.qcow2", "template.qcow2"}, existing(files))
	assert.NoFileExists(t, c.Journal.Path("dom"))
	assert.Contains(t, out.String(), "[VER] Consolidation of block device '"+files[0]+"' for 'dom' successful")
}

// TestOfflinePull: the top takes its backing files' data and keeps its
// name; the overlays below go, the base and template stay (not ours).
func TestOfflinePull(t *testing.T) {
	c, out := newConsolidator(t, Pull)
	files, chainOf := offChain(t)
	img := &fakeImages{}
	flat := func(_ context.Context, p string) ([]virt.Image, error) {
		if p == files[0] && len(img.flatten) > 0 {
			return []virt.Image{{Path: p}}, nil // standalone once flattened
		}
		return chainOf(context.Background(), p)
	}
	dom := &offDom{def: domXML(files[0]), state: virt.StateShutoff}
	require.NoError(t, c.Offline(context.Background(), dom, img, flat, users{}))
	assert.Equal(t, []string{files[0]}, img.flatten)
	assert.Equal(t, []string{"disk.bimg-20240101-000002", "disk.qcow2", "template.qcow2"}, existing(files))
	assert.Contains(t, out.String(), "doesn't seem to be a backup backing file image. Not deleting it")
}

// TestOfflineStartedMeanwhile: a domain started from its old definition in
// the instant between the merge and the redefinition runs on the old
// chain: the old definition is put back and nothing is deleted. One started
// from the new definition runs on the base: all is well.
func TestOfflineStartedMeanwhile(t *testing.T) {
	t.Run("on the old definition", func(t *testing.T) {
		c, out := newConsolidator(t, Commit)
		files, chainOf := offChain(t)
		dom := &offDom{def: domXML(files[0]), state: virt.StateShutoff}
		dom.onDefine = func(d *offDom, n int) {
			if n == 1 {
				d.state, d.live = virt.StateRunning, files[0] // started just before
			}
		}
		err := c.Offline(context.Background(), dom, &fakeImages{}, chainOf, users{})
		require.ErrorIs(t, err, ErrFailed)
		disks, _ := virt.ParseDisks(dom.def)
		assert.Equal(t, files[0], disks[0].Source, "the old definition is back")
		assert.Len(t, existing(files), 4, "nothing deleted")
		assert.Contains(t, out.String(), "the domain was started (running) during the consolidation, on its previous chain: the previous definition is back, nothing is deleted")
		assert.NoFileExists(t, c.Journal.Path("dom"))
	})
	t.Run("on the new definition", func(t *testing.T) {
		c, _ := newConsolidator(t, Commit)
		files, chainOf := offChain(t)
		dom := &offDom{def: domXML(files[0]), state: virt.StateShutoff}
		dom.onDefine = func(d *offDom, n int) { d.start() }
		require.NoError(t, c.Offline(context.Background(), dom, &fakeImages{}, chainOf, users{}))
		assert.Equal(t, []string{"disk.qcow2", "template.qcow2"}, existing(files))
	})
}

// TestOfflineRefusals: a definition that changed beyond the disk is put
// back; a failed merge changes nothing; an overlay another domain's chain
// holds, or a chain that cannot be checked, stops it before it starts.
func TestOfflineRefusals(t *testing.T) {
	cases := []struct {
		name  string
		setup func(d *offDom, img *fakeImages, u *users, files []string)
		want  string
		merge bool // the merge ran
	}{
		{"definition changed beyond the disk", func(d *offDom, _ *fakeImages, _ *users, _ []string) {
			d.tamper = func(x string) string {
				if d.redefs == 0 {
					return x
				}
				return strings.Replace(x, "32768", "65536", 1)
			}
		}, "redefining the disk changed more than the disk", true},
		{"merge fails", func(_ *offDom, img *fakeImages, _ *users, _ []string) {
			img.fail = errors.New("qemu-img commit: No space left on device")
		}, "No space left on device", true},
		{"overlay in another domain's chain", func(_ *offDom, _ *fakeImages, u *users, files []string) {
			u.by = map[string]string{files[1]: "other"}
		}, "is in the backing chain of domain 'other'", false},
		{"chains unknown", func(_ *offDom, _ *fakeImages, u *users, _ []string) {
			u.broken, u.brokenWhy = true, "a chain is unreadable"
		}, "cannot check whether other domains use the files of this chain (a chain is unreadable)", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, out := newConsolidator(t, Commit)
			files, chainOf := offChain(t)
			dom := &offDom{def: domXML(files[0]), state: virt.StateShutoff}
			img := &fakeImages{}
			var u users
			tc.setup(dom, img, &u, files)
			err := c.Offline(context.Background(), dom, img, chainOf, u)
			require.ErrorIs(t, err, ErrFailed)
			assert.Contains(t, out.String(), tc.want)
			assert.Equal(t, tc.merge, len(img.commits) == 1)
			disks, _ := virt.ParseDisks(dom.def)
			assert.Equal(t, files[0], disks[0].Source, "the disk stays on its chain")
			assert.Len(t, existing(files), 4, "nothing deleted")
			assert.NoFileExists(t, c.Journal.Path("dom"))
		})
	}
}

// TestRecoverOffline: a killed run that redefined the disk left its
// overlays: the next run deletes them by the rule. One killed before the
// redefinition left a complete old chain: nothing to delete, a warning.
func TestRecoverOffline(t *testing.T) {
	for _, redefined := range []bool{true, false} {
		t.Run(fmt.Sprint("redefined=", redefined), func(t *testing.T) {
			c, out := newConsolidator(t, Commit)
			files, chainOf := offChain(t)
			src := files[0]
			if redefined {
				src = files[2]
			}
			dom := &offDom{def: domXML(src), state: virt.StateShutoff}
			rec := journal.Record{Domain: "dom", Kind: KindOfflineCommit, Disk: "vda", Top: files[0], Base: files[2], Chain: files}
			require.NoError(t, c.Journal.Write(rec))
			require.NoError(t, c.RecoverOffline(context.Background(), dom, &rec, chainOf, users{}))
			if redefined {
				assert.Equal(t, []string{"disk.qcow2", "template.qcow2"}, existing(files))
				assert.Contains(t, out.String(), "[WAR] Finishing the offline consolidation of disk 'vda' of 'dom'")
			} else {
				assert.Len(t, existing(files), 4)
				assert.Contains(t, out.String(), "run -c again to merge it")
			}
			assert.NoFileExists(t, c.Journal.Path("dom"))
		})
	}
}
