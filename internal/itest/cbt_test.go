package itest

// --cbt against the real libvirtd: push backups with checkpoints into plain
// qcow2 chains in the backup directory (issue 16). Every domain is named
// fibt-cbt-*; the tests only ever touch their own domains.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/backupdir"
)

// cbtRun runs one --cbt backup of d into bk.
func cbtRun(t *testing.T, bk string, d *Domain, extra ...string) result {
	t.Helper()
	args := append([]string{"--cbt", "-b", bk}, extra...)
	return run(t, append(args, d.Name)...)
}

// checkpoints lists the domain's checkpoints by name.
func (d *Domain) checkpoints(t *testing.T) []string {
	t.Helper()
	return strings.Fields(virsh(t, "checkpoint-list", d.Name, "--name"))
}

// zero writes zeroes (qemu-io write -z) into disk idx, as a guest's
// discard or zero-write would.
func (d *Domain) zero(t *testing.T, idx int, off, n string) {
	t.Helper()
	cmd := fmt.Sprintf(`qemu-io -d /machine/peripheral/virtio-disk%d/virtio-backend "write -z %s %s"`, idx, off, n)
	out := virsh(t, "qemu-monitor-command", d.Name, "--hmp", cmd)
	require.NotContains(t, out, "rror", "qemu-io write -z failed: %s", out)
}

// reference copies what the first disk holds now into a standalone qcow2
// file: the reference a restore point of this moment must equal. The
// domains have no OS, so nothing but the test writes to their disks.
func (s *cbtSeries) reference(t *testing.T) string {
	t.Helper()
	s.d.consFlush(t, 0)
	s.n++
	ref := filepath.Join(s.tmp, fmt.Sprintf("reference %d.qcow2", s.n))
	sh(t, "qemu-img", "convert", "-U", "-O", "qcow2", s.d.source(t, "vda"), ref)
	return ref
}

// identical asserts that two images hold the same data.
func identical(t *testing.T, a, b string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "compare", "-U", a, b).CombinedOutput()
	assert.NoError(t, err, "qemu-img compare %s %s: %s", a, b, out)
	assert.Contains(t, string(out), "Images are identical")
}

// cbtFiles lists the .cbt- files in bk, oldest first.
func cbtFiles(t *testing.T, bk string) []string {
	t.Helper()
	var out []string
	for _, f := range files(t, bk) {
		if backupdir.IsCBT(f) {
			out = append(out, f)
		}
	}
	return out
}

// noPartials asserts that bk holds no file a --cbt job is writing.
func noPartials(t *testing.T, bk string) {
	t.Helper()
	for _, f := range files(t, bk) {
		assert.NotContains(t, f, ".fi-backup-cbt", "a partial --cbt target is left in %s", bk)
	}
}

// backingName is the backing file an image names in its header, as written.
func backingName(t *testing.T, image string) string {
	t.Helper()
	var info struct {
		Backing string `json:"backing-filename"`
	}
	out := sh(t, "qemu-img", "info", "-U", "--output=json", image)
	require.NoError(t, json.Unmarshal([]byte(out), &info), out)
	return info.Backing
}

