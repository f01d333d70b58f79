package itest

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Offline backups (spec §8): domains that are not running are copied with
// cp -up semantics — only files whose backup copy is missing or older, with
// mode, owner, group and timestamps kept — and the copies' backing
// references point at their parent copies by relative name.

// TestOfflineT0 is the old CI's T0 with more teeth: two shut-off domains
// with spaces in their paths, one of them with two disks, one disk being an
// overlay on a base in another directory. Then the rerun that must copy
// nothing.
func TestOfflineT0(t *testing.T) {
	baseDir := filepath.Join(t.TempDir(), "base disks")
	base := filepath.Join(baseDir, "test2 base.qcow2")
	offImage(t, base, "")
	offWrite(t, base, 0x61, "0", "1M")

	d1 := newDomain(t, "off-t1d", domOpts{disks: []string{"test1 1.img"}, noStart: true})
	d2 := newDomain(t, "off-t2d", domOpts{
		disks:   []string{"test2 1.img", "test2 2.img"},
		backing: map[string]string{"test2 2.img": base},
		noStart: true,
	})
	offWrite(t, d1.Disks[0], 0x11, "0", "1M")
	offWrite(t, d2.Disks[0], 0x21, "0", "1M")
	offWrite(t, d2.Disks[1], 0x62, "1M", "1M") // the overlay, over the base's 0x61

	// Metadata that a plain copy would not reproduce: another owner, a
	// narrower mode, an old mtime with nanoseconds.
	require.NoError(t, os.Chown(d2.Disks[1], 1234, 1234))
	require.NoError(t, os.Chmod(d2.Disks[1], 0o640))
	require.NoError(t, os.Chmod(base, 0o604))
	old := time.Date(2021, 1, 2, 3, 4, 5, 123456789, time.Local)
	require.NoError(t, os.Chtimes(d1.Disks[0], old, old))

	srcs := map[string]string{ // backup name → source
		"test1 1.img":      d1.Disks[0],
		"test2 1.img":      d2.Disks[0],
		"test2 2.img":      d2.Disks[1],
		"test2 base.qcow2": base,
	}
	var names []string
	for n := range srcs {
		names = append(names, n)
	}

	bk := backupDir(t, "backup_off dir")
	r := run(t, "-d", "-b", bk, d1.Name, d2.Name)
	require.Equal(t, 0, r.Code, "T0 with -d")
	assert.Empty(t, r.Stderr)
	assert.Contains(t, r.Stdout, "[DEB] Domains NOTRUNNING to backup:  "+d1.Name+" "+d2.Name+"\n")
	assert.ElementsMatch(t, names, files(t, bk), "every file of every chain, nothing else")
	for n, src := range srcs {
		dst := filepath.Join(bk, n)
		assert.Contains(t, r.Stdout, "[DEB] Backing up: cp -up "+src+" "+bk+"/\n")
		offAssertPreserved(t, src, dst)
	}
	assert.Equal(t, int64(old.UnixNano()), offMetaOf(t, filepath.Join(bk, "test1 1.img")).Mtime, "the old mtime is kept")
	m := offMetaOf(t, filepath.Join(bk, "test2 2.img"))
	assert.Equal(t, [3]uint32{1234, 1234, 0o640}, [3]uint32{m.UID, m.GID, uint32(m.Mode.Perm())})

	// The overlay copy points at its parent copy by relative name, and the
	// backup chain opens on its own with both layers' data.
	ov := filepath.Join(bk, "test2 2.img")
	info := offInfo(t, ov)
	assert.Equal(t, "test2 base.qcow2", info.BackingFilename, "relative backing reference")
	assert.Equal(t, "qcow2", info.BackingFormat)
	assert.Equal(t, "", offInfo(t, filepath.Join(bk, "test2 base.qcow2")).BackingFilename)
	chain := assertSelfContained(t, ov)
	assert.Equal(t, []string{ov, filepath.Join(bk, "test2 base.qcow2")}, chain)
	offAssertReads(t, ov, "overlay copy", offPattern{0x61, "0", "1M"}, offPattern{0x62, "1M", "1M"}, offPattern{0, "2M", "1M"})
	offAssertReads(t, filepath.Join(bk, "test1 1.img"), "t1d copy", offPattern{0x11, "0", "1M"})
	offAssertReads(t, filepath.Join(bk, "test2 1.img"), "t2d vda copy", offPattern{0x21, "0", "1M"})
	checkImages(t, filepath.Join(bk, "test1 1.img"), filepath.Join(bk, "test2 1.img"))
	offShutOff(t, d1)
	offShutOff(t, d2)

	// Without -d the old tool exited 1 (B2): now the result of the copies.
	bk2 := backupDir(t, "backup_off dir 2")
	r = run(t, "-b", bk2, d1.Name+" "+d2.Name)
	assert.Equal(t, 0, r.Code, "T0 without -d (B2)")
	assert.ElementsMatch(t, names, files(t, bk2))

	// Second run into the first directory: every copy is up to date, and
	// nothing in the backup directory is touched.
	before := map[string]offMeta{}
	for _, n := range names {
		before[n] = offMetaOf(t, filepath.Join(bk, n))
	}
	r = run(t, "-d", "-b", bk, d1.Name, d2.Name)
	require.Equal(t, 0, r.Code)
	assert.ElementsMatch(t, names, files(t, bk), "no new file, no generation")
	for _, n := range names {
		dst := filepath.Join(bk, n)
		assert.Contains(t, r.Stdout, "[DEB] '"+dst+"': destination is up to date\n")
		assert.Equal(t, before[n], offMetaOf(t, dst), "%s must be left alone (inode, mtime, ctime)", n)
	}
	offShutOff(t, d1)
	offShutOff(t, d2)
}

