package itest

// Consolidation (-c, -C) against real libvirt/QEMU: the old CI scenarios
// T1b/T1c/T3/T4 (fi-backup-behaviour.md §13), the destructive-consolidation
// fixes B7/B8 (shared template), B41 (READY before pivot), timeouts,
// signals, restore points that survive a commit (B10) and the shut-off case.
//
// No test here runs in parallel: "all" and the shared-file check look at
// every domain of the host.

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// consVerLine is the [VER] line of a successful consolidation.
func consVerLine(disk, dom string) string {
	return fmt.Sprintf("[VER] Consolidation of block device '%s' for '%s' successful", disk, dom)
}

// T1b/T1c: backup ×2 then -dc, twice; the domain ends on its original file.
func TestConsolidateT1(t *testing.T) {
	d := newDomain(t, "cons-t1", domOpts{})
	orig := d.Disks[0]
	bd := backupDir(t)
	for round := 0; round < 2; round++ {
		p := byte(0xa1 + 0x10*round) // a1,a2,a3 / b1,b2,b3
		mb := func(i int) string { return fmt.Sprintf("%dM", round*8+i) }
		d.write(t, 0, p, mb(0), "1M")
		consSnap(t, "-d", "-b", bd, d.Name)
		d.write(t, 0, p+1, mb(1), "1M")
		consSnap(t, "-d", "-b", bd, d.Name)
		d.write(t, 0, p+2, mb(2), "1M")

		chain := d.liveChain(t, "vda")
		require.Len(t, chain, 3, "two backups → two overlays above the base")
		require.Equal(t, orig, chain[2])
		require.Len(t, consOverlays(t, d.Dir), 2)
		assert.FileExists(t, filepath.Join(bd, "disk1.qcow2"))
		assert.FileExists(t, filepath.Join(bd, filepath.Base(chain[1])))
		if round == 1 {
			// T1c: after the first commit the base changed and was copied
			// again, with everything committed into it in round 0.
			for i := 0; i < 3; i++ {
				consReads(t, filepath.Join(bd, "disk1.qcow2"), byte(0xa1+i), fmt.Sprintf("%dM", i), "1M")
			}
		}

		r := run(t, "-dc", d.Name)
		require.Equal(t, 0, r.Code)
		assert.True(t, consHasLine(r.Stdout, consVerLine(chain[0], d.Name)), "missing %q", consVerLine(chain[0], d.Name))
		assert.Contains(t, r.Stdout, "[DEB] Consolidation method: blockcommit")
		assert.Equal(t, []string{orig}, d.liveChain(t, "vda"), "round %d: back on the original image", round)
		assert.Equal(t, orig, d.source(t, "vda"))
		assert.Equal(t, []string{"disk1.qcow2"}, files(t, d.Dir), "overlays deleted")
		d.consRunning(t)
		d.consNoBlockJob(t, "vda")
		d.consFlush(t, 0)
		checkImages(t, orig)
		for r := 0; r <= round; r++ {
			for i := 0; i < 3; i++ {
				consReads(t, orig, byte(0xa1+0x10*r+i), fmt.Sprintf("%dM", r*8+i), "1M")
			}
		}
	}
}

