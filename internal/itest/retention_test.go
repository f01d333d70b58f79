package itest

// Retention (--keep) and offline consolidation against the real libvirtd
// and real qemu-img (issue "Retention and offline consolidation").

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// series backs a domain up run after run, writing before each run: a
// MiB of its own (pattern 0x40+i at i MiB, i from 1) and the 2 MiB at 32M
// that every run overwrites. It remembers which moment each run made.
type series struct {
	d       *Domain
	bk      string
	moments []string // moments[i-1]: the point run i made
}

const sharedOff = "32M"

func (s *series) pattern(i int) byte { return byte(0x40 + i) }

// write makes run i's writes into the running domain.
func (s *series) write(t *testing.T, i int) {
	t.Helper()
	s.d.write(t, 0, s.pattern(i), fmt.Sprintf("%dM", i), "1M")
	s.d.write(t, 0, s.pattern(i), sharedOff, "2M")
}

// backup writes, runs fi-backup with args and records the new moment.
func (s *series) backup(t *testing.T, args ...string) result {
	t.Helper()
	i := len(s.moments) + 1
	s.write(t, i)
	r := consSnap(t, append(args, "-b", s.bk, s.d.Name)...)
	s.noteMoment(t)
	return r
}

// noteMoment records the newest listed point as the last run's.
func (s *series) noteMoment(t *testing.T) {
	t.Helper()
	pts := points(t, s.bk, s.d.Name)
	require.NotEmpty(t, pts)
	s.note(t, pts[len(pts)-1].Moment)
}

// noteManifest records the newest manifest's moment as the last run's,
// from the files alone (listing would finish an interrupted prune).
func (s *series) noteManifest(t *testing.T) {
	t.Helper()
	ms, err := filepath.Glob(filepath.Join(s.bk, backupdir.MetaDir, s.d.Name, "2*.json"))
	require.NoError(t, err)
	require.NotEmpty(t, ms)
	sort.Strings(ms)
	s.note(t, strings.TrimSuffix(filepath.Base(ms[len(ms)-1]), ".json"))
}

func (s *series) note(t *testing.T, newest string) {
	t.Helper()
	if len(s.moments) > 0 {
		require.Greater(t, newest, s.moments[len(s.moments)-1], "the run made a new restore point")
	}
	s.moments = append(s.moments, newest)
}

// run is the run that made moment m (1-based).
func (s *series) run(m string) int {
	for i, x := range s.moments {
		if x == m {
			return i + 1
		}
	}
	return 0
}

// checks are the reads that prove top holds exactly run k's moment.
func (s *series) checks(k int) []string {
	var c []string
	for i := 1; i <= len(s.moments)+1; i++ {
		want := byte(0)
		if i <= k {
			want = s.pattern(i)
		}
		c = append(c, fmt.Sprintf("read -P 0x%02x %dM 1M", want, i))
	}
	return append(c, fmt.Sprintf("read -P 0x%02x %s 2M", s.pattern(k), sharedOff))
}

// holds reports what of checks the image (read through its own headers)
// does not show; "" when it shows all.
func holds(t *testing.T, image string, checks []string) string {
	t.Helper()
	args := []string{"-r", "-U", "-f", "qcow2"}
	for _, c := range checks {
		args = append(args, "-c", c)
	}
	out, err := exec.Command("qemu-io", append(args, image)...).CombinedOutput()
	if err != nil || strings.Contains(string(out), "Pattern verification failed") || strings.Contains(string(out), "rror") {
		return fmt.Sprintf("%v: %s", err, out)
	}
	return ""
}

// check asserts the listed points are those of wantRuns, each reading back
// its moment from the backup directory, and that the directory holds no
// file that no listed point needs.
func (s *series) check(t *testing.T, wantRuns ...int) {
	t.Helper()
	pts := points(t, s.bk, s.d.Name)
	var got []int
	need := map[string]bool{}
	for _, p := range pts {
		k := s.run(p.Moment)
		got = append(got, k)
		assert.Empty(t, p.Broken)
		if p.Broken != "" || len(p.Disks) == 0 {
			continue
		}
		assert.Empty(t, holds(t, filepath.Join(s.bk, p.Disks[0].Chain[0]), s.checks(k)), "the point of run %d (%s) reads back its moment", k, p.Moment)
		for _, f := range p.Files {
			need[f] = true
		}
	}
	require.Equal(t, wantRuns, got, "the restore points listed (by run)")
	for _, f := range files(t, s.bk) {
		assert.True(t, need[f], "'%s' is in the backup directory, but no restore point needs it", f)
	}
}

