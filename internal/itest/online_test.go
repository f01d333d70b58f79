package itest

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var overlayRE = regexp.MustCompile(`\.bimg-[0-9]{8}-[0-9]{6}$`)

func overlays(t *testing.T, dir string) []string {
	var out []string
	for _, f := range files(t, dir) {
		if overlayRE.MatchString(f) {
			out = append(out, f)
		}
	}
	sort.Strings(out)
	return out
}

// assertSelfContained checks that image's chain resolves entirely inside
// its own directory and that every file passes qemu-img check.
func assertSelfContained(t *testing.T, image string) []string {
	t.Helper()
	chain := chainOf(t, image)
	for _, p := range chain {
		assert.Equal(t, filepath.Dir(image), filepath.Dir(p), "chain of %s leaves the backup directory: %v", image, chain)
	}
	checkImages(t, chain...)
	return chain
}

// TestOnlineT1T2 is the old CI's T1/T2/T3 online part: one- and two-disk
// domains with spaces in their paths, several backups in a row.
func TestOnlineT1T2(t *testing.T) {
	d1 := newDomain(t, "t1d", domOpts{disks: []string{"test1 1.img"}})
	d2 := newDomain(t, "t2d", domOpts{disks: []string{"test2 1.img", "test2 2.img"}})
	bk := filepath.Join(t.TempDir(), "backup dir")
	require.NoError(t, os.Mkdir(bk, 0o755))

	r := run(t, "-d", "-b", bk, d1.Name)
	require.Equal(t, 0, r.Code)
	assert.Empty(t, r.Stderr)
	ov := overlays(t, d1.Dir)
	require.Len(t, ov, 1)
	assert.Contains(t, r.Stdout, "[VER] Snapshot for block devices of '"+d1.Name+"' successful\n")
	assert.Contains(t, r.Stdout, "[VER] Copy backing file '"+d1.Disks[0]+"' to '"+filepath.Join(bk, "test1 1.img")+"'\n")
	assert.Regexp(t, `\[DEB\] Using timestamp '[0-9]{8}-[0-9]{6}'`, r.Stdout)
	assert.Equal(t, []string{filepath.Join(d1.Dir, ov[0]), d1.Disks[0]}, d1.liveChain(t, "vda"))
	assert.Equal(t, "test1 1.bimg-", ov[0][:len("test1 1.bimg-")], "libvirt's overlay naming")

	nextSecond()
	r = run(t, "-d", "-b", bk, d1.Name)
	require.Equal(t, 0, r.Code)
	assert.ElementsMatch(t, []string{"test1 1.img", ov[0]}, files(t, bk))
	assertSelfContained(t, filepath.Join(bk, ov[0]))

	// T2: both disks snapshotted atomically, both chains copied.
	for i := 0; i < 3; i++ {
		if i > 0 {
			nextSecond()
		}
		r = run(t, "-v", "-b", bk, d2.Name)
		require.Equal(t, 0, r.Code)
	}
	ov2 := overlays(t, d2.Dir)
	require.Len(t, ov2, 6, "three runs, two disks")
	for _, disk := range []string{"test2 1", "test2 2"} {
		var mine []string
		for _, o := range ov2 {
			if strings.HasPrefix(o, disk+".bimg-") {
				mine = append(mine, o)
			}
		}
		require.Len(t, mine, 3)
		// The two older overlays of each disk are in the backup, chained to the base copy.
		chain := assertSelfContained(t, filepath.Join(bk, mine[1]))
		assert.Equal(t, []string{filepath.Join(bk, mine[1]), filepath.Join(bk, mine[0]), filepath.Join(bk, disk+".img")}, chain)
		_, err := os.Stat(filepath.Join(bk, mine[2]))
		assert.True(t, os.IsNotExist(err), "the active overlay is never copied")
	}
	assert.Equal(t, "running", d1.state(t))
	assert.Equal(t, "running", d2.state(t))

	// T3: several domains in one argument, twice.
	for i := 0; i < 2; i++ {
		nextSecond()
		r = run(t, "-d", "-b", bk, d1.Name+" "+d2.Name)
		require.Equal(t, 0, r.Code)
		assert.Contains(t, r.Stdout, "[DEB] Domains RUNNING to backup:  "+d1.Name+" "+d2.Name+"\n")
	}
	assert.Len(t, overlays(t, d1.Dir), 4)
}