// T3 (-dc "dom1 dom2" as one argument) and T4 (-dC dom1 dom2), a 1-disk and
// a 2-disk domain.
func TestConsolidateT3T4(t *testing.T) {
	// distinct file names as in the old CI: one flat backup directory
	// takes both domains' files (same names would be a B12 clash)
	d1 := newDomain(t, "cons-t3a", domOpts{disks: []string{"test1 1.qcow2"}})
	d2 := newDomain(t, "cons-t3b", domOpts{disks: []string{"test2 1.qcow2", "test2 2.qcow2"}})
	bd := backupDir(t)
	type disk struct {
		d      *Domain
		idx    int
		target string
	}
	disks := []disk{{d1, 0, "vda"}, {d2, 0, "vda"}, {d2, 1, "vdb"}}
	orig := func(k disk) string { return k.d.Disks[k.idx] }
	pattern := func(phase, k, i int) byte { return byte(0x30 + phase*0x40 + k*0x10 + i) }

	check := func(phase int, r result, tops []string) {
		t.Helper()
		require.Equal(t, 0, r.Code)
		for k, dk := range disks {
			if tops != nil {
				assert.True(t, consHasLine(r.Stdout, consVerLine(tops[k], dk.d.Name)), "missing %q", consVerLine(tops[k], dk.d.Name))
			}
			assert.Equal(t, []string{orig(dk)}, dk.d.liveChain(t, dk.target), "%s %s back on its base", dk.d.Name, dk.target)
			dk.d.consFlush(t, dk.idx)
			checkImages(t, orig(dk))
			for ph := 0; ph <= phase; ph++ {
				for i := 0; i < 3; i++ {
					consReads(t, orig(dk), pattern(ph, k, i), fmt.Sprintf("%dM", ph*8+i), "1M")
				}
			}
		}
		for _, d := range []*Domain{d1, d2} {
			assert.Empty(t, consOverlays(t, d.Dir), "%s: overlays deleted", d.Name)
			d.consRunning(t)
		}
	}
	writeAll := func(phase, i int) {
		for k, dk := range disks {
			dk.d.write(t, dk.idx, pattern(phase, k, i), fmt.Sprintf("%dM", phase*8+i), "1M")
		}
	}

	// T3
	both := d1.Name + " " + d2.Name
	writeAll(0, 0)
	consSnap(t, "-d", "-b", bd, both)
	writeAll(0, 1)
	consSnap(t, "-d", "-b", bd, both)
	writeAll(0, 2)
	var tops []string
	for _, dk := range disks {
		c := dk.d.liveChain(t, dk.target)
		require.Len(t, c, 3)
		tops = append(tops, c[0])
		assert.FileExists(t, filepath.Join(bd, filepath.Base(c[1])))
		assert.FileExists(t, filepath.Join(bd, filepath.Base(c[2])))
	}
	r := run(t, "-dc", both)
	check(0, r, tops)

	// T4: -C snapshots first, so the consolidated top is a brand-new overlay.
	writeAll(1, 0)
	consSnap(t, "-d", "-b", bd, d1.Name, d2.Name)
	writeAll(1, 1)
	consSnap(t, "-d", "-b", bd, d1.Name, d2.Name)
	writeAll(1, 2)
	for _, dk := range disks {
		require.Len(t, dk.d.liveChain(t, dk.target), 3)
	}
	nextSecond()
	r = run(t, "-dC", d1.Name, d2.Name)
	check(1, r, nil)
	for _, dk := range disks {
		stem := strings.TrimSuffix(orig(dk), ".qcow2")
		re := regexp.MustCompile(`^\[VER\] Consolidation of block device '` + regexp.QuoteMeta(stem+".bimg-") +
			`[0-9]{8}-[0-9]{6}' for '` + regexp.QuoteMeta(dk.d.Name) + `' successful$`)
		n := 0
		for _, l := range consLines(r.Stdout) {
			if re.MatchString(l) {
				n++
			}
		}
		assert.Equal(t, 1, n, "one consolidation line for %s %s", dk.d.Name, dk.target)
	}
}

