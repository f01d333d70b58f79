package blockjob

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/virt"
)

func imgs(paths ...string) []virt.Image {
	out := make([]virt.Image, len(paths))
	for i, p := range paths {
		out[i] = virt.Image{Path: p, Format: "qcow2"}
	}
	return out
}

func TestBase(t *testing.T) {
	for _, tc := range []struct {
		name  string
		chain []virt.Image
		base  string
		ok    bool
	}{
		{"overlays on the disk's image", imgs("/d/vm.bimg-20240101-000002", "/d/vm.bimg-20240101-000001", "/d/vm.qcow2"), "/d/vm.qcow2", true},
		{"overlay on a disk on a template", imgs("/d/vm.bimg-20240101-000002", "/d/vm.qcow2", "/t/template.qcow2"), "/d/vm.qcow2", true},
		{"after a pull, all overlays", imgs("/d/vm.bimg-20240101-000003", "/d/vm.bimg-20240101-000002", "/d/vm.bimg-20240101-000001"), "/d/vm.bimg-20240101-000001", true},
		{"no overlay on top: a golden image below", imgs("/d/vm.qcow2", "/g/golden.qcow2"), "", false},
		{"a look-alike on top", imgs("/d/vm.bimg-20240101-000001.old", "/d/base"), "", false},
		{"no backing file", imgs("/d/vm.bimg-20240101-000001"), "", false},
	} {
		base, ok := Base(tc.chain)
		assert.Equal(t, tc.ok, ok, tc.name)
		assert.Equal(t, tc.base, base, tc.name)
	}
}

func TestCheckResult(t *testing.T) {
	before := imgs("/d/top", "/d/base")
	assert.NoError(t, CheckResult(virt.JobCommit, "/d/base", before, virt.Disk{Source: "/d/base"}))
	assert.Error(t, CheckResult(virt.JobCommit, "/d/base", before, virt.Disk{Source: "/d/top"}))
	assert.NoError(t, CheckResult(virt.JobPull, "", before, virt.Disk{Source: "/d/top", Chain: before[:1]}))
	assert.Error(t, CheckResult(virt.JobPull, "", before, virt.Disk{Source: "/d/top", Chain: before}))
}

// TestLeftovers is the deletion rule: only files that left the chain, carry
// the overlay name, and that no other domain uses (or may use) go.
func TestLeftovers(t *testing.T) {
	before := imgs("/d/vm.bimg-20240101-000002", "/d/vm.bimg-20240101-000001", "/d/vm.qcow2", "/t/tpl.qcow2")
	after := imgs("/d/vm.bimg-20240101-000002") // a pull
	got := Leftovers(before, after, users{by: map[string]string{"/t/tpl.qcow2": "other"}})
	require.Len(t, got, 3)
	assert.Equal(t, Deletion{Path: "/d/vm.bimg-20240101-000001", Delete: true}, got[0])
	assert.Equal(t, "'/d/vm.qcow2' doesn't seem to be a backup backing file image. Not deleting it (manual intervention required)", got[1].Keep)
	assert.Equal(t, "'/t/tpl.qcow2' is in use by domain 'other' and must stay. Not deleting it", got[2].Keep)

	got = Leftovers(before, after, users{broken: true, brokenWhy: "the backing chain of domain 'x' could not be read"})
	assert.False(t, got[0].Delete, "an unreadable chain might use it")
	assert.Equal(t, "'/d/vm.bimg-20240101-000001' may be in use by another domain (the backing chain of domain 'x' could not be read). Not deleting it", got[0].Keep)

	got = Leftovers(before, imgs("/d/vm.qcow2", "/t/tpl.qcow2"), users{})
	assert.Equal(t, []Deletion{{Path: "/d/vm.bimg-20240101-000002", Delete: true}, {Path: "/d/vm.bimg-20240101-000001", Delete: true}}, got)
}

// chainDisk makes vda with the chain (top first) as files in dir, so that
// deletions really happen.
func chainDisk(t *testing.T, dir string, names ...string) virt.Disk {
	t.Helper()
	var chain []virt.Image
	for _, n := range names {
		p := n
		if !filepath.IsAbs(n) {
			p = filepath.Join(dir, n)
		}
		require.NoError(t, os.WriteFile(p, []byte(n), 0o600))
		chain = append(chain, virt.Image{Path: p, Format: "qcow2"})
	}
	return virt.Disk{Target: "vda", Device: "disk", Type: "file", Source: chain[0].Path, Format: "qcow2", Chain: chain, Complete: true}
}

