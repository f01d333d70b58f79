package itest

// Restore points: --list, --verify, --restore against real backups of real
// domains (issue "Restore points you can list, verify and restore").

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// listed is one line of --list --format=json.
type listed struct {
	Domain    string   `json:"domain"`
	Moment    string   `json:"moment"`
	Approx    bool     `json:"approximate"`
	Method    string   `json:"method"`
	Files     []string `json:"files"`
	Quiesced  bool     `json:"quiesced"`
	StateFile string   `json:"state_file"`
	Manifest  bool     `json:"manifest"`
	Broken    string   `json:"broken"`
	Disks     []struct {
		Target string   `json:"target"`
		Name   string   `json:"name"`
		Chain  []string `json:"chain"`
	} `json:"disks"`
}

// points lists a domain's restore points through --list --format=json.
func points(t *testing.T, bk, dom string) []listed {
	t.Helper()
	r := run(t, "--list", "--format=json", "-b", bk, dom)
	require.Equal(t, 0, r.Code)
	body := r.Stdout[strings.Index(r.Stdout, "\n")+1:] // after the [INF] libVirt line
	var out []listed
	require.NoError(t, json.Unmarshal([]byte(body), &out), body)
	return out
}

// defineRestored defines the domain a restore wrote into target; it is
// destroyed and undefined at the end of the test.
func defineRestored(t *testing.T, target, dom, moment string) string {
	t.Helper()
	name := dom + "-" + moment
	virsh(t, "define", filepath.Join(target, dom+".xml"))
	t.Cleanup(func() {
		_ = exec.Command("virsh", "-c", uri, "destroy", name).Run()
		_ = exec.Command("virsh", "-c", uri, "undefine", name, "--nvram").Run()
	})
	return name
}

// TestRestoreRealGuestRoundTrip: a real guest under write load, three -q
// backups with a marker file written (through the agent) before each. With
// the host's disk directory moved away, each restore point is restored
// from the backup directory alone, defined under its new name and booted:
// its file system was clean before the boot, and the agent shows the marker
// of that moment.
func TestRestoreRealGuestRoundTrip(t *testing.T) {
	requireLibvirt(t)
	kernel, initrd := agentGuest(t)
	a := newAgentDomain(t, "rt", kernel, initrd)
	a.waitReady(t, 90*time.Second)
	a.waitWriting(t)
	bk := backupDir(t, "round trip backup")
	for i := 1; i <= 3; i++ {
		code, out := a.exec(t, fmt.Sprintf("echo marker-%d > /mnt/vda/marker && sync", i))
		require.Equal(t, 0, code, out)
		nextSecond()
		require.Equal(t, 0, run(t, "-q", "-b", bk, a.Name).Code)
	}
	pts := points(t, bk, a.Name)
	require.Len(t, pts, 3)
	for _, p := range pts {
		assert.True(t, p.Manifest)
		assert.True(t, p.Quiesced)
		assert.Equal(t, "snapshot", p.Method)
	}
	require.Equal(t, 0, run(t, "--verify", "-b", bk, a.Name).Code)

	moved := a.Dir + " moved away"
	require.NoError(t, os.Rename(a.Dir, moved))
	t.Cleanup(func() { _ = os.Rename(moved, a.Dir) })
	for i, p := range pts {
		bootRestorePoint(t, bk, a, p.Moment, fmt.Sprintf("marker-%d\n", i+1))
	}
}

// bootRestorePoint restores moment of the agent guest a from bk alone (its
// own disk directory is out of the way), checks that the file system was
// left clean by the quiesced snapshot, boots the restored domain and reads
// the marker file the guest wrote before that backup.
func bootRestorePoint(t *testing.T, bk string, a *agentDomain, moment, marker string) {
	t.Helper()
	target := filepath.Join(t.TempDir(), "restored "+moment)
	require.NoError(t, os.Mkdir(target, 0o755))
	r := run(t, "--restore="+moment, "--target_dir", target, "-b", bk, a.Name)
	require.Equal(t, 0, r.Code)
	disk := filepath.Join(target, "guest disk.qcow2")
	sb := superblock(t, disk)
	state, features := fsStateRE.FindStringSubmatch(sb), fsFeaturesRE.FindStringSubmatch(sb)
	require.NotNil(t, state, sb)
	assert.Equal(t, "clean", strings.TrimSpace(state[1]), "restore point %s before its boot", moment)
	assert.NotContains(t, features[1], "needs_recovery", "restore point %s before its boot", moment)

	name := defineRestored(t, target, a.Name, moment)
	virsh(t, "start", name)
	restored := &agentDomain{Name: name}
	require.True(t, eventually(120*time.Second, func() bool {
		_, err := restored.agentCmd(`{"execute":"guest-ping"}`)
		return err == nil
	}), "the restored guest %s did not come up", name)
	require.True(t, eventually(60*time.Second, func() bool {
		code, _ := restored.exec(t, "grep -q ' /mnt/vda ' /proc/mounts")
		return code == 0
	}), "the restored guest did not mount its disk")
	code, out := restored.exec(t, "cat /mnt/vda/marker")
	require.Equal(t, 0, code, out)
	assert.Equal(t, marker, out, "restore point %s holds the marker of its moment", moment)
	virsh(t, "destroy", name)
}