// usage is the disk space the files under dir take.
func usage(t *testing.T, dir string) int64 {
	t.Helper()
	var total int64
	require.NoError(t, filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			total += fi.Sys().(*syscall.Stat_t).Blocks * 512
		}
		return err
	}))
	return total
}

func alloc(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	require.NoError(t, err)
	return st.Sys().(*syscall.Stat_t).Blocks * 512
}

// copiedLines are the "Copied N bytes of 'SRC'" debug lines of a run.
func copiedLines(out string) []string {
	var c []string
	for _, l := range consLines(out) {
		if strings.HasPrefix(l, "[DEB] Copied ") {
			c = append(c, l)
		}
	}
	return c
}

// TestKeepOnlineSeries: six online backups, --keep=3 from the fourth on:
// after each of those runs exactly the three newest points are listed,
// each reads back exactly its moment, the dropped ones and their files are
// gone, merging overlapping increments gave space back, the next backup
// copies only the new overlay, and --verify passes.
func TestKeepOnlineSeries(t *testing.T) {
	d := newDomain(t, "keep-series", domOpts{})
	s := &series{d: d, bk: backupDir(t)}
	var merged int64 // the allocated size of the copies merged away later
	var base3 int64
	for i := 1; i <= 6; i++ {
		args := []string{"-d"}
		if i >= 4 {
			args = append(args, "--keep=3")
		}
		r := s.backup(t, args...)
		if i == 3 {
			s.check(t, 1, 2, 3)
			pts := points(t, s.bk, d.Name)
			chain := pts[2].Disks[0].Chain // [o2, o1, base]
			require.Len(t, chain, 3)
			merged = alloc(t, filepath.Join(s.bk, chain[0])) + alloc(t, filepath.Join(s.bk, chain[1]))
			base3 = alloc(t, filepath.Join(s.bk, "disk1.qcow2"))
		}
		if i >= 4 {
			s.check(t, i-2, i-1, i)
		}
		if i == 6 {
			// Run 5 merged the first overlay's copy away; the host still
			// holds that overlay, unchanged: it is not copied again.
			c := copiedLines(r.Stdout)
			require.Len(t, c, 1, "only the new overlay is copied: %v", c)
			assert.Contains(t, c[0], filepath.Base(d.liveChain(t, "vda")[1]))
			assert.Contains(t, r.Stdout, "was merged into 'disk1.qcow2' by --keep and has not changed: not copied again")
			assert.Contains(t, r.Stdout, "[INF] Pruning restore point "+s.moments[2]+" of '"+d.Name+"' (--keep=3)")
		}
	}
	// The base took the two merged increments; their rewrites of the same
	// 2 MiB landed on the base's own clusters for that region.
	grown := alloc(t, filepath.Join(s.bk, "disk1.qcow2")) - base3
	assert.LessOrEqual(t, grown, merged-3<<20, "merging gave back the space of the overwritten data (base grew %d, merged copies took %d)", grown, merged)
	r := run(t, "--verify", "-b", s.bk, d.Name)
	assert.Equal(t, 0, r.Code)
	// The host chain is never touched: every overlay is still there.
	assert.Len(t, consOverlays(t, d.Dir), 6)
}

