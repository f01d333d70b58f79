package backupdir

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/virt"
)

// TestManifestRoundTrip: a manifest reads back as written; unknown fields
// are ignored; a newer schema, or something that is not a manifest, is
// refused.
func TestManifestRoundTrip(t *testing.T) {
	d, _ := newDir(t)
	m := &Manifest{Schema: ManifestSchema, Tool: "fi-backup test", Domain: "dom", UUID: "u", Moment: "20240102-030405",
		Time: "2024-01-02T03:04:05+01:00", Method: MethodSnapshot, Quiesced: true,
		Disks: []Disk{{Target: "vda", Device: "disk", Name: "vm.qcow2", BackedUp: true,
			Chain: []File{{Name: "vm.bimg-20240101-000000", Size: 1, SHA256: "aa"}, {Name: "vm.qcow2", Size: 2, SHA256: "bb"}}},
			{Target: "hdc", Device: "cdrom", Reason: "cdrom"}}}
	require.NoError(t, d.WriteManifest(m))
	got := d.Manifests("dom", nil)
	require.Len(t, got, 1)
	assert.Equal(t, m, got[0])
	sums, err := os.ReadFile(d.MetaPath("dom", m.Moment, ".sha256"))
	require.NoError(t, err)
	assert.Equal(t, "aa  vm.bimg-20240101-000000\nbb  vm.qcow2\n", string(sums))
	when, err := m.When()
	require.NoError(t, err)
	assert.True(t, when.Equal(time.Date(2024, 1, 2, 2, 4, 5, 0, time.UTC)))

	var raw map[string]any
	b, _ := json.Marshal(m)
	require.NoError(t, json.Unmarshal(b, &raw))
	raw["future_field"] = []int{1, 2}
	b, _ = json.Marshal(raw)
	m2, err := ParseManifest(b)
	require.NoError(t, err, "unknown fields are ignored")
	assert.Equal(t, m, m2)
	raw["schema"] = ManifestSchema + 1
	b, _ = json.Marshal(raw)
	_, err = ParseManifest(b)
	assert.ErrorContains(t, err, "newer")
	for _, junk := range []string{"", "{}", `{"schema":1}`, "[1,2]", "{\"schema\":1,\"domain\":\"d\",\"moment\":"} {
		_, err := ParseManifest([]byte(junk))
		assert.Error(t, err, "%q", junk)
	}
	var badSeen []string
	require.NoError(t, os.WriteFile(d.MetaPath("dom", "20240103-000000", ".json"), []byte("{garbage"), 0o600))
	assert.Len(t, d.Manifests("dom", func(p string, _ error) { badSeen = append(badSeen, p) }), 1)
	assert.Len(t, badSeen, 1, "a broken manifest is reported, not fatal")
}

// TestPointsAndVerify: a backup directory made by this tool lists a point
// per manifest; verify finds a flipped byte, a truncated file, a missing
// file and a broken backing reference, naming the file, and reads each
// shared file once.
func TestPointsAndVerify(t *testing.T) {
	d, _ := newDir(t)
	host := t.TempDir()
	base := image(t, filepath.Join(host, "vm.qcow2"), "", 0x11, "0")
	ov := image(t, filepath.Join(host, "vm.bimg-20240101-000002"), base.Path, 0x22, "1M")
	record := func(moment string, chain []virt.Image) {
		files := mustCopy(t, d, chain, false)
		require.NoError(t, d.WriteManifest(&Manifest{Schema: 1, Domain: "dom", Moment: moment, Method: MethodSnapshot,
			Disks: []Disk{{Target: "vda", Device: "disk", BackedUp: true, Name: "vm.qcow2", Chain: files}}}))
	}
	record("20240101-000001", []virt.Image{base})
	record("20240101-000002", []virt.Image{ov, base})
	pts := d.Points(nil, nil, nil)
	require.Len(t, pts, 2)
	assert.Equal(t, []string{"vm.qcow2"}, pts[0].Files())
	assert.Equal(t, []string{"vm.bimg-20240101-000002", "vm.qcow2"}, pts[1].Files())
	p, err := Select(pts, "dom", "latest")
	require.NoError(t, err)
	assert.Equal(t, "20240101-000002", p.Moment)
	_, err = Select(pts, "dom", "20990101-000000")
	assert.Error(t, err)
	own := d.OwnSize(pts)
	assert.Zero(t, own[0], "the base is shared")
	assert.Positive(t, own[1])

	c := d.Checker(context.Background())
	for i := range pts {
		assert.Empty(t, c.Verify(&pts[i]))
	}

	damage := []struct {
		name  string
		do    func(t *testing.T, path string)
		which string // the file the problem names
		both  bool   // both points need the file
	}{
		{"flipped byte", func(t *testing.T, p string) { flip(t, p, 300000) }, "vm.qcow2", true},
		{"truncated", func(t *testing.T, p string) { require.NoError(t, os.Truncate(p, 4096)) }, "vm.bimg-20240101-000002", false},
		{"deleted", func(t *testing.T, p string) { require.NoError(t, os.Remove(p)) }, "vm.bimg-20240101-000002", false},
	}
	for _, tc := range damage {
		t.Run(tc.name, func(t *testing.T) {
			d2, _ := newDir(t)
			copyDir(t, d.Path, d2.Path)
			tc.do(t, filepath.Join(d2.Path, tc.which))
			pts := d2.Points(nil, nil, nil)
			c := d2.Checker(context.Background())
			newer := c.Verify(&pts[1])
			require.NotEmpty(t, newer)
			assert.Equal(t, tc.which, newer[0].File)
			assert.Equal(t, tc.both, len(c.Verify(&pts[0])) > 0, "the older point needs only the base")
		})
	}
	t.Run("broken backing reference", func(t *testing.T) {
		d2, _ := newDir(t)
		copyDir(t, d.Path, d2.Path)
		require.NoError(t, d2.Tool.Rebase(context.Background(), filepath.Join(d2.Path, "vm.bimg-20240101-000002"), "elsewhere.qcow2", "qcow2"))
		pts := d2.Points(nil, nil, nil)
		problems := d2.Checker(context.Background()).Verify(&pts[1])
		var all []string
		for _, pr := range problems {
			all = append(all, pr.String())
		}
		assert.Contains(t, all, "'vm.bimg-20240101-000002': references 'elsewhere.qcow2' instead of 'vm.qcow2'")
	})
}