// B7/B8: a template shared by two domains is never committed into nor
// deleted; blockpull keeps (and says so) the files it no longer needs.
func TestConsolidateTemplate(t *testing.T) {
	requireLibvirt(t)
	tplDir := filepath.Join(t.TempDir(), "tpl dir")
	require.NoError(t, os.MkdirAll(tplDir, 0o755))
	tpl := filepath.Join(tplDir, "template.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", tpl, "64M")
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", tpl)
	a := newDomain(t, "cons-tpl-a", domOpts{disks: []string{"vm.qcow2"}, backing: map[string]string{"vm.qcow2": tpl}})
	b := newDomain(t, "cons-tpl-b", domOpts{disks: []string{"vm.qcow2"}, backing: map[string]string{"vm.qcow2": tpl}})
	vmA, vmB := a.Disks[0], b.Disks[0]
	require.Equal(t, []string{vmA, tpl}, a.liveChain(t, "vda"))
	require.Equal(t, []string{vmB, tpl}, b.liveChain(t, "vda"))
	tplSum := consSHA256(t, tpl)
	bd := backupDir(t)
	checkB := func() {
		t.Helper()
		assert.Equal(t, tplSum, consSHA256(t, tpl), "the shared template was modified")
		assert.Equal(t, []string{vmB, tpl}, b.liveChain(t, "vda"), "the other domain's chain")
		b.consRunning(t)
		consReads(t, vmB, 0x11, "0", "1M")
	}

	// blockcommit: into vm.qcow2, never into the template
	a.write(t, 0, 0x22, "1M", "1M")
	consSnap(t, "-d", "-b", bd, a.Name)
	a.write(t, 0, 0x33, "2M", "1M")
	before := a.liveChain(t, "vda")
	require.Equal(t, []string{vmA, tpl}, before[1:])
	r := run(t, "-d", "-m", "blockcommit", "-c", a.Name)
	require.Equal(t, 0, r.Code)
	assert.Contains(t, r.Stdout, fmt.Sprintf("[DEB] Committing into '%s'", vmA))
	assert.True(t, consHasLine(r.Stdout, consVerLine(before[0], a.Name)))
	assert.Equal(t, []string{vmA, tpl}, a.liveChain(t, "vda"), "A runs on its own vm.qcow2 above the template")
	assert.Equal(t, []string{"vm.qcow2"}, files(t, a.Dir))
	assert.FileExists(t, tpl)
	a.consRunning(t)
	checkB()
	a.consFlush(t, 0)
	checkImages(t, vmA, tpl)
	consReads(t, vmA, 0x11, "0", "1M")
	consReads(t, vmA, 0x22, "1M", "1M")
	consReads(t, vmA, 0x33, "2M", "1M")

	// blockpull: the top becomes standalone; vm.qcow2 and the template stay
	consSnap(t, "-d", "-b", bd, a.Name)
	a.write(t, 0, 0x44, "3M", "1M")
	before = a.liveChain(t, "vda")
	require.Len(t, before, 3)
	top := before[0]
	r = run(t, "-d", "-m", "blockpull", "-c", a.Name)
	require.Equal(t, 0, r.Code)
	assert.True(t, consHasLine(r.Stdout, consVerLine(top, a.Name)))
	assert.Equal(t, []string{top}, a.liveChain(t, "vda"), "the pulled overlay stands alone")
	assert.FileExists(t, vmA, "vm.qcow2 must not be deleted")
	assert.FileExists(t, tpl, "the template must not be deleted")
	for _, w := range []string{
		fmt.Sprintf("[WAR] '%s' doesn't seem to be a backup backing file image. Not deleting it (manual intervention required)", vmA),
		// the template is in use: the admin is told to keep it, not to delete it by hand
		fmt.Sprintf("[WAR] '%s' is in use by domain '%s' and must stay. Not deleting it", tpl, b.Name),
	} {
		assert.True(t, consHasLine(r.Stdout, w), "missing %q", w)
	}
	a.consRunning(t)
	checkB()
	a.consFlush(t, 0)
	checkImages(t, top)
	consReads(t, top, 0x11, "0", "1M")
	consReads(t, top, 0x22, "1M", "1M")
	consReads(t, top, 0x33, "2M", "1M")
	consReads(t, top, 0x44, "3M", "1M")
}