// restoreAt restores point moment of d from bk into a new directory and
// returns the restored image of its first disk.
func restoreAt(t *testing.T, bk string, d *Domain, moment string) string {
	t.Helper()
	target := filepath.Join(t.TempDir(), "restored "+moment)
	require.NoError(t, os.Mkdir(target, 0o755))
	r := run(t, "--restore="+moment, "--target_dir", target, "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	img := filepath.Join(target, filepath.Base(d.Disks[0]))
	require.FileExists(t, img)
	assert.Empty(t, backingName(t, img), "a restored disk stands alone")
	return img
}

// cbtSeries is a domain backed up with --cbt, with the reference image of
// every restore point.
type cbtSeries struct {
	d    *Domain
	bk   string
	refs map[string]string // moment → reference image
	tmp  string            // where the references are
	n    int
}

func newCBTSeries(t *testing.T, name string, o domOpts) *cbtSeries {
	return &cbtSeries{d: newDomain(t, name, o), bk: backupDir(t), refs: map[string]string{}, tmp: t.TempDir()}
}

// backup makes one --cbt run that must succeed, and returns its moment.
func (s *cbtSeries) backup(t *testing.T, extra ...string) (string, result) {
	t.Helper()
	ref := s.reference(t)
	chain := s.d.liveChain(t, "vda")
	before := points(t, s.bk, s.d.Name)
	r := cbtRun(t, s.bk, s.d, extra...)
	require.Equal(t, 0, r.Code)
	after := points(t, s.bk, s.d.Name)
	require.NotEmpty(t, after)
	m := after[len(after)-1].Moment
	newest := ""
	for _, p := range before {
		if p.Manifest { // a killed run's unrecorded file may be listed; the next run may reuse its moment
			newest = p.Moment
		}
	}
	require.Greater(t, m, newest, "a new restore point")
	require.True(t, after[len(after)-1].Manifest)
	s.refs[m] = ref
	assert.Equal(t, []string{"fi-backup-" + s.id(t) + "-" + m}, s.d.checkpoints(t), "one checkpoint: the newest restore point's")
	assert.Equal(t, chain, s.d.liveChain(t, "vda"), "the host's chain never changes")
	noPartials(t, s.bk)
	return m, r
}

func (s *cbtSeries) id(t *testing.T) string {
	b, err := os.ReadFile(filepath.Join(s.bk, backupdir.MetaDir, "id"))
	require.NoError(t, err)
	return strings.TrimSpace(string(b))
}

// checkAll restores every listed point and compares it with its reference;
// --verify passes.
func (s *cbtSeries) checkAll(t *testing.T) {
	t.Helper()
	pts := points(t, s.bk, s.d.Name)
	for _, p := range pts {
		assert.Equal(t, "cbt", p.Method)
		ref, ok := s.refs[p.Moment]
		require.True(t, ok, "no reference for %s", p.Moment)
		top := filepath.Join(s.bk, p.Disks[0].Chain[0])
		identical(t, ref, top)
		identical(t, ref, restoreAt(t, s.bk, s.d, p.Moment))
	}
	assert.Equal(t, 0, run(t, "--verify", "-b", s.bk, s.d.Name).Code)
}

// TestCBTFullAndIncrements: a full backup, then four increments with
// writes, overwrites and zero-writes between the runs. Each increment is
// a new qcow2 file whose backing file is the previous one by its relative
// name; every restore point reads back exactly the disk at its moment,
// from the backup directory alone (listed, verified, restored); the
// report records the job.
func TestCBTFullAndIncrements(t *testing.T) {
	s := newCBTSeries(t, "cbt-series", domOpts{})
	s.d.write(t, 0, 0x11, "0", "4M")
	s.d.write(t, 0, 0x12, "20M", "1M")
	m1, r := s.backup(t)
	assert.Contains(t, r.Stdout, "[INF] No --cbt restore point of '"+s.d.Name+"'")
	full := filepath.Join(s.bk, "disk1.cbt-"+m1)
	require.FileExists(t, full)
	assert.Empty(t, backingName(t, full), "the full backup has no backing file")

	writes := []func(){
		func() { s.d.write(t, 0, 0x21, "1M", "1M") },
		func() { s.d.zero(t, 0, "0", "512K"); s.d.write(t, 0, 0x22, "30M", "64K") },
		func() { s.d.zero(t, 0, "20M", "1M"); s.d.write(t, 0, 0x23, "63M", "1M") },
		func() { s.d.write(t, 0, 0x24, "0", "64M") },
	}
	prev := full
	for i, w := range writes {
		w()
		report := filepath.Join(t.TempDir(), "report.json")
		m, r := s.backup(t, "--report="+report)
		assert.NotContains(t, r.Stdout, "[WAR]")
		inc := filepath.Join(s.bk, "disk1.cbt-"+m)
		assert.Equal(t, filepath.Base(prev), backingName(t, inc), "increment %d names the previous file, relatively", i+1)
		assert.Equal(t, []string{inc, prev}, chainOf(t, inc)[:2])
		var rep struct {
			Domains []struct {
				Actions []string `json:"actions"`
				Moment  string   `json:"moment"`
				CBT     struct {
					Checkpoint, Incremental string
					OK                      bool
				} `json:"cbt"`
				Disks []struct {
					Files []struct{ Dest string }
				} `json:"disks"`
			} `json:"domains"`
		}
		b, err := os.ReadFile(report)
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(b, &rep), string(b))
		require.Len(t, rep.Domains, 1)
		dr := rep.Domains[0]
		assert.Contains(t, dr.Actions, "cbt")
		assert.Equal(t, m, dr.Moment)
		assert.True(t, dr.CBT.OK)
		assert.Equal(t, "fi-backup-"+s.id(t)+"-"+m, dr.CBT.Checkpoint)
		assert.Equal(t, "fi-backup-"+s.id(t)+"-"+filepath.Ext(prev)[len(".cbt-"):], dr.CBT.Incremental)
		require.Len(t, dr.Disks, 1)
		require.Len(t, dr.Disks[0].Files, 1)
		assert.Equal(t, inc, dr.Disks[0].Files[0].Dest)
		prev = inc
	}
	assert.Len(t, cbtFiles(t, s.bk), 5)
	// Increments hold only what changed: the small ones are far smaller
	// than the full backup.
	assert.Less(t, alloc(t, filepath.Join(s.bk, cbtFiles(t, s.bk)[1])), alloc(t, full)/2)

	// From the backup directory alone.
	moved := s.d.Dir + " moved away"
	virsh(t, "destroy", s.d.Name)
	require.NoError(t, os.Rename(s.d.Dir, moved))
	t.Cleanup(func() { _ = os.Rename(moved, s.d.Dir) })
	s.checkAll(t)
}