// TestLegacyPoints: a directory the old tool wrote (absolute host backing
// references, no manifests) and one with generations list a restore point
// per copy, with the moment named by the overlay above it.
func TestLegacyPoints(t *testing.T) {
	d, _ := newDir(t)
	host := t.TempDir()
	base := image(t, filepath.Join(host, "vm.qcow2"), "", 0x11, "0")
	t1 := image(t, filepath.Join(host, "vm.bimg-20240101-000001"), base.Path, 0x22, "1M")
	t2 := image(t, filepath.Join(host, "vm.bimg-20240101-000002"), t1.Path, 0x33, "2M")
	for _, src := range []virt.Image{base, t1, t2} {
		copyFile(t, src.Path, filepath.Join(d.Path, filepath.Base(src.Path))) // the old tool's cp -u: host references kept
	}
	owner := func(name, _ string) Origin { return Origin{Domain: "vm", Target: "vda"} }
	pts := d.Points(nil, owner, nil)
	require.Len(t, pts, 3)
	assert.Equal(t, "20240101-000001", pts[0].Moment, "the base copy: frozen by bimg-T1")
	assert.Equal(t, []string{"vm.qcow2"}, pts[0].Disks[0].Chain)
	assert.Equal(t, "20240101-000002", pts[1].Moment)
	assert.Equal(t, []string{"vm.bimg-20240101-000001", "vm.qcow2"}, pts[1].Disks[0].Chain)
	assert.True(t, pts[2].Approx, "the newest: no overlay above it in the directory")
	for _, p := range pts {
		assert.Nil(t, p.Broken)
		assert.Equal(t, "vm.qcow2", p.Disks[0].Name)
		assert.Equal(t, "vm", p.Domain)
		assert.Empty(t, d.Checker(context.Background()).Verify(&p))
	}
	require.NoError(t, os.Remove(filepath.Join(d.Path, "vm.qcow2")))
	pts = d.Points(nil, owner, nil)
	for _, p := range pts {
		assert.Error(t, p.Broken, "every point needs the base")
	}
}

func flip(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	b := []byte{0}
	_, err = f.ReadAt(b, off)
	require.NoError(t, err)
	b[0] ^= 0x40
	_, err = f.WriteAt(b, off)
	require.NoError(t, err)
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(dst, b, 0o600))
}

func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	require.NoError(t, filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		require.NoError(t, err)
		rel, _ := filepath.Rel(src, p)
		if fi.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o700)
		}
		copyFile(t, p, filepath.Join(dst, rel))
		return nil
	}))
}

// TestWholeChainCopiedIsOnePoint: a run that copies a whole chain (an
// offline copy, a first run on a disk with overlays) makes one restore
// point: the files below its top are not listed as points of the old
// tool; the old tool's copies that a run found up to date still are.
func TestWholeChainCopiedIsOnePoint(t *testing.T) {
	d, _ := newDir(t)
	host := t.TempDir()
	base := image(t, filepath.Join(host, "vm.qcow2"), "", 0x11, "0")
	o1 := image(t, filepath.Join(host, "vm.bimg-20240101-000001"), base.Path, 0x22, "1M")
	o2 := image(t, filepath.Join(host, "vm.bimg-20240101-000002"), o1.Path, 0x33, "2M")
	owner := func(string, string) Origin { return Origin{Domain: "dom", Target: "vda"} }

	files := mustCopy(t, d, []virt.Image{o2, o1, base}, true)
	require.NoError(t, d.WriteManifest(&Manifest{Schema: 1, Domain: "dom", Moment: "20240101-000003", Method: MethodOffline,
		Disks: []Disk{{Target: "vda", Device: "disk", BackedUp: true, Name: "vm.qcow2", Chain: files}}}))
	pts := d.Points(nil, owner, nil)
	require.Len(t, pts, 1)
	assert.NotNil(t, pts[0].Manifest)

	d2, _ := newDir(t)
	copyFile(t, base.Path, filepath.Join(d2.Path, "vm.qcow2")) // the old tool's copy
	files = mustCopy(t, d2, []virt.Image{o1, base}, false)
	assert.False(t, files[1].Copied, "up to date")
	require.NoError(t, d2.WriteManifest(&Manifest{Schema: 1, Domain: "dom", Moment: "20240101-000002", Method: MethodSnapshot,
		Disks: []Disk{{Target: "vda", Device: "disk", BackedUp: true, Name: "vm.qcow2", Chain: files}}}))
	assert.Len(t, d2.Points(nil, owner, nil), 2, "the old tool's point stays listed")
}