// B7: an overlay that leaves the chain but is used by another defined
// (shut-off) domain is kept, with a warning naming that domain.
func TestConsolidateSharedOverlayKept(t *testing.T) {
	a := newDomain(t, "cons-shr-a", domOpts{})
	base := a.Disks[0]
	a.write(t, 0, 0xd1, "0", "1M")
	consSnap(t, "-d", a.Name)
	t1 := a.liveChain(t, "vda")[0]
	a.write(t, 0, 0xd2, "1M", "1M")
	consSnap(t, "-d", a.Name)
	a.write(t, 0, 0xd3, "2M", "1M")
	before := a.liveChain(t, "vda")
	require.Equal(t, []string{t1, base}, before[1:])
	// a clone of the restore point T1, defined but not running
	c := newDomain(t, "cons-shr-c", domOpts{disks: []string{"clone.qcow2"}, backing: map[string]string{"clone.qcow2": t1}, noStart: true})
	clone := c.Disks[0]
	t1Sum, baseSum := consSHA256(t, t1), consSHA256(t, base)

	r := run(t, "-d", "-m", "blockpull", "-c", a.Name)
	require.Equal(t, 0, r.Code)
	assert.True(t, consHasLine(r.Stdout, consVerLine(before[0], a.Name)))
	assert.Equal(t, []string{before[0]}, a.liveChain(t, "vda"))
	for _, w := range []string{
		fmt.Sprintf("[WAR] '%s' is in use by domain '%s' and must stay. Not deleting it", t1, c.Name),
		fmt.Sprintf("[WAR] '%s' is in use by domain '%s' and must stay. Not deleting it", base, c.Name),
	} {
		assert.True(t, consHasLine(r.Stdout, w), "missing %q", w)
	}
	assert.FileExists(t, t1)
	assert.FileExists(t, base)
	assert.Equal(t, t1Sum, consSHA256(t, t1))
	assert.Equal(t, baseSum, consSHA256(t, base))
	assert.Equal(t, []string{clone, t1, base}, chainOf(t, clone), "the clone's chain is intact")
	assert.Equal(t, "shut off", c.state(t))
	consReads(t, clone, 0xd1, "0", "1M")
	consReads(t, clone, 0xd2, "1M", "1M")
	consReads(t, clone, 0x00, "2M", "1M")
	a.consRunning(t)
	a.consFlush(t, 0)
	checkImages(t, before[0], clone, t1, base)
	consReads(t, before[0], 0xd1, "0", "1M")
	consReads(t, before[0], 0xd2, "1M", "1M")
	consReads(t, before[0], 0xd3, "2M", "1M")
}

// Every byte written before, between and after the backups is in the
// active image after consolidation, for both methods.
func TestConsolidateDataTruth(t *testing.T) {
	for _, method := range []string{"blockcommit", "blockpull"} {
		t.Run(method, func(t *testing.T) {
			d := newDomain(t, "cons-dt-"+method, domOpts{})
			orig := d.Disks[0]
			bd := backupDir(t)
			d.write(t, 0, 0xb1, "0", "1M")
			consSnap(t, "-d", "-b", bd, d.Name)
			d.write(t, 0, 0xb2, "4M", "1M")
			consSnap(t, "-d", "-b", bd, d.Name)
			d.write(t, 0, 0xb3, "8M", "1M")
			d.write(t, 0, 0xb5, "0", "512K") // newer data over older
			consSnap(t, "-d", "-b", bd, d.Name)
			d.write(t, 0, 0xb4, "12M", "1M") // only in the active overlay
			before := d.liveChain(t, "vda")
			require.Len(t, before, 4)

			r := run(t, "-d", "-m", method, "-c", d.Name)
			require.Equal(t, 0, r.Code)
			assert.True(t, consHasLine(r.Stdout, consVerLine(before[0], d.Name)))
			active := d.source(t, "vda")
			if method == "blockcommit" {
				assert.Equal(t, orig, active)
				assert.Equal(t, []string{"disk1.qcow2"}, files(t, d.Dir))
			} else {
				assert.Equal(t, before[0], active)
				// the base is not an overlay: kept; the intermediates go
				assert.ElementsMatch(t, []string{"disk1.qcow2", filepath.Base(before[0])}, files(t, d.Dir))
			}
			assert.Equal(t, []string{active}, d.liveChain(t, "vda"))
			d.consRunning(t)
			d.consFlush(t, 0)
			checkImages(t, active)
			consReads(t, active, 0xb5, "0", "512K")
			consReads(t, active, 0xb1, "512K", "512K")
			consReads(t, active, 0xb2, "4M", "1M")
			consReads(t, active, 0xb3, "8M", "1M")
			consReads(t, active, 0xb4, "12M", "1M")
			consReads(t, active, 0x00, "1M", "3M")
		})
	}
}