// TestCBTAbortedJob: a job aborted with virsh domjobabort while it runs
// (slowed by --rate_limit) fails the run and leaves no checkpoint and no
// file of it; older restore points stay intact, and the next run is an
// increment from the last good checkpoint that holds everything since.
// The same for a run stopped by SIGTERM.
func TestCBTAbortedJob(t *testing.T) {
	s := newCBTSeries(t, "cbt-abort", domOpts{size: "256M"})
	s.d.write(t, 0, 0x31, "0", "1M")
	m1, _ := s.backup(t)
	good := s.d.checkpoints(t)

	// Enough changed data that a job limited to 1 MiB/s runs for minutes
	// (QEMU copies some before the limit takes hold).
	s.d.consWriteMiB(t, 0, 0x32, 8, 200, 50)
	for _, stop := range []string{"domjobabort", "SIGTERM"} {
		t.Run(stop, func(t *testing.T) {
			cmd, out := consStart(t, "--cbt", "--rate_limit=1M", "-b", s.bk, s.d.Name)
			waitFor(t, func() bool { return backupJobRuns(t, s.d) })
			if stop == "domjobabort" {
				virsh(t, "domjobabort", s.d.Name)
			} else {
				require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
			}
			code := consWait(t, cmd, 2*time.Minute)
			t.Logf("fi-backup → %d\n%s", code, out)
			assert.NotEqual(t, 0, code)
			assert.Contains(t, out.String(), "[ERR] Backup for '"+s.d.Name+"' failed!")
			assert.Equal(t, good, s.d.checkpoints(t), "the aborted job's checkpoint is deleted")
			assert.Equal(t, []string{"disk1.cbt-" + m1}, cbtFiles(t, s.bk))
			noPartials(t, s.bk)
			assert.False(t, backupJobRuns(t, s.d))
			require.Len(t, points(t, s.bk, s.d.Name), 1)
		})
	}
	s.d.write(t, 0, 0x33, "2M", "1M")
	m2, r := s.backup(t)
	assert.NotContains(t, r.Stdout, "[WAR]")
	assert.Equal(t, "disk1.cbt-"+m1, backingName(t, filepath.Join(s.bk, "disk1.cbt-"+m2)), "an increment from the last good checkpoint")
	s.checkAll(t)
}

// backupJobRuns reports whether libvirt runs a backup job on d.
func backupJobRuns(t *testing.T, d *Domain) bool {
	cmd := exec.Command("virsh", "-c", uri, "domjobinfo", d.Name)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, string(out))
	return regexp.MustCompile(`Operation:\s+Backup`).Match(out) && !strings.Contains(string(out), "Job type:         None")
}