// TestRestoreStateDump: a restore point taken with -s comes with a libvirt
// save image; `virsh restore` of it resumes a running guest.
func TestRestoreStateDump(t *testing.T) {
	d := newDomain(t, "rp-state", domOpts{})
	bk := backupDir(t)
	d.write(t, 0, 0x5d, "0", "1M")
	require.Equal(t, 0, run(t, "-s", bk, "-b", bk, d.Name).Code)
	pts := points(t, bk, d.Name)
	require.Len(t, pts, 1)
	require.NotEmpty(t, pts[0].StateFile)
	target := t.TempDir()
	r := run(t, "--restore=latest", "--target_dir", target, "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	save := filepath.Join(target, d.Name+"-"+pts[0].Moment+".save")
	assert.Contains(t, r.Stdout, "virsh restore '"+save+"'")
	name := d.Name + "-" + pts[0].Moment
	t.Cleanup(func() { _ = exec.Command("virsh", "-c", uri, "destroy", name).Run() })
	virsh(t, "restore", save)
	assert.Equal(t, "running (restored)", strings.TrimSpace(virsh(t, "domstate", "--reason", name)))
	assert.True(t, readsBack(t, filepath.Join(target, "disk1.qcow2"), 0x5d, "0", "1M"))
}

// corruptible makes a domain with three restore points (patterns 0x61,
// 0x62, 0x63 at 0, 1M, 2M) in a fresh backup directory.
func corruptible(t *testing.T, name string) (*Domain, string, []listed) {
	t.Helper()
	d := newDomain(t, name, domOpts{})
	bk := backupDir(t)
	for i := 0; i < 3; i++ {
		d.write(t, 0, byte(0x61+i), fmt.Sprintf("%dM", i), "1M")
		consSnap(t, "-b", bk, d.Name)
	}
	pts := points(t, bk, d.Name)
	require.Len(t, pts, 3)
	return d, bk, pts
}

// TestVerifyFindsDamage: one flipped byte in a backup file fails --verify,
// naming the file and the restore points that need it; --restore of such a
// point refuses, an unaffected one still restores. A truncated file, a
// deleted one, a broken backing reference and a garbled manifest are each
// found, with a clear message, never a panic.
func TestVerifyFindsDamage(t *testing.T) {
	d, bk, pts := corruptible(t, "damage")
	clean := backupDir(t, "clean copy")
	sh(t, "cp", "-a", bk+"/.", clean)
	newest := pts[2].Files[0] // the copy only the newest point needs
	f, err := os.OpenFile(filepath.Join(bk, newest), os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte{0xff}, 1<<20+300)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	r := run(t, "--verify", "-b", bk, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Regexp(t, `\[ERR\] Restore point `+pts[2].Moment+` of '`+d.Name+`' does not verify: '`+regexp.QuoteMeta(newest)+`': SHA-256 `, r.Stdout)
	assert.Contains(t, r.Stdout, "[INF] Restore point "+pts[0].Moment+" of '"+d.Name+"' verified")
	assert.Contains(t, r.Stdout, "[INF] Restore point "+pts[1].Moment+" of '"+d.Name+"' verified")
	assert.Contains(t, r.Stdout, "[ERR] 1 of 3 restore points (or their manifests) do not verify\n")

	target := t.TempDir()
	r = run(t, "--restore="+pts[2].Moment, "--target_dir", target, "-b", bk, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "'"+newest+"': SHA-256")
	assert.Empty(t, files(t, target), "nothing written")
	r = run(t, "--restore="+pts[1].Moment, "--target_dir", target, "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	restored := filepath.Join(target, "disk1.qcow2")
	consReads(t, restored, 0x61, "0", "1M")
	consReads(t, restored, 0x62, "1M", "1M")
	consReads(t, restored, 0x00, "2M", "1M")

	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, bk string, pts []listed)
		want   string
	}{
		{"truncated", func(t *testing.T, bk string, pts []listed) {
			require.NoError(t, os.Truncate(filepath.Join(bk, pts[1].Files[0]), 4096))
		}, "bytes, the manifest says"},
		{"deleted", func(t *testing.T, bk string, pts []listed) {
			require.NoError(t, os.Remove(filepath.Join(bk, pts[1].Files[0])))
		}, "': missing"},
		{"broken backing reference", func(t *testing.T, bk string, pts []listed) {
			sh(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "nowhere.qcow2", filepath.Join(bk, pts[1].Files[0]))
		}, "references 'nowhere.qcow2' instead of"},
		{"garbled manifest", func(t *testing.T, bk string, pts []listed) {
			require.NoError(t, os.WriteFile(filepath.Join(bk, ".fi-backup", d.Name, pts[1].Moment+".json"), []byte(`{"schema":1,"domain":`), 0o600))
		}, "[ERR] Cannot read the manifest"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bk2 := backupDir(t)
			sh(t, "cp", "-a", clean+"/.", bk2)
			tc.damage(t, bk2, pts)
			r := run(t, "--verify", "-b", bk2, d.Name)
			assert.Equal(t, 1, r.Code)
			assert.Contains(t, r.Stdout, tc.want)
			assert.Empty(t, r.Stderr, "no panic")
		})
	}
}