// TestKeepAcrossConsolidation: --keep through a live blockcommit (the base
// copy becomes a .gen- generation), a blockpull (the disk's image changes
// name) and back to plain backups: every kept point stays exact and
// verifiable, and what no kept point needs — generations included — goes.
func TestKeepAcrossConsolidation(t *testing.T) {
	d := newDomain(t, "keep-cons", domOpts{})
	s := &series{d: d, bk: backupDir(t)}
	s.backup(t)
	s.backup(t)
	s.backup(t, "-C", "-m", "blockcommit", "--keep=3")
	s.check(t, 1, 2, 3)
	s.backup(t, "--keep=3") // the changed base: copied again, the old copy a generation
	s.check(t, 2, 3, 4)
	gens, err := filepath.Glob(filepath.Join(s.bk, "disk1.qcow2.gen-*"))
	require.NoError(t, err)
	require.Len(t, gens, 1)
	s.backup(t, "-C", "-m", "blockpull", "--keep=3")
	s.check(t, 3, 4, 5)
	s.backup(t, "--keep=2") // the disk is now the pulled overlay
	s.check(t, 5, 6)
	gens, err = filepath.Glob(filepath.Join(s.bk, "*.gen-*"))
	require.NoError(t, err)
	assert.Empty(t, gens, "no kept point needs the generation any more")
	assert.Equal(t, 0, run(t, "--verify", "-b", s.bk, d.Name).Code)
}

// killedRun runs fi-backup with FI_BACKUP_TEST_KILL_AT=step, which makes it
// SIGKILL itself after that step of the prune, and checks that it died so.
func killedRun(t *testing.T, step string, args ...string) string {
	t.Helper()
	nextSecond()
	cmd := exec.Command(binary(t), args...)
	cmd.Env = append(os.Environ(), "FI_BACKUP_TEST_KILL_AT="+step)
	out, err := cmd.CombinedOutput()
	t.Logf("FI_BACKUP_TEST_KILL_AT=%s fi-backup %s\n%s", step, strings.Join(args, " "), out)
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	ws := ee.Sys().(syscall.WaitStatus)
	require.True(t, ws.Signaled() && ws.Signal() == syscall.SIGKILL, "killed at %s: %v", step, err)
	return string(out)
}

// keptExact checks, from the manifests alone and before any run finished
// the prune, that the points of runs still read back exactly.
func (s *series) keptExact(t *testing.T, runs ...int) {
	t.Helper()
	for _, k := range runs {
		b, err := os.ReadFile(filepath.Join(s.bk, backupdir.MetaDir, s.d.Name, s.moments[k-1]+".json"))
		require.NoError(t, err, "the manifest of the kept point of run %d", k)
		m, err := backupdir.ParseManifest(b)
		require.NoError(t, err)
		top := filepath.Join(s.bk, m.Disks[0].Chain[0].Name)
		assert.Empty(t, holds(t, top, s.checks(k)), "killed mid-prune: the point of run %d still reads back", k)
	}
}

// TestKeepKilledDuringMerge: fi-backup is SIGKILLed at each step of a
// prune in turn — between two dropped manifests, right after the commit,
// after the rebase, after the manifests' rewrite, between deletions — and
// once in the middle of a slow qemu-img commit. Each time the kept points
// read back exactly before anything is repaired, and the next run finishes
// the prune.
func TestKeepKilledDuringMerge(t *testing.T) {
	d := newDomain(t, "keep-kill", domOpts{})
	s := &series{d: d, bk: backupDir(t)}
	s.backup(t)
	d.write(t, 0, 0x99, "40M", "16M") // run 2's overlay: merged away in run 5
	s.backup(t)
	s.backup(t)
	s.backup(t, "--keep=3")
	s.check(t, 2, 3, 4)

	// Run 5 merges 16 MiB at 1 MiB/s: killed while qemu-img writes the base.
	s.write(t, 5)
	nextSecond()
	base := filepath.Join(s.bk, "disk1.qcow2")
	st0, err := os.Stat(base)
	require.NoError(t, err)
	cmd, out := consStart(t, "-d", "--keep=3", "--rate_limit=1M", "-b", s.bk, d.Name)
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(out.String(), "Committing [") {
		require.True(t, time.Now().Before(deadline), "no merge started:\n%s", out.String())
		time.Sleep(20 * time.Millisecond)
	}
	for {
		st, err := os.Stat(base)
		require.NoError(t, err)
		if !st.ModTime().Equal(st0.ModTime()) {
			break // qemu-img is writing into the base
		}
		require.True(t, time.Now().Before(deadline), "the commit never wrote:\n%s", out.String())
		time.Sleep(5 * time.Millisecond)
	}
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	consWait(t, cmd, 30*time.Second)
	t.Logf("killed mid-commit:\n%s", out.String())
	require.Eventually(t, func() bool {
		return exec.Command("pgrep", "-f", "qemu-img commit.*"+s.bk).Run() != nil
	}, 10*time.Second, 50*time.Millisecond, "qemu-img died with fi-backup")
	s.noteManifest(t) // the run's backup was recorded before its prune
	s.keptExact(t, 3, 4, 5)

	r := s.backup(t, "-d", "--keep=3")
	assert.Contains(t, r.Stdout, "[WAR] Finishing the change of the backup files of '"+d.Name+"' an interrupted run left")
	s.check(t, 4, 5, 6)

	for _, step := range []string{"drop", "merge", "rebase", "manifests", "delete"} {
		s.write(t, len(s.moments)+1)
		killedRun(t, step, "--keep=2", "-b", s.bk, d.Name)
		s.noteManifest(t)
		n := len(s.moments)
		s.keptExact(t, n-1, n)
		r := s.backup(t, "-d", "--keep=2")
		assert.Contains(t, r.Stdout, "an interrupted run left", "after a kill at %s", step)
		n = len(s.moments)
		s.check(t, n-1, n)
	}
	assert.Equal(t, 0, run(t, "--verify", "-b", s.bk, d.Name).Code)
}