// B41: a guest writing all the time while the commit runs; the pivot must
// wait for READY ("not ready for pivot" must never be seen).
func TestConsolidateReadyRace(t *testing.T) {
	d := newDomain(t, "cons-race", domOpts{})
	orig := d.Disks[0]
	virsh(t, "blockresize", d.Name, "vda", "512M")
	bd := backupDir(t)
	d.consWriteMiB(t, 0, 0x41, 0, 192, 64)
	consSnap(t, "-d", "-b", bd, d.Name)
	d.consWriteMiB(t, 0, 0x42, 128, 192, 64)
	consSnap(t, "-d", "-b", bd, d.Name)
	d.consWriteMiB(t, 0, 0x43, 0, 16, 4)
	before := d.liveChain(t, "vda")
	require.Len(t, before, 3)

	// two guest-like writers on disjoint halves, during the whole job
	wa := consStartWriter(d.Name, 0, 0x44, 0, 256, 4)
	wb := consStartWriter(d.Name, 0, 0x45, 256, 256, 4)
	stopped := false
	stop := func() (int64, error) {
		stopped = true
		na, ea := wa.Stop()
		nb, eb := wb.Stop()
		return na + nb, errors.Join(ea, eb)
	}
	defer func() {
		if !stopped {
			_, _ = stop()
		}
	}()
	writes := func() int64 { return wa.writes.Load() + wb.writes.Load() }
	require.True(t, eventually(10*time.Second, func() bool { return wa.writes.Load() >= 2 && wb.writes.Load() >= 2 }),
		"the background writers did not get going")

	cmd, out := consStart(t, "-d", "--job_timeout", "60s", "-c", d.Name)
	require.True(t, eventually(30*time.Second, func() bool { return strings.Contains(out.String(), "[DEB] Committing into") }),
		"the consolidation did not start:\n%s", out.String())
	atStart := writes()
	code := consWait(t, cmd, 90*time.Second)
	duringJob := writes() - atStart
	n, werr := stop()
	t.Logf("fi-backup -d --job_timeout 60s -c %s → %d\n%s", d.Name, code, out.String())
	t.Logf("background writes: %d, %d of them while the job ran", n, duringJob)
	assert.NoError(t, werr, "guest-like writes failed during the consolidation")
	assert.GreaterOrEqual(t, duringJob, int64(2), "the guest wrote while the job ran")

	assert.NotContains(t, out.String(), "not ready for pivot")
	if code == 0 {
		assert.True(t, consHasLine(out.String(), consVerLine(before[0], d.Name)))
		assert.Equal(t, []string{orig}, d.liveChain(t, "vda"))
		assert.Empty(t, consOverlays(t, d.Dir))
	} else {
		errs := strings.Join(consMessages(out.String(), "[ERR] "), "\n")
		assert.Contains(t, errs, "timed out", "a failure must be a clean timeout")
		assert.Equal(t, before, d.liveChain(t, "vda"))
	}
	d.consRunning(t)
	d.consNoBlockJob(t, "vda")
	chain := d.liveChain(t, "vda")
	checkImages(t, chain...)
	d.consFlush(t, 0)
	for _, w := range []*consWriter{wa, wb} {
		require.GreaterOrEqual(t, w.lastOff, 0)
	}
	consReads(t, chain[0], 0x44, fmt.Sprintf("%dM", wa.lastOff), "4M")
	consReads(t, chain[0], 0x45, fmt.Sprintf("%dM", wb.lastOff), "4M")
}

