package itest

// Trust under real use (issue "Trust under real use"): each test here
// failed with fi-backup 3.0.0 and pins the fix.

import (
	"bufio"
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
	"golang.org/x/sys/unix"
)

// assertLinesInOrder checks that each line appears as a whole line of out,
// after the previous one.
func assertLinesInOrder(t *testing.T, out string, lines ...string) {
	t.Helper()
	all := consLines(out)
	i := 0
	for _, want := range lines {
		found := false
		for ; i < len(all); i++ {
			if all[i] == want {
				found = true
				i++
				break
			}
		}
		if !assert.True(t, found, "line %q missing or out of order in:\n%s", want, out) {
			return
		}
	}
}

// TestConsolidateNeverIntoGoldenImage: a disk that is an overlay of a
// golden image nobody else uses. With no fi-backup overlay on top (a -c
// after an earlier -c, or after a failed backup), neither method touches
// anything: nothing to do, exit 0. With overlays on top, blockcommit merges
// them into the disk's own image, never into the golden one.
func TestConsolidateNeverIntoGoldenImage(t *testing.T) {
	requireLibvirt(t)
	golden := filepath.Join(t.TempDir(), "golden.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", golden, "64M")
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", golden)
	d := newDomain(t, "golden", domOpts{disks: []string{"vm.qcow2"}, backing: map[string]string{"vm.qcow2": golden}})
	vm := d.Disks[0]
	sum := consSHA256(t, golden)
	d.write(t, 0, 0x62, "1M", "1M") // the domain's own data, in vm.qcow2
	d.consFlush(t, 0)

	for _, method := range []string{"blockcommit", "blockpull"} {
		r := run(t, "-d", "-m", method, "-c", d.Name)
		assert.Equal(t, 0, r.Code, method)
		assert.True(t, consHasLine(r.Stdout, "[INF] No backup overlay (.bimg-) on top of '"+vm+"' for '"+d.Name+"'. Nothing to do."), method)
		assert.Equal(t, []string{vm, golden}, d.liveChain(t, "vda"), "%s: the domain stays on its own disk", method)
		assert.Equal(t, sum, consSHA256(t, golden), "%s: the golden image is untouched", method)
		assert.FileExists(t, vm)
	}

	consSnap(t, "-d", d.Name)
	d.write(t, 0, 0x63, "2M", "1M")
	r := run(t, "-d", "-c", d.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[DEB] Committing into '"+vm+"'")
	assert.Equal(t, []string{vm, golden}, d.liveChain(t, "vda"))
	assert.Equal(t, sum, consSHA256(t, golden), "the golden image is untouched")
	d.consFlush(t, 0)
	consReads(t, vm, 0x61, "0", "1M")
	consReads(t, vm, 0x62, "1M", "1M")
	consReads(t, vm, 0x63, "2M", "1M")
	r = run(t, "-d", "-c", d.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "Nothing to do.", "a second -c has nothing of ours to merge")
	assert.Equal(t, sum, consSHA256(t, golden))
	d.consRunning(t)
}

// TestStateDumpClosedStdout: with stdout closed (a reader that went away,
// `| head`), -s still finishes: the guest is resumed, the state file and the
// backup are complete, and the run ends with exit 1 (output was lost) —
// never killed by SIGPIPE with the guest paused.
func TestStateDumpClosedStdout(t *testing.T) {
	d := newDomain(t, "sd-closed", domOpts{})
	sd, bk := sdStateDir(t), t.TempDir()
	r, w, err := os.Pipe()
	require.NoError(t, err)
	require.NoError(t, r.Close()) // nobody reads: every write fails with EPIPE
	cmd := exec.Command(binary(t), "-d", "-s", sd, "-b", bk, d.Name)
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = w, &stderr
	err = cmd.Run()
	require.NoError(t, w.Close())
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee, "stderr: %s", stderr.String())
	assert.Equal(t, 1, ee.ExitCode(), "not killed by SIGPIPE (status: %v); stderr: %s", ee, stderr.String())
	assert.Contains(t, stderr.String(), "output lost")
	assert.Equal(t, "running", d.state(t))
	assert.Len(t, sdStateFiles(t, sd)[d.Name], 1, "the state file is complete, under its final name")
	assert.Len(t, overlays(t, d.Dir), 1)
	assert.Equal(t, []string{"disk1.qcow2"}, files(t, bk))
}