func newConsolidator(t *testing.T, m Method) (*Consolidator, *bytes.Buffer) {
	var out bytes.Buffer
	return &Consolidator{P: logging.New(&out, true, true), Journal: journal.Store{Dir: t.TempDir()}, Method: m, PollEvery: time.Millisecond, Timeout: 10 * time.Second}, &out
}

func files(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	require.NoError(t, err)
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

// TestCommitMergesOurOverlays: the commit goes into the disk's own image
// above a template, the domain pivots onto it, and exactly the overlays go.
func TestCommitMergesOurOverlays(t *testing.T) {
	dir := t.TempDir()
	tpl := filepath.Join(t.TempDir(), "tpl.qcow2")
	d := newFakeDom(chainDisk(t, dir, "vm.bimg-20240101-000002", "vm.bimg-20240101-000001", "vm.qcow2", tpl))
	d.readyAtStart = true
	c, out := newConsolidator(t, Commit)
	require.NoError(t, c.Domain(context.Background(), d, users{by: map[string]string{tpl: "other"}}))
	assert.Equal(t, []string{"vm.qcow2"}, files(t, dir))
	assert.FileExists(t, tpl)
	disks, _ := d.Disks()
	assert.Equal(t, filepath.Join(dir, "vm.qcow2"), disks[0].Source)
	assert.Contains(t, out.String(), "[DEB] Committing into '"+filepath.Join(dir, "vm.qcow2")+"'\n")
	assert.Contains(t, out.String(), "[VER] Consolidation of block device '"+filepath.Join(dir, "vm.bimg-20240101-000002")+"' for 'dom' successful\n")
	assert.Contains(t, out.String(), "[DEB] Next file in backing file chain: '"+filepath.Join(dir, "vm.qcow2")+"'\n[DEB] Next file in backing file chain: '"+tpl+"'\n[DEB] Next file in backing file chain: ''\n")
	assert.NoFileExists(t, c.Journal.Path("dom"), "the job is over: no journal")
}

// TestNothingOfOursToConsolidate: with no overlay of this tool on top, no
// job starts, for either method, and nothing is reported as an error.
func TestNothingOfOursToConsolidate(t *testing.T) {
	for _, m := range []Method{Commit, Pull} {
		dir := t.TempDir()
		d := newFakeDom(chainDisk(t, dir, "vm.qcow2", "golden.qcow2"))
		c, out := newConsolidator(t, m)
		require.NoError(t, c.Domain(context.Background(), d, users{by: map[string]string{}}))
		assert.Empty(t, d.starts, "%s: no job", m)
		assert.Contains(t, out.String(), "[INF] No backup overlay (.bimg-) on top of '"+filepath.Join(dir, "vm.qcow2")+"' for 'dom'. Nothing to do.\n")
		assert.NotContains(t, out.String(), "[ERR]")
		assert.ElementsMatch(t, []string{"vm.qcow2", "golden.qcow2"}, files(t, dir))
	}
}

// TestCommitRefusedIntoSharedOrUnknownBase: no commit into a base another
// domain uses, or may use (its chain could not be read); a pull (which
// writes only into the active layer) still runs, and deletes nothing that
// might be in use.
func TestCommitRefusedIntoSharedOrUnknownBase(t *testing.T) {
	dir := t.TempDir()
	mk := func() *fakeDom {
		d := newFakeDom(chainDisk(t, dir, "vm.bimg-20240101-000002", "vm.bimg-20240101-000001", "vm.qcow2"))
		d.readyAtStart = true
		return d
	}
	base := filepath.Join(dir, "vm.qcow2")
	d := mk()
	c, out := newConsolidator(t, Commit)
	assert.ErrorIs(t, c.Domain(context.Background(), d, users{by: map[string]string{base: "clone"}}), ErrFailed)
	assert.Empty(t, d.starts)
	assert.Contains(t, out.String(), "'"+base+"' is in the backing chain of domain 'clone': committing into it would change that domain's disk")

	d = mk()
	c, out = newConsolidator(t, Commit)
	broken := users{broken: true, brokenWhy: "the backing chain of domain 'x' could not be read"}
	assert.ErrorIs(t, c.Domain(context.Background(), d, broken), ErrFailed)
	assert.Empty(t, d.starts)
	assert.Contains(t, out.String(), "cannot check whether other domains use '"+base+"' (the backing chain of domain 'x' could not be read)")

	d = mk()
	c, out = newConsolidator(t, Pull)
	require.NoError(t, c.Domain(context.Background(), d, broken))
	assert.Equal(t, []string{"vda"}, d.starts)
	assert.Len(t, files(t, dir), 3, "nothing deleted")
	assert.Contains(t, out.String(), "[WAR] '"+filepath.Join(dir, "vm.bimg-20240101-000001")+"' may be in use by another domain")
}

// TestJobThatDoesNotFinish: a timeout, a signal (cancelled context) and a
// failed job each leave the disk on its previous chain, delete nothing,
// leave no job and no journal.
func TestJobThatDoesNotFinish(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(*fakeDom, *Consolidator) context.Context
		msg   string
	}{
		{"timeout", func(d *fakeDom, c *Consolidator) context.Context {
			c.Timeout = 20 * time.Millisecond
			return context.Background()
		}, "block job timed out: not finished after 20ms; job aborted, the disk stays on its previous chain"},
		{"signal", func(d *fakeDom, c *Consolidator) context.Context {
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			return ctx
		}, "interrupted: block job aborted, 'vda' stays on its previous chain"},
		{"failed", func(d *fakeDom, c *Consolidator) context.Context {
			d.failAtStart = true
			return context.Background()
		}, "block job failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			d := newFakeDom(chainDisk(t, dir, "vm.bimg-20240101-000001", "vm.qcow2"))
			c, out := newConsolidator(t, Commit)
			ctx := tc.setup(d, c)
			assert.ErrorIs(t, c.Domain(ctx, d, users{}), ErrFailed)
			if tc.name != "signal" { // a cancelled run does not start the next disk
				assert.Contains(t, out.String(), tc.msg)
			}
			disks, _ := d.Disks()
			assert.Equal(t, filepath.Join(dir, "vm.bimg-20240101-000001"), disks[0].Source)
			assert.Nil(t, disks[0].Mirror, "no job left")
			assert.Len(t, files(t, dir), 2, "nothing deleted")
			assert.NoFileExists(t, c.Journal.Path("dom"))
		})
	}
}