// TestKeepTenNightlyRuns: ten -C --keep=3 runs with guest writes between
// them (a week and a half of nightly cron runs): the directory's size stays
// bounded and every point verifies and reads back its moment.
func TestKeepTenNightlyRuns(t *testing.T) {
	d := newDomain(t, "keep-ten", domOpts{})
	s := &series{d: d, bk: backupDir(t)}
	var after3 int64
	for i := 1; i <= 10; i++ {
		s.backup(t, "-C", "--keep=3")
		if i >= 3 {
			s.check(t, max(1, i-2), i-1, i)
		}
		if i == 3 {
			after3 = usage(t, s.bk)
		}
	}
	// Every run copies the committed base whole: three kept points are
	// three copies, no more (ten without --keep).
	full := alloc(t, filepath.Join(s.bk, "disk1.qcow2"))
	assert.LessOrEqual(t, usage(t, s.bk), 3*full+1<<20, "bounded by the three kept copies (%d after run 3)", after3)
	assert.Equal(t, 0, run(t, "--verify", "-b", s.bk, d.Name).Code)
	assert.Len(t, files(t, s.bk), 3, "one full copy per kept point: %v", files(t, s.bk))
}

// TestKeepBadInputAndVanishedDomains: --keep values that are not a count
// are refused before anything runs; a domain that no longer exists is
// pruned only when named, with a warning.
func TestKeepBadInputAndVanishedDomains(t *testing.T) {
	requireLibvirt(t)
	bk := backupDir(t)
	for _, args := range [][]string{{"--keep=0"}, {"--keep=-1"}, {"--keep=abc"}, {"--keep", "2.5"}} {
		r := run(t, append(args, "-b", bk, "fibt-none")...)
		assert.Equal(t, 1, r.Code, "%v", args)
		assert.Contains(t, r.Stdout, "[ERR] --keep requires a number of restore points, at least 1", "%v", args)
	}
	r := run(t, "--keep=2", "fibt-none")
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] --keep requires -b <directory>")

	d := newDomain(t, "keep-gone", domOpts{})
	s := &series{d: d, bk: bk}
	s.backup(t)
	s.backup(t)
	virsh(t, "destroy", d.Name)
	virsh(t, "undefine", d.Name)
	r = run(t, "--keep=1", "-b", bk, d.Name)
	assert.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[WAR] Domain '"+d.Name+"' does not exist: only pruning its restore points in '"+bk+"' (--keep=1)")
	pts := points(t, bk, d.Name)
	require.Len(t, pts, 1)
	assert.Equal(t, s.moments[1], pts[0].Moment)
	r = run(t, "--keep=1", "-b", bk, "fibt-never-was")
	assert.Equal(t, 1, r.Code, "no such domain and no restore points: the old error")
	assert.Contains(t, r.Stdout, "[ERR] Cannot find domain 'fibt-never-was'")
}