// TestCBTKilledRunRecovered: a run SIGKILLed at each step of a --cbt
// backup — its job just started, its file renamed but not recorded, its
// restore point recorded but its journal not cleared — is finished by the
// next run: a job still running is aborted, an unrecorded backup's
// checkpoint and files are deleted, and that next run is a correct
// increment from the last good checkpoint.
func TestCBTKilledRunRecovered(t *testing.T) {
	s := newCBTSeries(t, "cbt-killed", domOpts{})
	s.d.write(t, 0, 0x41, "0", "2M")
	s.backup(t)
	for i, step := range []string{"cbt-begun", "cbt-renamed", "cbt-recorded"} {
		t.Run(step, func(t *testing.T) {
			s.d.write(t, 0, byte(0x50+i), fmt.Sprintf("%dM", 4+i), "1M")
			before := points(t, s.bk, s.d.Name)
			ref := s.reference(t)
			killedRun(t, step, "--cbt", "-b", s.bk, s.d.Name)
			after := points(t, s.bk, s.d.Name)
			var orphan string
			switch step {
			case "cbt-recorded":
				require.Len(t, after, len(before)+1, "the restore point was recorded before the kill")
				s.refs[after[len(after)-1].Moment] = ref
			case "cbt-renamed":
				// A complete file without its manifest: the next run
				// deletes it.
				known := map[string]bool{}
				for _, p := range before {
					for _, f := range p.Files {
						known[f] = true
					}
				}
				var extra []string
				for _, f := range cbtFiles(t, s.bk) {
					if !known[f] {
						extra = append(extra, f)
					}
				}
				require.Len(t, extra, 1, "the killed run's renamed file")
				orphan = filepath.Join(s.bk, extra[0])
				t.Logf("after the kill: %v", after)
			default:
				require.Len(t, after, len(before))
			}
			m, r := s.backup(t)
			if orphan != "" && filepath.Base(orphan) != "disk1.cbt-"+m { // the next run may reuse the moment
				assert.NoFileExists(t, orphan)
			}
			if step == "cbt-recorded" {
				assert.Len(t, points(t, s.bk, s.d.Name), len(before)+2)
			} else {
				assert.Len(t, points(t, s.bk, s.d.Name), len(before)+1)
			}
			if step != "cbt-recorded" {
				assert.Contains(t, r.Stdout, "[WAR] Deleting the checkpoint 'fi-backup-"+s.id(t)+"-")
				prev := before[len(before)-1].Moment
				assert.Equal(t, "disk1.cbt-"+prev, backingName(t, filepath.Join(s.bk, "disk1.cbt-"+m)), "an increment from the last good point")
			}
			s.checkAll(t)
		})
	}
}

// TestCBTUncleanQEMUExit: QEMU killed with SIGKILL leaves the checkpoints'
// bitmaps inconsistent. The next run says so with a [WAR], deletes our
// checkpoints and makes a full backup; the older restore points stay
// intact.
func TestCBTUncleanQEMUExit(t *testing.T) {
	s := newCBTSeries(t, "cbt-crash", domOpts{})
	s.d.write(t, 0, 0x61, "0", "2M")
	s.backup(t)
	s.d.write(t, 0, 0x62, "3M", "1M")
	s.backup(t)

	pidFile := "/run/libvirt/qemu/" + s.d.Name + ".pid"
	b, err := os.ReadFile(pidFile)
	require.NoError(t, err)
	var pid int
	_, err = fmt.Sscan(string(b), &pid)
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	waitFor(t, func() bool { return s.d.state(t) == "shut off" })
	virsh(t, "start", s.d.Name)
	s.d.write(t, 0, 0x63, "5M", "1M")

	m, r := s.backup(t)
	assert.Contains(t, r.Stdout, "[WAR] The changed-block bitmaps of '"+s.d.Name+"' are inconsistent")
	assert.Empty(t, backingName(t, filepath.Join(s.bk, "disk1.cbt-"+m)), "a new full backup")
	s.d.write(t, 0, 0x64, "7M", "1M")
	m2, r := s.backup(t)
	assert.NotContains(t, r.Stdout, "[WAR]")
	assert.Equal(t, "disk1.cbt-"+m, backingName(t, filepath.Join(s.bk, "disk1.cbt-"+m2)))
	s.checkAll(t)
}

// TestCBTKeep: --keep on a --cbt series merges the oldest increments into
// the full backup; every kept point still reads back exactly, and the
// series goes on incrementing from the newest one.
func TestCBTKeep(t *testing.T) {
	s := newCBTSeries(t, "cbt-keep", domOpts{})
	var ms []string
	for i := 0; i < 5; i++ {
		s.d.write(t, 0, byte(0x70+i), fmt.Sprintf("%dM", 2*i), "2M")
		if i == 2 {
			s.d.zero(t, 0, "0", "1M")
		}
		m, _ := s.backup(t, "--keep=3")
		ms = append(ms, m)
	}
	pts := points(t, s.bk, s.d.Name)
	require.Len(t, pts, 3)
	for i, p := range pts {
		assert.Equal(t, ms[i+2], p.Moment)
	}
	assert.Equal(t, []string{"disk1.cbt-" + ms[0], "disk1.cbt-" + ms[3], "disk1.cbt-" + ms[4]}, cbtFiles(t, s.bk),
		"the increments of the dropped points are merged into the full backup")
	assert.Equal(t, "disk1.cbt-"+ms[0], backingName(t, filepath.Join(s.bk, "disk1.cbt-"+ms[3])))
	s.checkAll(t)
}