// TestReadyFoundByPoll: when no event arrives, the poll of the live XML
// (<mirror ready='yes'>) finds the READY job, which is then pivoted; a
// pivot libvirt is not ready for yet is retried.
func TestReadyFoundByPoll(t *testing.T) {
	dir := t.TempDir()
	d := newFakeDom(chainDisk(t, dir, "vm.bimg-20240101-000001", "vm.qcow2"))
	d.readyAtStart, d.noEvents, d.pivotBusy = true, true, 3
	c, _ := newConsolidator(t, Commit)
	require.NoError(t, c.Domain(context.Background(), d, users{}))
	assert.Equal(t, []string{"vm.qcow2"}, files(t, dir))
}

// TestStartFailureKeepsJournalOnlyForItsJob: a start call that fails with no
// job left clears the journal; one that failed although the job started (a
// connection lost mid-call) keeps it, for the next run's Recover.
func TestStartFailureKeepsJournalOnlyForItsJob(t *testing.T) {
	dir := t.TempDir()
	d := newFakeDom(chainDisk(t, dir, "vm.bimg-20240101-000001", "vm.qcow2"))
	d.startErr = &virt.Error{Msg: "internal error: client socket is closed"}
	c, out := newConsolidator(t, Commit)
	assert.ErrorIs(t, c.Domain(context.Background(), d, users{}), ErrFailed)
	assert.Contains(t, out.String(), "client socket is closed")
	assert.NoFileExists(t, c.Journal.Path("dom"))

	d.startedAnyway = true
	assert.ErrorIs(t, c.Domain(context.Background(), d, users{}), ErrFailed)
	rec, err := c.Journal.Read("dom")
	require.NoError(t, err)
	require.NotNil(t, rec, "the started job is journaled for the next run")
	assert.Equal(t, journal.Record{Domain: "dom", Kind: KindCommit, Disk: "vda", Top: filepath.Join(dir, "vm.bimg-20240101-000001"), Base: filepath.Join(dir, "vm.qcow2"), PID: os.Getpid()}, *rec)
}