// TestRestorePointTruth writes a pattern, backs up, writes another, backs
// up again: each restore point reads back exactly its moment, from files in
// the backup directory alone. After a blockcommit done by hand the next
// backup must not invalidate the older restore points (B10).
func TestRestorePointTruth(t *testing.T) {
	d := newDomain(t, "truth", domOpts{})
	bk := t.TempDir()
	backup := func() {
		nextSecond()
		r := run(t, "-b", bk, d.Name)
		require.Equal(t, 0, r.Code)
	}
	d.write(t, 0, 0x11, "0", "1M")
	backup() // base copied; overlay T1 active
	d.write(t, 0, 0x22, "1M", "1M")
	backup() // T1 (holds 0x22) copied
	d.write(t, 0, 0x33, "2M", "1M")
	backup() // T2 (holds 0x33) copied
	ov := overlays(t, d.Dir)
	require.Len(t, ov, 3)
	rp1, rp2 := filepath.Join(bk, ov[0]), filepath.Join(bk, ov[1])
	check := func(base string) {
		t.Helper()
		chain := assertSelfContained(t, rp2)
		assert.Equal(t, []string{rp2, rp1, filepath.Join(bk, base)}, chain)
		assert.True(t, readsBack(t, filepath.Join(bk, base), 0x11, "0", "1M"), "base copy holds the first write")
		assert.True(t, readsBack(t, filepath.Join(bk, base), 0x00, "1M", "1M"), "base copy predates the second write")
		assert.True(t, readsBack(t, rp1, 0x22, "1M", "1M"))
		assert.True(t, readsBack(t, rp1, 0x00, "2M", "1M"), "restore point 1 predates the third write")
		assert.True(t, readsBack(t, rp2, 0x11, "0", "1M"))
		assert.True(t, readsBack(t, rp2, 0x22, "1M", "1M"))
		assert.True(t, readsBack(t, rp2, 0x33, "2M", "1M"))
	}
	check("disk1.qcow2")

	// Consolidate by hand into the base, write, back up again.
	virsh(t, "blockcommit", d.Name, "vda", "--active", "--pivot", "--wait", "--base", d.Disks[0])
	d.write(t, 0, 0x44, "3M", "1M")
	backup()
	var gens []string
	for _, f := range files(t, bk) {
		if strings.HasPrefix(f, "disk1.qcow2.gen-") {
			gens = append(gens, f)
		}
	}
	require.Len(t, gens, 1, "the previous base copy is kept once")
	check(gens[0]) // older restore points still exact, now on the kept generation (B10)
	// The newest generation keeps the old name: the base copy now holds everything committed.
	assert.True(t, readsBack(t, filepath.Join(bk, "disk1.qcow2"), 0x33, "2M", "1M"))
	assert.True(t, readsBack(t, filepath.Join(bk, "disk1.qcow2"), 0x44, "3M", "1M"), "written into the base after the commit")
	assert.Equal(t, "running", d.state(t))
}

