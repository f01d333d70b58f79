package backupdir

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCBTName(t *testing.T) {
	for _, tc := range []struct{ disk, want string }{
		{"vm.qcow2", "vm.cbt-20240101-000001"},
		{"my disk.img", "my disk.cbt-20240101-000001"},
		{"disk", "disk.cbt-20240101-000001"},
		{"a.b.qcow2", "a.b.cbt-20240101-000001"},
	} {
		got := CBTName(tc.disk, "20240101-000001")
		assert.Equal(t, tc.want, got)
		assert.True(t, IsCBT(got), got)
	}
	for _, n := range []string{"vm.qcow2", "vm.bimg-20240101-000001", "vm.cbt-2024", ".vm.cbt-20240101-000001.fi-backup-cbt"} {
		assert.False(t, IsCBT(n), n)
	}
}

// TestMergeTargetCBT: a --cbt chain's increments are merged into the full
// backup at its bottom; the snapshot method's chains keep their target
// (the disk's own image, never a template below it).
func TestMergeTargetCBT(t *testing.T) {
	for _, tc := range []struct {
		chain []string
		want  int
	}{
		{[]string{"vm.cbt-20240101-000004", "vm.cbt-20240101-000003", "vm.cbt-20240101-000002", "vm.cbt-20240101-000001"}, 3},
		{[]string{"vm.cbt-20240101-000002", "vm.cbt-20240101-000001"}, 1},
		{[]string{"vm.cbt-20240101-000001"}, 0},
		{[]string{"vm.bimg-20240101-000003", "vm.bimg-20240101-000002", "vm.bimg-20240101-000001", "vm.qcow2", "template.qcow2"}, 3},
		{[]string{"vm.bimg-20240101-000002", "vm.bimg-20240101-000001.gen-20240101-000009", "vm.qcow2.gen-20240101-000008"}, 2},
	} {
		assert.Equal(t, tc.want, mergeTarget(tc.chain), "%v", tc.chain)
	}
}

// cbtSeries writes what six --cbt runs leave: a full backup at moment 1 and
// five increments, each with a relative backing reference to the previous
// file and layer k's data, with a manifest per point.
func cbtSeries(t *testing.T, d *Dir) {
	t.Helper()
	var chain []File
	for k := 1; k <= 6; k++ {
		name := CBTName("vm.qcow2", moment(k))
		backing := ""
		if k > 1 {
			backing = chain[0].Name
		}
		image(t, filepath.Join(d.Path, name), backing, layers[k-1].pattern, layers[k-1].off)
		f, err := d.describeCBT(name)
		require.NoError(t, err)
		chain = append([]File{f}, chain...)
		require.NoError(t, d.WriteManifest(&Manifest{Schema: ManifestSchema, Domain: "dom", Moment: moment(k), Method: MethodCBT,
			Disks: []Disk{{Target: "vda", Device: "disk", Source: "/host/vm.qcow2", BackedUp: true, Name: "vm.qcow2", Chain: chain}}}))
	}
}

// TestPruneCBTSeries: --keep=3 on a --cbt series merges the increments
// below the oldest kept point into the full file at the bottom, which
// keeps its name; every kept point reads back its moment and verifies;
// no host file is recorded as merged (a --cbt file is no host file's copy).
func TestPruneCBTSeries(t *testing.T) {
	t.Parallel()
	d, _ := newDir(t)
	cbtSeries(t, d)
	full := CBTName("vm.qcow2", moment(1))
	check := func(ks ...int) {
		t.Helper()
		pts := d.Points([]string{"dom"}, nil, nil)
		require.Len(t, pts, len(ks))
		c := d.Checker(context.Background())
		for i, p := range pts {
			assert.Equal(t, moment(ks[i]), p.Moment)
			assert.Empty(t, c.Verify(&p), "point %s verifies", p.Moment)
			assertHolds(t, d.Path, p.Disks[0].Chain[0], ks[i])
			assert.Equal(t, full, p.Disks[0].Chain[len(p.Disks[0].Chain)-1], "every chain ends on the full backup")
		}
	}
	check(1, 2, 3, 4, 5, 6)

	_, _, err := d.Prune(context.Background(), "dom", 3, nil)
	require.NoError(t, err)
	check(4, 5, 6)
	for k := 2; k <= 3; k++ {
		assert.False(t, exists(filepath.Join(d.Path, CBTName("vm.qcow2", moment(k)))), "increment %d merged away", k)
	}
	b, err := backingOf(filepath.Join(d.Path, CBTName("vm.qcow2", moment(4))))
	require.NoError(t, err)
	assert.Equal(t, full, b, "the oldest kept increment now sits on the full backup")
	assert.Empty(t, d.readRetention("dom").Merged, "no host file recorded as merged")

	_, _, err = d.Prune(context.Background(), "dom", 1, nil)
	require.NoError(t, err)
	check(6)
	left, err := filepath.Glob(filepath.Join(d.Path, "vm.*"))
	require.NoError(t, err)
	assert.Len(t, left, 2, "the full backup and the newest increment: %v", left)
}