// offDomain is a running domain on a template shared with a second,
// defined domain, with three .bimg- overlays holding writes of its own;
// it returns the template's path.
func offDomain(t *testing.T, name string) (*Domain, string) {
	t.Helper()
	requireLibvirt(t)
	tpl := filepath.Join(t.TempDir(), "template.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", tpl, "64M")
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x10 0 1M", tpl)
	d := newDomain(t, name, domOpts{backing: map[string]string{"disk1.qcow2": tpl}})
	newDomain(t, name+"-twin", domOpts{backing: map[string]string{"disk1.qcow2": tpl}, noStart: true})
	return d, tpl
}

// overlaysWithWrites adds three overlays (snapshots without a copy), each
// layer holding one MiB of pattern (from first on), flushes and shuts the
// domain off.
func overlaysWithWrites(t *testing.T, d *Domain, first byte) {
	t.Helper()
	for i := 0; i < 3; i++ {
		d.write(t, 0, first+byte(i), fmt.Sprintf("%dM", 1+int(first-0x20)+i), "1M")
		consSnap(t, d.Name)
	}
	d.write(t, 0, first+3, fmt.Sprintf("%dM", 1+int(first-0x20)+3), "1M")
	d.consFlush(t, 0)
	virsh(t, "destroy", d.Name)
}

// inactiveXML is the domain's persistent definition as libvirt prints it.
func inactiveXML(t *testing.T, d *Domain) string {
	t.Helper()
	return virsh(t, "dumpxml", "--inactive", d.Name)
}