// TestLockContention: a second fi-backup, and the old script's flock on the
// same path, both make a run fail with the old message; nothing is changed.
// The program name in the message is $0 as bash showed it: found through
// PATH, it comes with its directory.
func TestLockContention(t *testing.T) {
	d := newDomain(t, "lock", domOpts{})
	lockPath := "/var/lock/" + d.Name + ".fi-backup.lock"
	release := holdLock(t, lockPath)
	bk := t.TempDir()
	r := run(t, "-b", bk, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Another instance of "+binary(t)+" is already running on '"+d.Name+"'! Skipping backup of '"+d.Name+"'\n")
	assert.Empty(t, overlays(t, d.Dir), "no snapshot without the lock")
	assert.Empty(t, files(t, bk))

	viaPath := &exec.Cmd{Path: binary(t), Args: []string{"fi-backup", "-b", bk, d.Name},
		Env: append(os.Environ(), "PATH="+filepath.Dir(binary(t))+":"+os.Getenv("PATH"))}
	out, err := viaPath.Output()
	require.Error(t, err)
	assert.Contains(t, string(out), "[ERR] Another instance of "+binary(t)+" is already running on '"+d.Name+"'!", "argv[0] resolved through PATH")

	release()
	r = run(t, "-b", bk, d.Name)
	assert.Equal(t, 0, r.Code, "the lock is free again")
	_, err = os.Stat(lockPath)
	assert.NoError(t, err, "the lock file stays (B5)")
}

// holdLock takes a domain lock the way the old script did (flock(1) on the
// same path) in another process, and returns once that process holds it:
// the holder blocks until it gets the lock and then says so. The returned
// function (also run at cleanup) releases it.
func holdLock(t *testing.T, lockPath string) (release func()) {
	t.Helper()
	holder := exec.Command("flock", lockPath, "sh", "-c", "echo locked; exec sleep 600")
	holder.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := holder.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, holder.Start())
	var once sync.Once
	release = func() {
		once.Do(func() { _ = syscall.Kill(-holder.Process.Pid, syscall.SIGKILL); _ = holder.Wait() })
	}
	t.Cleanup(release)
	line, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(t, err, "the lock holder did not start")
	require.Equal(t, "locked\n", line)
	return release
}