// TestRecoverAbortsOnlyTheJournaledJob: the next run aborts the job the
// journal describes, and no other (someone's pull, a commit into another
// base, a commit of another top) even when the journal is there.
func TestRecoverAbortsOnlyTheJournaledJob(t *testing.T) {
	rec := journal.Record{Domain: "dom", Disk: "vda", Kind: KindCommit, Top: "/d/vm.bimg-20240101-000001", Base: "/d/vm.qcow2"}
	for _, tc := range []struct {
		name            string
		kind            virt.JobKind
		top, base, warn string
		aborted         bool
	}{
		{"the journaled commit", virt.JobCommit, rec.Top, rec.Base, "[WAR] Aborting the blockcommit job on disk 'vda' of 'dom' left by an interrupted fi-backup run (pid 42)", true},
		{"someone's pull", virt.JobPull, rec.Top, "", "[WAR] A pull job runs on disk 'vda' of 'dom', but not the blockcommit job an interrupted fi-backup run started: leaving it alone", false},
		{"a commit into another base", virt.JobCommit, rec.Top, "/elsewhere/base.qcow2", "[WAR] A active commit job runs", false},
		{"a commit of another top", virt.JobCommit, "/d/other-top", rec.Base, "[WAR] A active commit job runs", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newFakeDom(virt.Disk{Target: "vda", Device: "disk", Source: tc.top, Chain: imgs(tc.top, "/d/vm.qcow2", "/elsewhere/base.qcow2"), Complete: true})
			require.NoError(t, d.StartJob(tc.kind, "vda", tc.base, 0))
			c, out := newConsolidator(t, Commit)
			r := rec
			r.PID = 42
			require.NoError(t, c.Journal.Write(r))
			assert.NoError(t, c.Recover(d, &r))
			info, _ := d.JobInfo("vda")
			assert.Equal(t, !tc.aborted, info.Active, "job still there")
			assert.Contains(t, out.String(), tc.warn)
			assert.NoFileExists(t, c.Journal.Path("dom"), "the journal is done with either way")
		})
	}
}

// TestAbortFailureIsReported: an abort libvirt refuses while the job is
// still there is worth a warning, not silence.
func TestAbortFailureIsReported(t *testing.T) {
	d := newFakeDom(virt.Disk{Target: "vda", Device: "disk", Source: "/d/top", Chain: imgs("/d/top", "/d/base"), Complete: true})
	require.NoError(t, d.StartJob(virt.JobPull, "vda", "", 0))
	d.abortErr = &virt.Error{Msg: "internal error: boom"}
	c, out := newConsolidator(t, Pull)
	go func() {
		time.Sleep(20 * time.Millisecond)
		d.mu.Lock()
		d.job = nil // the job ends on its own after all
		d.mu.Unlock()
	}()
	assert.True(t, c.abort(d, "vda"))
	assert.Contains(t, out.String(), "[WAR] Aborting the block job on disk 'vda' of 'dom' failed: internal error: boom\n")
}

// TestEveryDiskTried (B35): a disk that cannot be consolidated does not
// stop the others; the domain still fails.
func TestEveryDiskTried(t *testing.T) {
	dir := t.TempDir()
	a := chainDisk(t, dir, "a.bimg-20240101-000001", "a.qcow2")
	b := chainDisk(t, dir, "b.bimg-20240101-000001", "b.qcow2")
	b.Target = "vdb"
	d := newFakeDom(a, b)
	d.readyAtStart = true
	c, out := newConsolidator(t, Commit)
	err := c.Domain(context.Background(), d, users{by: map[string]string{filepath.Join(dir, "a.qcow2"): "other"}})
	assert.ErrorIs(t, err, ErrFailed)
	assert.Equal(t, []string{"vdb"}, d.starts, "vda refused, vdb consolidated")
	assert.Contains(t, out.String(), "[VER] Consolidation of block device '"+filepath.Join(dir, "b.bimg-20240101-000001")+"' for 'dom' successful\n")
	assert.ElementsMatch(t, []string{"a.bimg-20240101-000001", "a.qcow2", "b.qcow2"}, files(t, dir))
}