// TestCBTRefusals: the combinations --cbt refuses, before any work.
func TestCBTRefusals(t *testing.T) {
	d := newDomain(t, "cbt-refuse", domOpts{})
	bk := backupDir(t)
	for _, args := range [][]string{{"-c"}, {"-C"}, {"-s", bk}, {"-m", "blockpull"}} {
		r := run(t, append(append([]string{"--cbt", "-b", bk}, args...), d.Name)...)
		assert.Equal(t, 1, r.Code, "%v", args)
	}
	assert.Empty(t, d.checkpoints(t))
	assert.Empty(t, files(t, bk))
}

// TestCBTWithSnapshotOverlays: --cbt on a domain that the snapshot method
// also backs up (into another directory) and consolidates: the checkpoint
// lives in the active overlay, libvirt carries its bitmap onto a new
// overlay and merges it back on the blockcommit of -c, and every --cbt
// run after the first stays an increment that reads back exactly.
func TestCBTWithSnapshotOverlays(t *testing.T) {
	s := newCBTSeries(t, "cbt-overlay", domOpts{})
	other := backupDir(t, "snapshot method")
	s.d.write(t, 0, 0x81, "0", "2M")
	require.Equal(t, 0, run(t, "-b", other, s.d.Name).Code)
	require.Len(t, s.d.liveChain(t, "vda"), 2, "an overlay from the snapshot method")
	s.backup(t)
	steps := []func(){
		func() { s.d.write(t, 0, 0x82, "4M", "1M") },
		func() {
			require.Equal(t, 0, run(t, "-c", s.d.Name).Code)
			require.Len(t, s.d.liveChain(t, "vda"), 1, "consolidated")
			s.d.write(t, 0, 0x83, "6M", "1M")
		},
		func() {
			nextSecond() // a new snapshot name
			require.Equal(t, 0, run(t, "-b", other, s.d.Name).Code)
			s.d.zero(t, 0, "0", "1M")
		},
	}
	for i, step := range steps {
		step()
		m, r := s.backup(t)
		assert.NotContains(t, r.Stdout, "[WAR]", "step %d", i)
		assert.NotEmpty(t, backingName(t, filepath.Join(s.bk, "disk1.cbt-"+m)), "step %d is an increment", i)
	}
	s.checkAll(t)
}

// TestCBTQuiesceRealGuest: a real guest with qemu-guest-agent under write
// load, three --cbt -q runs with a marker file written before each (the
// first full, then increments). Each restore point, restored from the
// backup directory alone, has a clean file system before its boot, boots,
// and shows the marker of its moment.
func TestCBTQuiesceRealGuest(t *testing.T) {
	requireLibvirt(t)
	kernel, initrd := agentGuest(t)
	a := newAgentDomainPrefixed(t, "fibt-cbt-", "q", kernel, initrd)
	a.waitReady(t, 90*time.Second)
	a.waitWriting(t)
	bk := backupDir(t, "cbt quiesce backup")
	for i := 1; i <= 3; i++ {
		code, out := a.exec(t, fmt.Sprintf("echo marker-%d > /mnt/vda/marker && sync", i))
		require.Equal(t, 0, code, out)
		r := run(t, "--cbt", "-q", "-b", bk, a.Name)
		require.Equal(t, 0, r.Code)
		assert.NotContains(t, r.Stdout, "[WAR]")
	}
	pts := points(t, bk, a.Name)
	require.Len(t, pts, 3)
	for i, p := range pts {
		assert.True(t, p.Manifest)
		assert.True(t, p.Quiesced)
		assert.Equal(t, "cbt", p.Method)
		assert.Len(t, p.Disks[0].Chain, i+1, "a full backup, then increments")
	}
	require.Equal(t, 0, run(t, "--verify", "-b", bk, a.Name).Code)

	virsh(t, "destroy", a.Name)
	moved := a.Dir + " moved away"
	require.NoError(t, os.Rename(a.Dir, moved))
	t.Cleanup(func() { _ = os.Rename(moved, a.Dir) })
	for i, p := range pts {
		bootRestorePoint(t, bk, a, p.Moment, fmt.Sprintf("marker-%d\n", i+1))
	}
}