// TestBadInput: a nonexistent domain among good ones; odd disks.
func TestBadInput(t *testing.T) {
	good := newDomain(t, "good", domOpts{})
	odd := newDomain(t, "odd", domOpts{
		disks: []string{"rawdisk.img", "nodot"},
		raw:   map[string]bool{"rawdisk.img": true},
		extra: "<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>",
	})
	bk := t.TempDir()
	r := run(t, "-b", bk, "fibt-does-not-exist", good.Name, odd.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Cannot find domain 'fibt-does-not-exist': Domain not found")
	assert.Contains(t, files(t, bk), "disk1.qcow2", "the good domain ran")
	assert.Contains(t, files(t, bk), "rawdisk.img", "a raw base is copied")
	assert.Contains(t, files(t, bk), "nodot", "a disk without a dot is copied")
	assert.ElementsMatch(t, []string{"rawdisk.bimg-", "nodot.bimg-"}, prefixes(overlays(t, odd.Dir)))
	assert.Equal(t, "running", odd.state(t))

	// Vanished and unwritable backup directories: a clear error, no overlay added.
	before := overlays(t, good.Dir)
	gone := filepath.Join(t.TempDir(), "gone")
	r = run(t, "-b", gone, good.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Backup directory '"+gone+"' doesn't exist!\n")
	ro := t.TempDir()
	sh(t, "mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", ro)
	t.Cleanup(func() { _ = exec.Command("umount", ro).Run() })
	r = run(t, "-b", ro, good.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Backup directory '"+ro+"' is not usable: read-only file system\n")
	assert.Equal(t, before, overlays(t, good.Dir), "no overlay added on a bad backup directory")
	assert.Equal(t, "running", good.state(t))
}

// TestFullBackupFilesystem: copying into a full filesystem fails the domain
// cleanly, leaves no partial file, and the guest and chain are fine.
func TestFullBackupFilesystem(t *testing.T) {
	d := newDomain(t, "full", domOpts{})
	d.write(t, 0, 0x55, "0", "8M") // base bigger than the backup filesystem
	nextSecond()
	run(t, d.Name) // snapshot only, so disk1.qcow2 becomes a read-only base with 8M of data
	before := overlays(t, d.Dir)
	small := t.TempDir()
	sh(t, "mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", small)
	t.Cleanup(func() { _ = exec.Command("umount", small).Run() })

	// Too small from the start: refused before the snapshot.
	nextSecond()
	r := run(t, "-b", small, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Regexp(t, `\[ERR\] Not enough free space in '.*' for the backup of '`+d.Name+`': it copies up to 8\.\d MiB, and 2\.0 MiB are free`, r.Stdout)
	assert.Equal(t, before, overlays(t, d.Dir), "no overlay added")
	assert.Empty(t, files(t, small))

	// Room at the start, filled by someone else during the copy: the copy
	// fails, nothing half-written is left.
	big := t.TempDir()
	sh(t, "mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", big)
	t.Cleanup(func() { _ = exec.Command("umount", big).Run() })
	nextSecond()
	cmd, out := consStart(t, "--rate_limit=2M", "-b", big, d.Name)
	waitForTemp(t, big, out)
	_ = exec.Command("dd", "if=/dev/zero", "of="+filepath.Join(big, "filler"), "bs=1M").Run() // until ENOSPC
	code := consWait(t, cmd, 60*time.Second)
	t.Logf("fi-backup (filesystem filled during the copy) → %d\n%s", code, out.String())
	assert.Equal(t, 1, code)
	assert.Regexp(t, `\[ERR\] Unable to copy '.*disk1.qcow2' to '.*': .*no space left on device`, out.String())
	assert.Equal(t, []string{"filler"}, files(t, big), "nothing half-written is left")
	assert.Equal(t, "running", d.state(t))
	checkImages(t, d.liveChain(t, "vda")...)
}

// TestQuiesceWithoutAgent: -q on a domain without a guest agent fails
// clearly and leaves no overlay.
func TestQuiesceWithoutAgent(t *testing.T) {
	d := newDomain(t, "noagent", domOpts{})
	r := run(t, "-q", "-b", t.TempDir(), d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Snapshot for '"+d.Name+"' failed! argument unsupported: QEMU guest agent is not configured\n")
	assert.Empty(t, overlays(t, d.Dir))
	assert.Equal(t, "running", d.state(t))
}

// TestOverlayNameCollision: two disks whose overlays would get the same
// name make libvirt refuse the whole snapshot; the admin is told why.
func TestOverlayNameCollision(t *testing.T) {
	d := newDomain(t, "collide", domOpts{disks: []string{"d.img", "d.qcow2"}})
	r := run(t, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "collision with disk 'vda'")
	assert.Contains(t, r.Stdout, "[ERR] Two disks of '"+d.Name+"' would get the same overlay name")
	assert.Empty(t, overlays(t, d.Dir))
	assert.Equal(t, "running", d.state(t))
}

func prefixes(names []string) []string {
	var out []string
	for _, n := range names {
		out = append(out, n[:strings.Index(n, ".bimg-")+len(".bimg-")])
	}
	return out
}

// TestSameSecondCollision: an overlay name that already exists (a second
// run in the same second; here files planted at the names of the coming
// seconds) is refused by libvirt with its own message; no overlay is added
// and the planted files are untouched.
func TestSameSecondCollision(t *testing.T) {
	d := newDomain(t, "same-second", domOpts{})
	now := time.Now()
	var planted []string
	for i := 0; i < 6; i++ {
		p := filepath.Join(d.Dir, "disk1.bimg-"+now.Add(time.Duration(i)*time.Second).Format("20060102-150405"))
		require.NoError(t, os.WriteFile(p, []byte("someone else's file"), 0o600))
		planted = append(planted, p)
	}
	r := run(t, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "already exists and is not a block device")
	assert.Equal(t, []string{d.Disks[0]}, d.liveChain(t, "vda"))
	for _, p := range planted {
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		assert.Equal(t, "someone else's file", string(b))
	}
	assert.Equal(t, "running", d.state(t))
}