// TestOfflineChangedBase: a disk of a shut-off domain changes between two
// offline backups. Chain base ← top; only the base changes (its mtime moves
// on), so the next run recopies the base. The restore point of the first
// run (the first top copy on the first base copy) must stay exact (B10),
// and the current state must be in the backup directory too.
func TestOfflineChangedBase(t *testing.T) {
	baseDir := filepath.Join(t.TempDir(), "base disks")
	base := filepath.Join(baseDir, "gold base.qcow2")
	offImage(t, base, "")
	offWrite(t, base, 0x61, "0", "1M")
	d := newDomain(t, "off-gen", domOpts{
		disks:   []string{"top disk.qcow2"},
		backing: map[string]string{"top disk.qcow2": base},
		noStart: true,
	})
	top := d.Disks[0]
	offWrite(t, top, 0x62, "1M", "1M")
	bk := backupDir(t, "backup gen dir")

	r := run(t, "-d", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	require.ElementsMatch(t, []string{"gold base.qcow2", "top disk.qcow2"}, files(t, bk))
	topCopy, baseCopy := filepath.Join(bk, "top disk.qcow2"), filepath.Join(bk, "gold base.qcow2")
	preChange := []offPattern{{0x61, "0", "1M"}, {0x62, "1M", "1M"}, {0, "2M", "1M"}}
	offAssertReads(t, topCopy, "first restore point", preChange...)
	firstTop := offMetaOf(t, topCopy)
	firstBase := offMetaOf(t, baseCopy)

	// The base changes; the top does not.
	topMeta := offMetaOf(t, top)
	offWrite(t, base, 0x71, "2M", "1M")
	require.Greater(t, offMetaOf(t, base).Mtime, firstBase.Mtime, "qemu-io moved the base's mtime on")
	require.Equal(t, topMeta.Mtime, offMetaOf(t, top).Mtime, "the top is unchanged")

	r = run(t, "-d", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	assert.Empty(t, offTemps(t, bk))

	// The base was recopied: new data, source metadata.
	assert.Contains(t, r.Stdout, "[DEB] '"+baseCopy+"': source newer than destination\n")
	offAssertPreserved(t, base, baseCopy)
	offAssertReads(t, baseCopy, "new base copy", offPattern{0x61, "0", "1M"}, offPattern{0x71, "2M", "1M"})

	// The previous base copy is kept once, as a generation.
	var gens []string
	for _, f := range files(t, bk) {
		if strings.HasPrefix(f, "gold base.qcow2.gen-") {
			gens = append(gens, f)
		}
	}
	require.Len(t, gens, 1, "the previous base copy is kept once: %v", files(t, bk))
	assert.Regexp(t, regexp.MustCompile(`^gold base\.qcow2\.gen-[0-9]{8}-[0-9]{6}$`), gens[0])
	gen := filepath.Join(bk, gens[0])
	assert.Equal(t, firstBase.Ino, offMetaOf(t, gen).Ino, "the generation is the first base copy itself")
	offAssertReads(t, gen, "kept base generation", offPattern{0x61, "0", "1M"}, offPattern{0, "2M", "1M"})

	// The first restore point (the first top copy, whatever its name now)
	// still reads exactly what the domain held at the first run.
	names := offByInode(t, bk, firstTop.Ino)
	require.NotEmpty(t, names, "the first top copy was deleted or overwritten: %v", files(t, bk))
	rp1 := filepath.Join(bk, names[0])
	chain := assertSelfContained(t, rp1)
	assert.Equal(t, []string{rp1, gen}, chain,
		"the first restore point must rest on the kept generation, not on the new base copy")
	offAssertReads(t, rp1, "first restore point after the base changed", preChange...)

	// And the backup directory holds the domain as it is now: the top's
	// data over the changed base.
	cur := assertSelfContained(t, topCopy)
	assert.Equal(t, []string{topCopy, baseCopy}, cur, "the current top copy rests on the current base copy")
	offAssertReads(t, topCopy, "current state", offPattern{0x61, "0", "1M"}, offPattern{0x62, "1M", "1M"}, offPattern{0x71, "2M", "1M"})
	offShutOff(t, d)
}

// TestOfflineChangedTop: the top image of a shut-off domain is modified
// (its mtime moves on): only it is recopied, the base copy is left alone.
func TestOfflineChangedTop(t *testing.T) {
	baseDir := filepath.Join(t.TempDir(), "base disks")
	base := filepath.Join(baseDir, "b.qcow2")
	offImage(t, base, "")
	offWrite(t, base, 0x61, "0", "1M")
	d := newDomain(t, "off-top", domOpts{
		disks:   []string{"t.qcow2"},
		backing: map[string]string{"t.qcow2": base},
		noStart: true,
	})
	bk := backupDir(t, "backup top dir")
	r := run(t, "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	baseCopy, topCopy := filepath.Join(bk, "b.qcow2"), filepath.Join(bk, "t.qcow2")
	baseBefore, topBefore := offMetaOf(t, baseCopy), offMetaOf(t, topCopy)

	offWrite(t, d.Disks[0], 0x62, "1M", "1M")
	r = run(t, "-d", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[DEB] '"+topCopy+"': source newer than destination\n")
	assert.Contains(t, r.Stdout, "[DEB] '"+baseCopy+"': destination is up to date\n")
	assert.Equal(t, baseBefore, offMetaOf(t, baseCopy), "the base copy is left alone")
	assert.NotEqual(t, topBefore.Ino, offMetaOf(t, topCopy).Ino, "the top copy was replaced")
	offAssertPreserved(t, d.Disks[0], topCopy)
	assert.Equal(t, "b.qcow2", offInfo(t, topCopy).BackingFilename)
	offAssertReads(t, topCopy, "recopied top", offPattern{0x61, "0", "1M"}, offPattern{0x62, "1M", "1M"})
	assertSelfContained(t, topCopy)
	offShutOff(t, d)
}

// TestOfflineMissingChainLink: an overlay whose backing file was deleted
// fails its domain with a clear error (B40: never a silently shorter
// chain), leaves nothing of it in the backup directory, and does not stop
// the other domains of the run (the exit code aggregates, B1).
func TestOfflineMissingChainLink(t *testing.T) {
	baseDir := filepath.Join(t.TempDir(), "base disks")
	base := filepath.Join(baseDir, "gone base.qcow2")
	offImage(t, base, "")
	bad := newDomain(t, "off-broken", domOpts{
		disks:   []string{"orphan top.qcow2"},
		backing: map[string]string{"orphan top.qcow2": base},
		noStart: true,
	})
	good := newDomain(t, "off-fine", domOpts{disks: []string{"fine.qcow2"}, noStart: true})
	require.NoError(t, os.Remove(base))

	bk := backupDir(t, "backup broken dir")
	r := run(t, "-b", bk, bad.Name, good.Name)
	assert.Equal(t, 1, r.Code, "a domain with a broken chain fails the run")
	assert.Regexp(t, `(?m)^\[ERR\] .*`+regexp.QuoteMeta(bad.Disks[0])+`.*`+regexp.QuoteMeta(base), r.Stdout,
		"the error names the disk and the missing file")
	assert.Equal(t, []string{"fine.qcow2"}, files(t, bk), "nothing of the broken domain, no temporary file")
	offShutOff(t, bad)
	offShutOff(t, good)

	// Alone, the broken domain fails the same way.
	r = run(t, "-d", "-b", bk, bad.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] ")
	assert.Equal(t, []string{"fine.qcow2"}, files(t, bk))
}

// TestOfflineWithoutBackupDir: no -b for a shut-off domain → the two old
// error lines and exit 1; nothing else happens.
func TestOfflineWithoutBackupDir(t *testing.T) {
	d := newDomain(t, "off-nob", domOpts{noStart: true})
	before := offMetaOf(t, d.Disks[0])
	for _, args := range [][]string{{d.Name}, {"-d", d.Name}} {
		r := run(t, args...)
		assert.Equal(t, 1, r.Code)
		assert.Contains(t, r.Stdout,
			"[ERR] -b flag (directory) required for backing up the shut-off domain '"+d.Name+"'\n"+
				"[ERR] Skipping backup of '"+d.Name+"'\n")
		assert.NotContains(t, r.Stdout, "cp -up")
	}
	assert.Equal(t, []string{"disk1.qcow2"}, files(t, d.Dir), "no overlay, nothing written next to the disk")
	assert.Equal(t, before, offMetaOf(t, d.Disks[0]))
	offShutOff(t, d)
}

// TestOfflinePausedDomain: a paused domain given by name goes down the
// offline path while QEMU holds its images open (qemu-img needs -U there);
// its whole chain is copied and it stays paused.
func TestOfflinePausedDomain(t *testing.T) {
	baseDir := filepath.Join(t.TempDir(), "base disks")
	base := filepath.Join(baseDir, "paused base.qcow2")
	offImage(t, base, "")
	offWrite(t, base, 0x61, "0", "1M")
	// The data is written before QEMU opens the images: a paused QEMU may
	// still hold qcow2 metadata of guest writes in memory.
	d := newDomain(t, "off-paused", domOpts{
		disks:   []string{"paused top.qcow2"},
		backing: map[string]string{"paused top.qcow2": base},
		noStart: true,
	})
	offWrite(t, d.Disks[0], 0x62, "1M", "1M")
	virsh(t, "start", d.Name)
	virsh(t, "suspend", d.Name)
	require.Equal(t, "paused", d.state(t))

	bk := backupDir(t, "backup paused dir")
	r := run(t, "-d", "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, "[DEB] Domains NOTRUNNING to backup:  "+d.Name+"\n")
	assert.NotContains(t, r.Stdout, "snapshot-create", "no snapshot of a paused domain")
	assert.ElementsMatch(t, []string{"paused base.qcow2", "paused top.qcow2"}, files(t, bk))
	topCopy := filepath.Join(bk, "paused top.qcow2")
	offAssertPreserved(t, d.Disks[0], topCopy)
	offAssertPreserved(t, base, filepath.Join(bk, "paused base.qcow2"))
	assert.Equal(t, "paused base.qcow2", offInfo(t, topCopy).BackingFilename)
	assertSelfContained(t, topCopy)
	offAssertReads(t, topCopy, "paused domain's copy", offPattern{0x61, "0", "1M"}, offPattern{0x62, "1M", "1M"})
	assert.Equal(t, "paused", d.state(t), "the domain stays paused")
	assert.Equal(t, []string{"paused top.qcow2"}, files(t, d.Dir), "no overlay on the host")
}

// TestOfflineModeNeverWidened: a backup copy is never more readable than
// its source — offline (cp -p keeps the mode) and online (cp without -p:
// the source's mode minus the umask).
func TestOfflineModeNeverWidened(t *testing.T) {
	off := newDomain(t, "off-mode", domOpts{noStart: true})
	require.NoError(t, os.Chmod(off.Disks[0], 0o600))
	bk := backupDir(t, "backup mode dir")
	r := run(t, "-b", bk, off.Name)
	require.Equal(t, 0, r.Code)
	assert.Equal(t, os.FileMode(0o600), offMetaOf(t, filepath.Join(bk, "disk1.qcow2")).Mode, "offline copy of a 0600 source")

	on := newDomain(t, "on-mode", domOpts{disks: []string{"secret.qcow2"}})
	require.NoError(t, os.Chmod(on.Disks[0], 0o600))
	bk2 := backupDir(t, "backup mode online")
	r = run(t, "-b", bk2, on.Name)
	require.Equal(t, 0, r.Code)
	src := offMetaOf(t, on.Disks[0])
	dst := offMetaOf(t, filepath.Join(bk2, "secret.qcow2"))
	assert.Zero(t, dst.Mode.Perm()&^src.Mode.Perm(),
		"online copy %v is more readable than its source %v", dst.Mode, src.Mode)
	assert.Equal(t, "running", on.state(t))
}

// TestOfflineModeNarrowedSource: a source made narrower after it was copied
// (chmod moves only the ctime, so cp -u sees nothing new). The copy already
// in the backup directory must not stay more readable than its source.
func TestOfflineModeNarrowedSource(t *testing.T) {
	bk := backupDir(t, "backup narrow dir")
	off2 := newDomain(t, "off-narrow", domOpts{disks: []string{"narrowed.qcow2"}, noStart: true})
	require.NoError(t, os.Chmod(off2.Disks[0], 0o644))
	r := run(t, "-b", bk, off2.Name)
	require.Equal(t, 0, r.Code)
	narrowed := filepath.Join(bk, "narrowed.qcow2")
	require.Equal(t, os.FileMode(0o644), offMetaOf(t, narrowed).Mode)
	require.NoError(t, os.Chmod(off2.Disks[0], 0o600))
	r = run(t, "-b", bk, off2.Name)
	require.Equal(t, 0, r.Code)
	assert.Zero(t, offMetaOf(t, narrowed).Mode.Perm()&^0o600,
		"the copy of a source narrowed to 0600 is still %v", offMetaOf(t, narrowed).Mode)
	offAssertReads(t, narrowed, "copy after the chmod", offPattern{0, "0", "1M"})
	offShutOff(t, off2)
}