// A job that is not ready within --job_timeout is aborted: the domain stays
// on its previous chain, nothing is deleted, no job is left.
func TestConsolidateTimeout(t *testing.T) {
	d := newDomain(t, "cons-timeout", domOpts{})
	orig := d.Disks[0]
	consSnap(t, "-d", d.Name)
	d.consWriteMiB(t, 0, 0x66, 0, 64, 16)
	before := d.liveChain(t, "vda")
	require.Len(t, before, 2)
	beforeFiles := files(t, d.Dir)

	r := run(t, "-d", "--job_timeout", "1ns", "-c", d.Name)
	assert.Equal(t, 1, r.Code)
	errs := consMessages(r.Stdout, "[ERR] ")
	found := false
	for _, e := range errs {
		if strings.Contains(e, "timed out") && strings.Contains(e, before[0]) {
			found = true
		}
	}
	assert.True(t, found, "an [ERR] message about the timeout of %s: %q", before[0], errs)
	assert.False(t, consHasLine(r.Stdout, consVerLine(before[0], d.Name)))
	d.consRunning(t)
	assert.Equal(t, before, d.liveChain(t, "vda"), "the chain is unchanged")
	assert.Equal(t, beforeFiles, files(t, d.Dir), "no file deleted")
	d.consNoBlockJob(t, "vda")
	checkImages(t, before...)
	d.consFlush(t, 0)
	consReads(t, before[0], 0x66, "0", "64M")

	// the aborted job leaves a domain that consolidates normally
	r = run(t, "-d", "-c", d.Name)
	require.Equal(t, 0, r.Code)
	assert.Equal(t, []string{orig}, d.liveChain(t, "vda"))
	d.consFlush(t, 0)
	consReads(t, orig, 0x66, "0", "64M")
}

// SIGTERM during the block job (rate-limited to last at least 8 s, so the
// signal always lands in it): the job is aborted, the lock released, the
// exit code is 143.
func TestConsolidateSignal(t *testing.T) {
	d := newDomain(t, "cons-signal", domOpts{})
	orig := d.Disks[0]
	consSnap(t, "-d", d.Name)
	d.consWriteMiB(t, 0, 0x77, 0, 32, 32)
	before := d.liveChain(t, "vda")
	require.Len(t, before, 2)

	cmd, out := consStart(t, "-d", "-c", "--rate_limit=4M", d.Name)
	waitForJob(t, d, "vda", out)
	require.NoError(t, syscall.Kill(cmd.Process.Pid, syscall.SIGTERM))
	code := consWait(t, cmd, 60*time.Second)
	t.Logf("fi-backup -d -c %s (SIGTERM) → %d\n%s", d.Name, code, out.String())
	assert.Equal(t, 143, code)
	assert.True(t, consHasLine(out.String(), "[ERR] Interrupted by SIGTERM: stopped after cleaning up"))
	assert.False(t, consHasLine(out.String(), consVerLine(before[0], d.Name)))
	assert.Equal(t, before, d.liveChain(t, "vda"), "interrupted: the previous chain stays")
	assert.FileExists(t, before[0])
	d.consNoBlockJob(t, "vda")
	d.consRunning(t)
	checkImages(t, d.liveChain(t, "vda")...)

	// the lock was released and the domain still consolidates
	r := run(t, "-d", "-c", d.Name)
	require.Equal(t, 0, r.Code)
	assert.Equal(t, []string{orig}, d.liveChain(t, "vda"))
	assert.Equal(t, []string{"disk1.qcow2"}, files(t, d.Dir))
	d.consRunning(t)
	d.consFlush(t, 0)
	consReads(t, orig, 0x77, "0", "32M")
}