// TestCBTParallel: two domains whose disks have the same image name, backed
// up with --cbt --parallel=2 into one directory twice: the runs claim
// different moments for the clashing names, and every point of each domain
// restores exactly.
func TestCBTParallel(t *testing.T) {
	bk := backupDir(t)
	a := newCBTSeries(t, "cbt-par-a", domOpts{})
	b := newCBTSeries(t, "cbt-par-b", domOpts{})
	a.bk, b.bk = bk, bk
	for i := 0; i < 2; i++ {
		a.d.write(t, 0, byte(0x90+i), fmt.Sprintf("%dM", i), "1M")
		b.d.write(t, 0, byte(0xa0+i), fmt.Sprintf("%dM", 2+i), "1M")
		ra, rb := a.reference(t), b.reference(t)
		r := run(t, "--cbt", "--parallel=2", "-b", bk, a.d.Name, b.d.Name)
		require.Equal(t, 0, r.Code)
		for _, s := range []struct {
			s   *cbtSeries
			ref string
		}{{a, ra}, {b, rb}} {
			pts := points(t, bk, s.s.d.Name)
			require.Len(t, pts, i+1)
			s.s.refs[pts[i].Moment] = s.ref
			assert.Len(t, pts[i].Disks[0].Chain, i+1)
		}
	}
	noPartials(t, bk)
	a.checkAll(t)
	b.checkAll(t)
}

// TestCBTUndefineAndRedefine: the admin's path of the README for a domain
// that has our checkpoints. A plain undefine of the shut-off domain is
// refused by libvirt; undefine
// with --checkpoints-metadata works; the bitmaps left in the image are
// removed with qemu-img; the restore points in DIR are untouched; the
// redefined domain's next --cbt run is a full backup, and the series goes on.
func TestCBTUndefineAndRedefine(t *testing.T) {
	s := newCBTSeries(t, "cbt-undef", domOpts{})
	s.d.write(t, 0, 0x41, "0", "2M")
	s.backup(t)
	s.d.write(t, 0, 0x42, "1M", "1M")
	s.backup(t)
	def := filepath.Join(t.TempDir(), "dom.xml")
	require.NoError(t, os.WriteFile(def, []byte(virsh(t, "dumpxml", "--inactive", s.d.Name)), 0o644))

	virsh(t, "destroy", s.d.Name)
	out, err := exec.Command("virsh", "-c", uri, "undefine", s.d.Name).CombinedOutput()
	require.Error(t, err, "libvirt refuses to undefine a shut-off domain with checkpoints: %s", out)
	virsh(t, "undefine", s.d.Name, "--checkpoints-metadata")
	img := s.d.Disks[0]
	var info struct {
		Specific struct {
			Data struct {
				Bitmaps []struct{ Name string } `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	require.NoError(t, json.Unmarshal([]byte(sh(t, "qemu-img", "info", "--output=json", img)), &info))
	require.NotEmpty(t, info.Specific.Data.Bitmaps, "the checkpoint's bitmap stays in the image")
	for _, b := range info.Specific.Data.Bitmaps {
		require.True(t, strings.HasPrefix(b.Name, "fi-backup-"+s.id(t)+"-"), b.Name)
		sh(t, "qemu-img", "bitmap", "--remove", img, b.Name)
	}
	assert.Equal(t, 0, run(t, "--verify", "-b", s.bk, s.d.Name).Code, "the restore points are not affected")

	virsh(t, "define", def)
	virsh(t, "start", s.d.Name)
	s.d.write(t, 0, 0x43, "3M", "1M")
	m, _ := s.backup(t)
	assert.Empty(t, backingName(t, filepath.Join(s.bk, "disk1.cbt-"+m)), "a full backup")
	s.d.write(t, 0, 0x44, "4M", "1M")
	m2, _ := s.backup(t)
	assert.Equal(t, "disk1.cbt-"+m, backingName(t, filepath.Join(s.bk, "disk1.cbt-"+m2)))
	s.checkAll(t)
}