// TestStateDumpFullStdout: a reader that stops reading (a full pipe) does
// not keep a -s guest paused: nothing is written while the guest is
// paused, so the dump, the snapshot and the resume all happen while the
// tool's output is stuck; the held lines come when the reader reads again.
func TestStateDumpFullStdout(t *testing.T) {
	d := newDomain(t, "sd-fullout", domOpts{})
	sd := sdStateDir(t)
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	_, err = unix.FcntlInt(w.Fd(), unix.F_SETPIPE_SZ, 4096)
	require.NoError(t, err)
	cmd := exec.Command(binary(t), "-d", "-s", sd, d.Name)
	cmd.Stdout, cmd.Stderr = w, os.Stderr
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	require.NoError(t, w.Close())
	br := bufio.NewReader(r)
	var seen strings.Builder
	for !strings.Contains(seen.String(), "[DEB] Using timestamp '") {
		line, err := br.ReadString('\n')
		require.NoError(t, err, "output so far:\n%s", seen.String())
		seen.WriteString(line)
	}
	// Stop reading and fill what is left of the pipe from our side: from
	// now on every write of the tool blocks until we read again.
	// (raw syscalls: an *os.File would park a non-blocking write in Go's
	// poller instead of returning EAGAIN)
	filler, err := unix.Open(fmt.Sprintf("/proc/%d/fd/%d", cmd.Process.Pid, 1), unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	require.NoError(t, err)
	for {
		if _, err := unix.Write(filler, make([]byte, 512)); err != nil {
			require.ErrorIs(t, err, unix.EAGAIN)
			break
		}
	}
	require.NoError(t, unix.Close(filler))

	stateFile := func() bool {
		for _, f := range files(t, sd) {
			if g := sdFileRE.FindStringSubmatch(f); g != nil && g[1] == d.Name {
				return true
			}
		}
		return false
	}
	require.True(t, eventually(60*time.Second, func() bool {
		return len(overlays(t, d.Dir)) == 1 && stateFile() && d.state(t) == "running"
	}), "with its stdout stuck, the tool did not dump, snapshot and resume the guest (state %s)", d.state(t))
	rest := make(chan string, 1)
	go func() {
		b, _ := ioReadAll(br)
		rest <- string(b)
	}()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(60 * time.Second):
		t.Fatal("the tool did not finish once its output was read")
	}
	out := strings.ReplaceAll(<-rest, "\x00", "")
	assert.Contains(t, out, "[VER] Domain resumed\n", "the held lines come after all")
	sdPauses(t, out)
}

// TestBackupDirHoldsDiskFiles: -b pointing at the disks' own directory
// (directly or through a link), or at one holding another domain's disks,
// is refused before anything happens: no overlay, no copy onto a live
// file, no backing reference of a live file rewritten (offline).
func TestBackupDirHoldsDiskFiles(t *testing.T) {
	d := newDomain(t, "bdir", domOpts{})
	link := filepath.Join(t.TempDir(), "link to disks")
	require.NoError(t, os.Symlink(d.Dir, link))
	sum := consSHA256(t, d.Disks[0])
	for _, dir := range []string{d.Dir, link} {
		r := run(t, "-b", dir, d.Name)
		assert.Equal(t, 1, r.Code)
		assert.Contains(t, r.Stdout, "[ERR] Backup directory '"+dir+"' holds disk files in use: copying '"+d.Disks[0]+"' there would overwrite")
		assert.Empty(t, overlays(t, d.Dir), "refused before the snapshot")
		assert.Equal(t, sum, consSHA256(t, d.Disks[0]))
	}

	// Another domain's disks: its disk1.qcow2 would be overwritten.
	e := newDomain(t, "bdir-other", domOpts{})
	r := run(t, "-b", e.Dir, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "would overwrite '"+e.Disks[0]+"' of domain '"+e.Name+"'")
	assert.Empty(t, overlays(t, d.Dir))

	// Offline: a shut-off domain whose disk is an overlay (absolute backing
	// reference, as libvirt writes it).
	f := newDomain(t, "bdir-off", domOpts{noStart: true})
	top := filepath.Join(f.Dir, "top.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", f.Disks[0], top)
	virsh(t, "detach-disk", f.Name, "vda", "--config")
	virsh(t, "attach-disk", f.Name, top, "vda", "--subdriver", "qcow2", "--config")
	sums := map[string]string{top: consSHA256(t, top), f.Disks[0]: consSHA256(t, f.Disks[0])}
	r = run(t, "-b", f.Dir, f.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "holds disk files in use")
	for p, s := range sums {
		assert.Equal(t, s, consSHA256(t, p), "%s untouched", p)
	}
	assert.Equal(t, []string{top, f.Disks[0]}, chainOf(t, top), "the live backing reference is still absolute")
}