// TestOfflineConsolidation: -C -b, then -c, then -c -m blockpull on a
// shut-off domain with three overlays over a base on a shared template:
// afterwards the definition names the merged image and nothing else of it
// changed, the domain boots, the data written into the overlays is there,
// the template is byte-identical, and the files deleted are exactly the
// merged overlays. With nothing to merge, -c says so and succeeds.
func TestOfflineConsolidation(t *testing.T) {
	d, tpl := offDomain(t, "offcons")
	tplSum := consSHA256(t, tpl)
	bk := backupDir(t)
	base := d.Disks[0]

	r := run(t, "-c", d.Name) // running, nothing of ours to merge
	require.Equal(t, 0, r.Code)
	virsh(t, "destroy", d.Name)
	r = run(t, "-c", d.Name)
	assert.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[INF] No backup overlay (.bimg-) on top of '"+base+"' for '"+d.Name+"'. Nothing to do.")
	virsh(t, "start", d.Name)

	verify := func(t *testing.T, top string, upTo byte) {
		t.Helper()
		for p := byte(0x20); p <= upTo; p++ {
			consReads(t, top, p, fmt.Sprintf("%dM", 1+int(p-0x20)), "1M")
		}
		consReads(t, top, 0x10, "0", "1M")
		assert.Equal(t, tplSum, consSHA256(t, tpl), "the template is byte-identical")
		virsh(t, "start", d.Name)
		d.consRunning(t)
	}

	// -C -b: the copy first, then the merge into the base.
	overlaysWithWrites(t, d, 0x20)
	before := inactiveXML(t, d)
	r = run(t, "-d", "-C", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	assert.Equal(t, base, d.source(t, "vda"), "the definition names the base")
	assert.Empty(t, virt.DiffOutside(before, inactiveXML(t, d), "vda"), "nothing else of the definition changed")
	assert.Equal(t, []string{"disk1.qcow2"}, files(t, d.Dir), "exactly the merged overlays were deleted")
	pts := points(t, bk, d.Name)
	require.Len(t, pts, 1)
	assert.Len(t, pts[0].Disks[0].Chain, 5, "the copy holds the chain as it was: 3 overlays, base, template")
	verify(t, base, 0x23)

	// -c without -b: nothing copied, the same merge.
	overlaysWithWrites(t, d, 0x24)
	r = run(t, "-c", d.Name)
	require.Equal(t, 0, r.Code)
	assert.Equal(t, base, d.source(t, "vda"))
	assert.Equal(t, []string{"disk1.qcow2"}, files(t, d.Dir))
	verify(t, base, 0x27)

	// -c -m blockpull: the top takes everything and stands alone.
	overlaysWithWrites(t, d, 0x28)
	top := d.source(t, "vda")
	r = run(t, "-c", "-m", "blockpull", d.Name)
	require.Equal(t, 0, r.Code)
	assert.Equal(t, top, d.source(t, "vda"))
	assert.Equal(t, []string{top}, chainOf(t, top), "standalone")
	left := files(t, d.Dir)
	assert.ElementsMatch(t, []string{"disk1.qcow2", filepath.Base(top)}, left, "the overlays below the top are deleted, the base is kept")
	assert.Contains(t, r.Stdout, "[WAR] '"+base+"' doesn't seem to be a backup backing file image. Not deleting it (manual intervention required)")
	verify(t, top, 0x2b)
}

// TestOfflineConsolidationStartDuringCommit: a `virsh start` while
// qemu-img commits is refused by QEMU's image locks; the consolidation
// completes, the domain stays shut off on its merged base, nothing is lost.
func TestOfflineConsolidationStartDuringCommit(t *testing.T) {
	d := newDomain(t, "offcons-start", domOpts{})
	d.write(t, 0, 0x51, "0", "1M")
	consSnap(t, d.Name)
	d.write(t, 0, 0x52, "4M", "24M") // 24 MiB to commit at 2 MiB/s
	d.consFlush(t, 0)
	virsh(t, "destroy", d.Name)

	cmd, out := consStart(t, "-d", "-c", "--rate_limit=2M", d.Name)
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(out.String(), "Committing into '"+d.Disks[0]+"' with qemu-img") {
		require.True(t, time.Now().Before(deadline), "no commit started:\n%s", out.String())
		time.Sleep(20 * time.Millisecond)
	}
	st0, err := os.Stat(d.Disks[0])
	require.NoError(t, err)
	for { // qemu-img writes into the base: it holds the images' locks
		st, err := os.Stat(d.Disks[0])
		require.NoError(t, err)
		if !st.ModTime().Equal(st0.ModTime()) {
			break
		}
		require.True(t, time.Now().Before(deadline), "the commit never wrote:\n%s", out.String())
		time.Sleep(5 * time.Millisecond)
	}
	start := exec.Command("virsh", "-c", uri, "start", d.Name)
	startOut, err := start.CombinedOutput()
	t.Logf("virsh start during the commit: %v\n%s", err, startOut)
	require.Error(t, err, "QEMU cannot take the image's write lock while qemu-img commits")
	assert.Contains(t, string(startOut), "lock")
	require.Equal(t, 0, consWait(t, cmd, 90*time.Second), out.String())
	assert.Equal(t, "shut off", d.state(t))
	assert.Equal(t, d.Disks[0], d.source(t, "vda"))
	consReads(t, d.Disks[0], 0x51, "0", "1M")
	consReads(t, d.Disks[0], 0x52, "4M", "24M")
	virsh(t, "start", d.Name)
	d.consRunning(t)
}

// TestConsolidatePausedRefused: a paused domain's images are QEMU's: -c
// keeps the old refusal, with exit 1, and the domain stays paused.
func TestConsolidatePausedRefused(t *testing.T) {
	d := newDomain(t, "cons-paused", domOpts{})
	consSnap(t, d.Name)
	virsh(t, "suspend", d.Name)
	bd := backupDir(t)
	r := run(t, "-b", bd, "-c", d.Name)
	assert.Equal(t, 1, r.Code)
	for _, l := range []string{
		fmt.Sprintf("[ERR] Consolidation only works with running domains. '%s' is not running! Doing full backup only of '%s'", d.Name, d.Name),
		fmt.Sprintf("[ERR] Skipping consolidation/backup of '%s'", d.Name),
	} {
		assert.True(t, consHasLine(r.Stdout, l), "missing %q", l)
	}
	assert.Empty(t, files(t, bd), "nothing copied")
	assert.Len(t, consOverlays(t, d.Dir), 1, "nothing merged")
	assert.Equal(t, "paused", d.state(t))
}