// oldScriptDir turns a backup directory into what the old script wrote: no
// manifests, and each copy's backing reference the absolute host path of
// its parent.
func oldScriptDir(t *testing.T, bk string, d *Domain) {
	t.Helper()
	require.NoError(t, os.RemoveAll(filepath.Join(bk, ".fi-backup")))
	for _, f := range files(t, bk) {
		out, err := exec.Command("qemu-img", "info", "--output=json", filepath.Join(bk, f)).Output()
		require.NoError(t, err)
		var info struct {
			Backing string `json:"backing-filename"`
		}
		require.NoError(t, json.Unmarshal(out, &info))
		if info.Backing != "" {
			sh(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", filepath.Join(d.Dir, info.Backing), filepath.Join(bk, f))
		}
		_ = exec.Command("setfattr", "-x", "user.fi-backup.source", filepath.Join(bk, f)).Run()
	}
}

// TestRestoreOldScriptDirectory: a directory the old script wrote (built
// here: absolute host backing references, no manifests) lists a restore
// point per copy, unverified; --verify checks their structure; each one
// restores, with the host disks gone, to exactly its moment's data.
func TestRestoreOldScriptDirectory(t *testing.T) {
	d, bk, _ := corruptible(t, "oldscript")
	oldScriptDir(t, bk, d)
	pts := points(t, bk, d.Name)
	require.Len(t, pts, 3)
	for _, p := range pts {
		assert.False(t, p.Manifest)
		assert.Empty(t, p.Broken)
	}
	assert.False(t, pts[0].Approx, "named by the overlay above it")
	assert.False(t, pts[1].Approx)
	assert.False(t, pts[2].Approx, "named by the live overlay above it on the host")
	r := run(t, "--list", "-b", bk)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "no (unverified)")
	r = run(t, "--verify", "-b", bk, d.Name)
	assert.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[WAR] Restore point "+pts[0].Moment+" of '"+d.Name+"' has no manifest")

	virsh(t, "destroy", d.Name)
	moved := d.Dir + " moved away"
	require.NoError(t, os.Rename(d.Dir, moved))
	t.Cleanup(func() { _ = os.Rename(moved, d.Dir) })
	restoresSeries(t, bk, d, pts, 0x61)
}

// TestRestoreAcrossGenerations: after a blockcommit the next backup keeps
// the previous base copy as a generation; every restore point is listed,
// verifies and restores to exactly its moment's data.
func TestRestoreAcrossGenerations(t *testing.T) {
	d := newDomain(t, "rp-gen", domOpts{})
	bk := backupDir(t)
	write := func(i int) { d.write(t, 0, byte(0x71+i), fmt.Sprintf("%dM", i), "1M") }
	write(0)
	consSnap(t, "-b", bk, d.Name)
	write(1)
	consSnap(t, "-b", bk, d.Name)
	require.Equal(t, 0, run(t, "-c", d.Name).Code)
	write(2)
	consSnap(t, "-b", bk, d.Name)
	gens, err := filepath.Glob(filepath.Join(bk, "disk1.qcow2.gen-*"))
	require.NoError(t, err)
	require.Len(t, gens, 1)
	pts := points(t, bk, d.Name)
	require.Len(t, pts, 3)
	assert.Contains(t, pts[0].Files, filepath.Base(gens[0]), "the first point now reads the generation")
	require.Equal(t, 0, run(t, "--verify", "-b", bk, d.Name).Code, "manifests follow the generation's rename")
	restoresSeries(t, bk, d, pts, 0x71)
}