// TestDomainStartedDuringRun: a domain listed as shut off is started while
// an earlier domain of the same run is being copied (rate-limited, so the
// start always happens during the copy). When its turn comes it is backed
// up online, never copied offline as if its disks were at rest.
func TestDomainStartedDuringRun(t *testing.T) {
	a := newDomain(t, "started-a", domOpts{disks: []string{"a.qcow2"}})
	b := newDomain(t, "started-b", domOpts{disks: []string{"b.qcow2"}, noStart: true})
	a.consWriteMiB(t, 0, 0x71, 0, 32, 32)
	a.consFlush(t, 0)
	bk := t.TempDir()
	nextSecond()
	cmd, out := consStart(t, "-d", "--rate_limit=4M", "-b", bk, a.Name, b.Name)
	waitForTemp(t, bk, out)
	virsh(t, "start", b.Name)
	code := consWait(t, cmd, 2*time.Minute)
	t.Logf("→ %d\n%s", code, out.String())
	assert.Equal(t, 0, code)
	assert.Contains(t, out.String(), "[DEB] Domains NOTRUNNING to backup:  "+b.Name+"\n")
	assert.Len(t, overlays(t, b.Dir), 1, "b was snapshotted: backed up online")
	assert.NotContains(t, out.String(), "All 1 block files for '"+b.Name+"'", "no offline copy of a running domain")
	assert.Contains(t, files(t, bk), "b.qcow2")
	assert.Equal(t, "running", b.state(t))
}

// TestJournalNeverAbortsAnotherJob: a journal left by a killed run
// describes a blockcommit; the job now on the disk is someone's blockpull.
// The next run leaves that job alone.
func TestJournalNeverAbortsAnotherJob(t *testing.T) {
	d := newDomain(t, "other-job", domOpts{})
	d.consWriteMiB(t, 0, 0x72, 0, 32, 32)
	consSnap(t, d.Name)
	chain := d.liveChain(t, "vda")
	virsh(t, "blockpull", d.Name, "vda", "--bandwidth", "1") // 1 MiB/s: 32 s at least
	t.Cleanup(func() { _ = exec.Command("virsh", "-c", uri, "blockjob", d.Name, "vda", "--abort").Run() })
	journal := fmt.Sprintf(`{"domain":%q,"disk":"vda","kind":"blockcommit","top":%q,"base":%q,"pid":1}`, d.Name, chain[0], chain[1])
	jpath := "/var/lock/" + d.Name + ".fi-backup.job"
	require.NoError(t, os.WriteFile(jpath, []byte(journal), 0o600))
	t.Cleanup(func() { _ = os.Remove(jpath) })

	r := run(t, "-d", "-c", d.Name)
	assert.Contains(t, r.Stdout, "[WAR] A pull job runs on disk 'vda' of '"+d.Name+"', but not the blockcommit job an interrupted fi-backup run started: leaving it alone")
	assert.NotContains(t, r.Stdout, "[WAR] Aborting")
	info := virsh(t, "blockjob", d.Name, "vda", "--info")
	assert.Contains(t, info, "Pull", "someone else's job runs on")
	assert.NoFileExists(t, jpath)
}