// TestDirID: one id per directory, made once (also by concurrent runs),
// kept across runs.
func TestDirID(t *testing.T) {
	d, _ := newDir(t)
	ids := make([]string, 8)
	var wg sync.WaitGroup
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id, err := d.ID()
			assert.NoError(t, err)
			ids[i] = id
		}()
	}
	wg.Wait()
	assert.Regexp(t, `^[0-9a-f]{16}$`, ids[0])
	for _, id := range ids {
		assert.Equal(t, ids[0], id)
	}
	again, err := (&Dir{Path: d.Path}).ID()
	require.NoError(t, err)
	assert.Equal(t, ids[0], again)
	other, _ := newDir(t)
	oid, err := other.ID()
	require.NoError(t, err)
	assert.NotEqual(t, ids[0], oid, "another directory, another id")
	require.NoError(t, os.WriteFile(filepath.Join(d.Path, MetaDir, idFile), []byte("garbage\n"), 0o600))
	_, err = d.ID()
	assert.ErrorContains(t, err, "does not hold a backup directory id")
}

// TestReserveCBT: a moment whose names are taken (a temporary name another
// run holds, an existing file, the domain's manifest) is refused without a
// trace; a free one is claimed.
func TestReserveCBT(t *testing.T) {
	d, _ := newDir(t)
	ts := []CBTTarget{{Name: "a.cbt-20240101-000001"}, {Name: "b.cbt-20240101-000001"}}
	ok, err := d.ReserveCBT("dom", "20240101-000001", ts)
	require.NoError(t, err)
	require.True(t, ok)
	assert.True(t, exists(d.Temp(ts[0])))
	assert.True(t, exists(d.Temp(ts[1])))

	ok, err = d.ReserveCBT("other", "20240101-000001", []CBTTarget{{Name: "c.cbt-20240101-000001"}, ts[1]})
	require.NoError(t, err)
	assert.False(t, ok, "b's temporary name is held")
	assert.False(t, exists(filepath.Join(d.Path, ".c.cbt-20240101-000001.fi-backup-cbt")), "nothing left behind")

	require.NoError(t, os.WriteFile(filepath.Join(d.Path, "c.cbt-20240101-000002"), nil, 0o600))
	ok, err = d.ReserveCBT("other", "20240101-000002", []CBTTarget{{Name: "c.cbt-20240101-000002"}})
	require.NoError(t, err)
	assert.False(t, ok, "the final name exists")

	require.NoError(t, os.MkdirAll(filepath.Join(d.Path, MetaDir, "dom"), 0o700))
	require.NoError(t, os.WriteFile(d.MetaPath("dom", "20240101-000003", ".json"), []byte("{}"), 0o600))
	ok, err = d.ReserveCBT("dom", "20240101-000003", []CBTTarget{{Name: "x.cbt-20240101-000003"}})
	require.NoError(t, err)
	assert.False(t, ok, "the domain has a restore point at that moment")
}

// TestFinishCBT: a finished target gets its final name and mode, and is
// described as a manifest records it; an existing final name is never
// replaced.
func TestFinishCBT(t *testing.T) {
	d, _ := newDir(t)
	tg := CBTTarget{Name: "vm.cbt-20240101-000001", Size: 16 << 20, Mode: 0o640}
	ok, err := d.ReserveCBT("dom", "20240101-000001", []CBTTarget{tg})
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, d.CreateCBT(tg))
	st, err := os.Stat(d.Temp(tg))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm(), "private while written")
	f, err := d.FinishCBT(context.Background(), tg, 0)
	require.NoError(t, err)
	assert.False(t, exists(d.Temp(tg)))
	st, err = os.Stat(d.Final(tg))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o640), st.Mode().Perm())
	assert.Equal(t, File{Name: tg.Name, Size: st.Size(), VirtualSize: 16 << 20, Format: "qcow2", SHA256: sum(t, d.Final(tg)), Copied: true}, f)

	inc := CBTTarget{Name: "vm.cbt-20240101-000002", Backing: tg.Name, Size: 16 << 20, Mode: 0o600}
	require.NoError(t, os.WriteFile(d.Temp(inc), nil, 0o600))
	require.NoError(t, d.CreateCBT(inc))
	b, err := backingOf(d.Temp(inc))
	require.NoError(t, err)
	assert.Equal(t, tg.Name, b, "relative backing reference")
	require.NoError(t, os.WriteFile(d.Final(inc), []byte("someone else's"), 0o600))
	_, err = d.FinishCBT(context.Background(), inc, 0)
	assert.ErrorContains(t, err, "already exists")
	got, err := os.ReadFile(d.Final(inc))
	require.NoError(t, err)
	assert.Equal(t, "someone else's", string(got))
}

// TestAdmitCBT: a --cbt run that writes more than the backup file system
// has free is refused before anything is created, with the same wording as
// a copy's refusal.
func TestAdmitCBT(t *testing.T) {
	d, out := newDir(t)
	require.NoError(t, d.AdmitCBT("dom", 1<<20))
	assert.ErrorIs(t, d.AdmitCBT("dom", 1<<62), ErrFailed)
	assert.Contains(t, out.String(), "[ERR] Not enough free space in '"+d.Path+"' for the backup of 'dom': it writes up to ")
	entries, err := os.ReadDir(d.Path)
	require.NoError(t, err)
	assert.Empty(t, entries)
}