// restoresSeries restores every point of a series whose run i wrote
// pattern base+i at i MiB, and checks that point i reads back the writes of
// runs 0..i and zeroes where the later ones wrote.
func restoresSeries(t *testing.T, bk string, d *Domain, pts []listed, base byte) {
	t.Helper()
	for i, p := range pts {
		target := t.TempDir()
		require.Equal(t, 0, run(t, "--restore="+p.Moment, "--target_dir", target, "-b", bk, d.Name).Code)
		restored := filepath.Join(target, "disk1.qcow2")
		for j := range pts {
			want := byte(0)
			if j <= i {
				want = base + byte(j)
			}
			consReads(t, restored, want, fmt.Sprintf("%dM", j), "1M")
		}
	}
}

// TestRestoreBadInput: an unknown moment, a domain the directory does not
// hold, a target directory that is missing, read-only, full, the live
// disks' own, or holds a file of the same name: each a clear [ERR], exit 1,
// nothing overwritten, nothing partial left.
func TestRestoreBadInput(t *testing.T) {
	d, bk, pts := corruptible(t, "rp-bad")
	restore := func(target string, args ...string) result {
		return run(t, append([]string{"--restore=" + pts[1].Moment, "--target_dir", target, "-b", bk}, args...)...)
	}
	r := run(t, "--restore=20000101-000000", "--target_dir", t.TempDir(), "-b", bk, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Cannot restore: no restore point of '"+d.Name+"' at 20000101-000000\n")
	r = restore(t.TempDir(), "fibt-not-in-dir")
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Cannot restore: no restore point of 'fibt-not-in-dir' at ")

	missing := filepath.Join(t.TempDir(), "missing")
	r = restore(missing, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Cannot restore into '"+missing+"': it doesn't exist or is not a directory\n")

	ro := t.TempDir()
	sh(t, "mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", ro)
	t.Cleanup(func() { _ = exec.Command("umount", ro).Run() })
	r = restore(ro, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Cannot restore into '"+ro+"': read-only file system\n")

	full := t.TempDir()
	sh(t, "mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", full)
	t.Cleanup(func() { _ = exec.Command("umount", full).Run() })
	r = restore(full, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Cannot write the disk 'vda' of '"+d.Name+"' to '"+filepath.Join(full, "disk1.qcow2")+"': ")
	assert.Empty(t, files(t, full), "nothing partial left")

	sum := consSHA256(t, d.Disks[0])
	r = restore(d.Dir, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "'disk1.qcow2' already exists (nothing is overwritten)")
	assert.Equal(t, sum, consSHA256(t, d.Disks[0]), "the live disk is untouched")

	taken := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(taken, d.Name+".xml"), []byte("mine"), 0o600))
	r = restore(taken, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "'"+d.Name+".xml' already exists (nothing is overwritten)")
	assert.Equal(t, []string{d.Name + ".xml"}, files(t, taken))
	assert.Equal(t, "running", d.state(t))
}

// TestReadmeRestoreSection follows the README's restore section word for
// word: its commands, run by bash with the README's variables set.
func TestReadmeRestoreSection(t *testing.T) {
	d, bk, pts := corruptible(t, "readme")
	readme, err := os.ReadFile("../../README.md")
	require.NoError(t, err)
	section := regexp.MustCompile("(?s)<!-- restore steps -->\n```sh\n(.*?)```").FindSubmatch(readme)
	require.NotNil(t, section, "the README's restore steps")
	target := filepath.Join(t.TempDir(), "restored")
	require.NoError(t, os.Mkdir(target, 0o755))
	cmd := exec.Command("bash", "-euxc", string(section[1]))
	cmd.Env = append(os.Environ(), "DIR="+bk, "DOM="+d.Name, "MOMENT="+pts[1].Moment, "TARGET="+target,
		"PATH="+filepath.Dir(binary(t))+":"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	require.NoError(t, err)
	name := d.Name + "-" + pts[1].Moment
	t.Cleanup(func() {
		_ = exec.Command("virsh", "-c", uri, "destroy", name).Run()
		_ = exec.Command("virsh", "-c", uri, "undefine", name).Run()
	})
	assert.Equal(t, "running", (&Domain{Name: name}).state(t))
	consReads(t, filepath.Join(target, "disk1.qcow2"), 0x62, "1M", "1M")
	consReads(t, filepath.Join(target, "disk1.qcow2"), 0x00, "2M", "1M")
}