// TestUnreadableChainFailsClosed: another defined domain's chain cannot be
// read (a backing file is missing). A commit could write into a file that
// chain uses, so it is refused, naming that domain; a pull (which writes
// only into the active layer) runs, but deletes nothing.
func TestUnreadableChainFailsClosed(t *testing.T) {
	a := newDomain(t, "closed-a", domOpts{})
	gone := filepath.Join(t.TempDir(), "gone.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", gone, "64M")
	c := newDomain(t, "closed-c", domOpts{disks: []string{"c.qcow2"}, backing: map[string]string{"c.qcow2": gone}, noStart: true})
	require.NoError(t, os.Remove(gone))
	consSnap(t, "-d", a.Name)
	a.write(t, 0, 0x73, "0", "1M")
	before := a.liveChain(t, "vda")

	r := run(t, "-d", "-c", a.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[WAR] Cannot read the backing chain of domain '"+c.Name+"': ")
	assert.Contains(t, r.Stdout, "cannot check whether other domains use '"+a.Disks[0]+"'")
	assert.Equal(t, before, a.liveChain(t, "vda"), "nothing committed")

	r = run(t, "-d", "-m", "blockpull", "-c", a.Name)
	assert.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[WAR] '"+before[1]+"' may be in use by another domain (the backing chain of domain '"+c.Name+"' could not be read). Not deleting it")
	for _, f := range before {
		assert.FileExists(t, f)
	}
}

// TestRecoverKilledDumpAllRunning: a guest a killed -s run left paused is
// resumed by a later `-r` run too (which lists running domains only), and
// backed up with them.
func TestRecoverKilledDumpAllRunning(t *testing.T) {
	d := newDomain(t, "recover-dump-r", domOpts{})
	sd := sdStateDir(t)
	p := sdStartHeldPaused(t, d, sd)
	require.NoError(t, syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL))
	<-p.done
	require.Equal(t, "paused", d.state(t))
	virsh(t, "qemu-monitor-command", d.Name, `{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"pause-before-switchover","state":false}]}}`)
	nextSecond()
	r := run(t, "-d", "-r")
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[WAR] Resumed domain '"+d.Name+"', left paused by an interrupted fi-backup -s run")
	assert.Regexp(t, `\[DEB\] Domains RUNNING to backup: (.*\n)*`+regexp.QuoteMeta(d.Name)+`\n`, r.Stdout)
	assert.Equal(t, "running", d.state(t))
	assert.Len(t, overlays(t, d.Dir), 1, "backed up with the running domains")
}

// TestSecondSignalExitsAtOnce: the first SIGTERM starts the cleanup, which
// waits on libvirt (here stopped with SIGSTOP, so it waits for ever); a
// second SIGTERM exits at once. The job's journal stays, and the next run
// (libvirtd back) finds it — aborting the job if it is still there (the
// abort sent before the exit may have reached libvirtd) — and
// consolidates.
func TestSecondSignalExitsAtOnce(t *testing.T) {
	d := newDomain(t, "second-signal", domOpts{})
	orig := d.Disks[0]
	consSnap(t, "-d", d.Name)
	d.consWriteMiB(t, 0, 0x74, 0, 32, 32)
	cmd, out := consStart(t, "-d", "-c", "--rate_limit=4M", d.Name)
	waitForJob(t, d, "vda", out)
	cont := func() { _ = exec.Command("pkill", "-CONT", "-x", "libvirtd").Run() }
	t.Cleanup(cont)
	sh(t, "pkill", "-STOP", "-x", "libvirtd")
	require.NoError(t, syscall.Kill(cmd.Process.Pid, syscall.SIGTERM))
	// Two signals sent at once merge into one (in the kernel and in Go's
	// runtime): send the second once the tool has taken the first.
	require.True(t, eventually(10*time.Second, func() bool {
		return strings.Contains(out.String(), "[INF] Interrupted by SIGTERM: cleaning up (a second signal exits at once)")
	}), "the first signal was not taken:\n%s", out.String())
	require.NoError(t, syscall.Kill(cmd.Process.Pid, syscall.SIGTERM))
	code := consWait(t, cmd, 15*time.Second)
	cont()
	t.Logf("→ %d\n%s", code, out.String())
	assert.Equal(t, 143, code)
	assert.Contains(t, out.String(), "[ERR] Interrupted again by SIGTERM: exiting without cleaning up")
	assert.FileExists(t, "/var/lock/"+d.Name+".fi-backup.job", "the journal stays for the next run")

	r := run(t, "-d", "-c", d.Name)
	require.Equal(t, 0, r.Code)
	assert.NoFileExists(t, "/var/lock/"+d.Name+".fi-backup.job")
	assert.Equal(t, []string{orig}, d.liveChain(t, "vda"))
	d.consFlush(t, 0)
	consReads(t, orig, 0x74, "0", "32M")
}