// B10: every restore point in the backup directory still shows the data of
// its moment after a blockcommit changed the base, from backup files only.
func TestConsolidateRestorePointsSurvive(t *testing.T) {
	d := newDomain(t, "cons-rp", domOpts{})
	bd := backupDir(t)
	d.write(t, 0, 0xc1, "0", "1M")
	consSnap(t, "-d", "-b", bd, d.Name) // T1: base copied
	o1 := d.liveChain(t, "vda")[0]
	d.write(t, 0, 0xc2, "1M", "1M")
	d.write(t, 0, 0xc5, "0", "512K")
	consSnap(t, "-d", "-b", bd, d.Name) // T2: o1 copied
	d.write(t, 0, 0xc3, "2M", "1M")
	r := run(t, "-d", "-c", d.Name)
	require.Equal(t, 0, r.Code)
	require.Equal(t, []string{d.Disks[0]}, d.liveChain(t, "vda"))
	d.write(t, 0, 0xc4, "3M", "1M")
	consSnap(t, "-d", "-b", bd, d.Name) // T3: the changed base copied again

	gens, err := filepath.Glob(filepath.Join(bd, "disk1.qcow2.gen-*"))
	require.NoError(t, err)
	require.Len(t, gens, 1, "the previous base copy is kept: %v", files(t, bd))
	gen := gens[0]
	base := filepath.Join(bd, "disk1.qcow2")
	o1c := filepath.Join(bd, filepath.Base(o1))
	assert.ElementsMatch(t, []string{"disk1.qcow2", filepath.Base(gen), filepath.Base(o1)}, files(t, bd))

	// the chains use backup files only
	assert.Equal(t, []string{gen}, chainOf(t, gen))
	assert.Equal(t, []string{o1c, gen}, chainOf(t, o1c))
	assert.Equal(t, []string{base}, chainOf(t, base))
	for _, f := range []string{gen, o1c, base} {
		consAllIn(t, bd, chainOf(t, f))
	}
	checkImages(t, gen, o1c, base)

	// T1
	consReads(t, gen, 0xc1, "0", "1M")
	consReads(t, gen, 0x00, "1M", "3M")
	// T2
	consReads(t, o1c, 0xc5, "0", "512K")
	consReads(t, o1c, 0xc1, "512K", "512K")
	consReads(t, o1c, 0xc2, "1M", "1M")
	consReads(t, o1c, 0x00, "2M", "2M")
	// T3
	consReads(t, base, 0xc5, "0", "512K")
	consReads(t, base, 0xc1, "512K", "512K")
	consReads(t, base, 0xc2, "1M", "1M")
	consReads(t, base, 0xc3, "2M", "1M")
	consReads(t, base, 0xc4, "3M", "1M")
}

// TestConsolidateRefusesSharedBase: when another domain's chain contains
// the image blockcommit would write into, the commit is refused (it would
// change that domain's disk under it), the chain stays as it is, exit 1.
func TestConsolidateRefusesSharedBase(t *testing.T) {
	a := newDomain(t, "cons-base-a", domOpts{})
	base := a.Disks[0]
	a.write(t, 0, 0xe1, "0", "1M")
	consSnap(t, "-d", a.Name)
	t1 := a.liveChain(t, "vda")[0]
	a.write(t, 0, 0xe2, "1M", "1M")
	consSnap(t, "-d", a.Name)
	a.write(t, 0, 0xe3, "2M", "1M") // only in the active layer
	before := a.liveChain(t, "vda")
	// A clone of restore point T1, defined but shut off: its chain holds base.
	c := newDomain(t, "cons-base-c", domOpts{disks: []string{"clone.qcow2"}, backing: map[string]string{"clone.qcow2": t1}, noStart: true})
	baseSum := consSHA256(t, base)

	r := run(t, "-d", "-c", a.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, fmt.Sprintf("'%s' is in the backing chain of domain '%s': committing into it would change that domain's disk", base, c.Name))
	assert.Equal(t, before, a.liveChain(t, "vda"), "chain unchanged")
	assert.Equal(t, baseSum, consSHA256(t, base), "the shared base is untouched")
	consReads(t, c.Disks[0], 0xe1, "0", "1M")
	consReads(t, c.Disks[0], 0xe2, "1M", "1M")
	consReads(t, c.Disks[0], 0x00, "2M", "1M")
	a.consRunning(t)

	// blockpull writes only into the active layer: allowed, and the shared files stay.
	r = run(t, "-d", "-m", "blockpull", "-c", a.Name)
	assert.Equal(t, 0, r.Code)
	assert.FileExists(t, t1)
	assert.FileExists(t, base)
	assert.Equal(t, baseSum, consSHA256(t, base))
}