// TestCoarseTimestampBackupDir: a backup directory on a file system that
// keeps whole seconds (ext4 with 128-byte inodes, as on small or old
// file systems): the cp -up copy of an unchanged file is up to date on the
// next run, which copies nothing and keeps no generation.
func TestCoarseTimestampBackupDir(t *testing.T) {
	d := newDomain(t, "coarse", domOpts{noStart: true})
	d.write0ffline(t, 0x75)
	img := filepath.Join(t.TempDir(), "coarse.img")
	sh(t, "truncate", "-s", "64M", img)
	sh(t, "mkfs.ext4", "-q", "-F", "-I", "128", img)
	bk := filepath.Join(t.TempDir(), "coarse backup")
	require.NoError(t, os.Mkdir(bk, 0o755))
	sh(t, "mount", "-o", "loop", img, bk)
	t.Cleanup(func() { _ = exec.Command("umount", bk).Run() })

	r := run(t, "-d", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "keeps modification times to 1s")
	r = run(t, "-d", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[DEB] '"+filepath.Join(bk, "disk1.qcow2")+"': destination is up to date\n")
	assert.NotContains(t, r.Stdout, "[DEB] Copied ")
	for _, f := range files(t, bk) {
		assert.NotContains(t, f, ".gen-")
	}
}

// write0ffline writes a pattern into a shut-off domain's first disk.
func (d *Domain) write0ffline(t *testing.T, pattern byte) {
	t.Helper()
	sh(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x%02x 0 1M", pattern), d.Disks[0])
}

// TestDebugLinesMatchOldTool: every [DEB]/[VER] line the old script printed
// on these success paths is printed, with the same text and in the same
// order (except that copies go base first), as seen side by side with
// fi-backup.sh on twin domains: two online runs of a two-disk domain, a
// consolidation, an offline run.
func TestDebugLinesMatchOldTool(t *testing.T) {
	d := newDomain(t, "oldlines", domOpts{disks: []string{"disk1.qcow2", "disk2.qcow2"}})
	bk := t.TempDir()
	r := consSnap(t, "-d", "-b", bk, d.Name)
	ts := strings.TrimPrefix(filepath.Ext(overlays(t, d.Dir)[0]), ".bimg-")
	ov := func(disk, stamp string) string { return filepath.Join(d.Dir, disk+".bimg-"+stamp) }
	dsk := func(disk string) string { return filepath.Join(d.Dir, disk+".qcow2") }
	assertLinesInOrder(t, r.Stdout,
		"[DEB] Domains NOTRUNNING to backup: ",
		"[DEB] Domains RUNNING to backup:  "+d.Name,
		"[DEB] Snapshot for domain '"+d.Name+"' requested",
		"[DEB] Using timestamp '"+ts+"'",
		"[DEB] Snapshotting block devices for '"+d.Name+"' using suffix 'bimg-"+ts+"'",
		"[VER] Snapshot for block devices of '"+d.Name+"' successful",
		"[DEB] Getting all backing files for: '"+ov("disk1", ts)+"'",
		"[DEB] Next file in backing file chain: ''",
		"[VER] Copy backing file '"+dsk("disk1")+"' to '"+filepath.Join(bk, "disk1.qcow2")+"'",
		"[DEB] Getting all backing files for: '"+ov("disk2", ts)+"'",
		"[DEB] Next file in backing file chain: ''",
		"[VER] Copy backing file '"+dsk("disk2")+"' to '"+filepath.Join(bk, "disk2.qcow2")+"'",
	)
	r = consSnap(t, "-d", "-b", bk, d.Name)
	stamps := sdOverlayStamps(t, d.Dir)
	require.Len(t, stamps, 2)
	ts2 := stamps[1]
	assertLinesInOrder(t, r.Stdout,
		"[DEB] Getting all backing files for: '"+ov("disk1", ts2)+"'",
		"[DEB] Next file in backing file chain: '"+dsk("disk1")+"'",
		"[DEB] Next file in backing file chain: ''",
		"[VER] Copy backing file '"+dsk("disk1")+"' to '"+filepath.Join(bk, "disk1.qcow2")+"'",
		"[VER] Copy backing file '"+ov("disk1", ts)+"' to '"+filepath.Join(bk, "disk1.bimg-"+ts)+"'",
		"[DEB] Getting all backing files for: '"+ov("disk2", ts2)+"'",
		"[DEB] Next file in backing file chain: '"+dsk("disk2")+"'",
		"[DEB] Next file in backing file chain: ''",
	)

	r = run(t, "-dc", d.Name)
	require.Equal(t, 0, r.Code)
	assertLinesInOrder(t, r.Stdout,
		"[DEB] Domains RUNNING to backup:  "+d.Name,
		"[DEB] Consolidation of block devices for '"+d.Name+"' requested",
		"[DEB] Block devices to be consolidated:",
		"\t"+ov("disk1", ts2)+" "+ov("disk2", ts2),
		"[DEB] Consolidation method: blockcommit",
		"[DEB] Consolidation of '0' block device: '"+ov("disk1", ts2)+"' for '"+d.Name+"'",
		"[DEB] Parent block device: '"+ov("disk1", ts)+"'",
		"[DEB] Next file in backing file chain: '"+dsk("disk1")+"'",
		"[DEB] Next file in backing file chain: ''",
		"[VER] Consolidation of block device '"+ov("disk1", ts2)+"' for '"+d.Name+"' successful",
		"[DEB] Not deleting last element of snapshot_chain (top parent) since consolidation method='blockcommit'",
		"[VER] Deleting old backing files for '"+d.Name+"'",
		"[VER] Deleting old backing file '"+ov("disk1", ts2)+"' for '"+d.Name+"'",
		"[VER] Deleting old backing file '"+ov("disk1", ts)+"' for '"+d.Name+"'",
		"[DEB] Consolidation of '1' block device: '"+ov("disk2", ts2)+"' for '"+d.Name+"'",
		"[DEB] Parent block device: '"+ov("disk2", ts)+"'",
	)

	// Offline, with a chain under the second disk: the old tool named the
	// parents, their copies and their parents, then its "All N block files"
	// summary (whose list kept the longer tail of an earlier disk).
	consSnap(t, "-d", d.Name)
	virsh(t, "destroy", d.Name)
	stamps = sdOverlayStamps(t, d.Dir)
	ts3 := stamps[len(stamps)-1]
	bk2 := t.TempDir()
	r = run(t, "-d", "-b", bk2, d.Name)
	require.Equal(t, 0, r.Code)
	assertLinesInOrder(t, r.Stdout,
		"[DEB] Domains NOTRUNNING to backup:  "+d.Name,
		"[DEB] Domains RUNNING to backup: ",
		"[DEB] Parent block device: '"+dsk("disk1")+"'",
		"[DEB] Backing up: cp -up "+dsk("disk1")+" "+bk2+"/",
		"[DEB] Next file in backing file chain: ''",
		"[DEB] Parent block device: '"+dsk("disk2")+"'",
		"[DEB] Backing up: cp -up "+dsk("disk2")+" "+bk2+"/",
		"[DEB] Next file in backing file chain: ''",
		"[DEB] All 2 block files for '"+d.Name+"': "+ov("disk2", ts3)+" : "+dsk("disk2")+" "+dsk("disk2"),
	)
}

// TestDomainOrderFollowsLibvirt: -r goes through the running domains in
// libvirt's order (virsh list: by ID, i.e. the order they were started),
// not alphabetically.
func TestDomainOrderFollowsLibvirt(t *testing.T) {
	var names []string
	for _, n := range []string{"order-c", "order-a", "order-b"} {
		d := newDomain(t, n, domOpts{disks: []string{n + ".qcow2"}})
		names = append(names, d.Name)
	}
	want := []string{}
	for _, n := range strings.Fields(virsh(t, "list", "--state-running", "--name")) {
		for _, m := range names {
			if n == m {
				want = append(want, n)
			}
		}
	}
	require.Equal(t, names, want, "started in this order, so virsh lists them so")
	r := run(t, "-d", "-r")
	require.Equal(t, 0, r.Code)
	var got []string
	for _, l := range consLines(r.Stdout) {
		if m := regexp.MustCompile(`^\[DEB\] Snapshot for domain '(fibt-order-.)' requested$`).FindStringSubmatch(l); m != nil {
			got = append(got, m[1])
		}
	}
	assert.Equal(t, want, got)
}

func ioReadAll(r *bufio.Reader) ([]byte, error) {
	var b []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := r.Read(buf)
		b = append(b, buf[:n]...)
		if err != nil {
			return b, nil
		}
	}
}

// TestDomainStartedDuringOfflineCopy: a shut-off domain started while its
// offline copy runs (rate-limited, so the start lands in it) fails: the
// copy may mix moments, and is not called a backup.
func TestDomainStartedDuringOfflineCopy(t *testing.T) {
	d := newDomain(t, "started-offline", domOpts{noStart: true})
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x76 0 32M", d.Disks[0])
	bk := t.TempDir()
	cmd, out := consStart(t, "-d", "--rate_limit=4M", "-b", bk, d.Name)
	waitForTemp(t, bk, out)
	virsh(t, "start", d.Name)
	code := consWait(t, cmd, 2*time.Minute)
	t.Logf("→ %d\n%s", code, out.String())
	assert.Equal(t, 1, code)
	assert.Contains(t, out.String(), "[ERR] Domain '"+d.Name+"' changed from shut off to running during its offline backup: the copy may be inconsistent\n")
	assert.Equal(t, "running", d.state(t))
}
