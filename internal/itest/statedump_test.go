package itest

// The -s state dump against real libvirt/QEMU (fi-backup-behaviour.md §6,
// compatibility B20/B21): the old CI's T5, the file format, the pause, and
// the failure paths, each of which must leave the guest running and no
// partial state file.
//
// Helpers here are prefixed "sd" (other files of the package are edited by
// others).

import (
	"bytes"
	"compress/gzip"
	be "encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/testenv"
)

const sdMemMiB = 32 // newDomain's <memory>

var (
	sdPauseRE = regexp.MustCompile(`\[VER\] Domain '([^']+)' was paused for ([0-9]+\.[0-9]{3})s`)
	sdFileRE  = regexp.MustCompile(`^(.+)\.statefile-([0-9]{8}-[0-9]{6})\.gz$`)
)

// sdPauses logs and returns the pause times a run reported, by domain.
func sdPauses(t *testing.T, out string) map[string]float64 {
	t.Helper()
	m := map[string]float64{}
	for _, g := range sdPauseRE.FindAllStringSubmatch(out, -1) {
		v, err := strconv.ParseFloat(g[2], 64)
		require.NoError(t, err)
		m[g[1]] = v
		t.Logf("pause time of %s: %s s", g[1], g[2])
	}
	return m
}

// sdStateFiles lists dir's state files as timestamps by domain; it fails
// on anything else in dir (a partial or temporary file).
func sdStateFiles(t *testing.T, dir string) map[string][]string {
	t.Helper()
	m := map[string][]string{}
	for _, f := range files(t, dir) {
		g := sdFileRE.FindStringSubmatch(f)
		if !assert.NotNil(t, g, "unexpected file %q in the state directory", f) {
			continue
		}
		m[g[1]] = append(m[g[1]], g[2])
	}
	for _, v := range m {
		sort.Strings(v)
	}
	return m
}

// sdOverlayStamps are the distinct snapshot timestamps of a domain's overlays.
func sdOverlayStamps(t *testing.T, dir string) []string {
	t.Helper()
	seen := map[string]bool{}
	var out []string
	for _, o := range overlays(t, dir) {
		ts := o[strings.LastIndex(o, ".bimg-")+len(".bimg-"):]
		if !seen[ts] {
			seen[ts] = true
			out = append(out, ts)
		}
	}
	sort.Strings(out)
	return out
}

// sdInOrder asserts that, after the first line of domain dom's run, the
// given lines appear in this order.
func sdInOrder(t *testing.T, out, dom string, lines ...string) {
	t.Helper()
	start := strings.Index(out, "[DEB] Snapshot for domain '"+dom+"' requested\n")
	require.GreaterOrEqual(t, start, 0, "no run of %s", dom)
	pos := start
	for _, l := range lines {
		i := strings.Index(out[pos:], l)
		if !assert.GreaterOrEqual(t, i, 0, "%q missing or out of order for %s", l, dom) {
			return
		}
		pos += i + len(l)
	}
}

// sdStream is what verifyStateFile learnt from a state file.
type sdStream struct {
	Raw      int64            // uncompressed size
	Machine  string           // machine type from the configuration section
	RAMTotal int64            // total of all RAM blocks
	Blocks   map[string]int64 // RAM block → length
	Devices  int              // devices in the trailing vmstate description
}

// sdVerifyStateFile checks that path is a gzip'ed, complete QEMU migration
// stream of a guest with memMiB of RAM:
//   - QEMU_VM_FILE_MAGIC "QEVM", QEMU_VM_FILE_VERSION 3;
//   - QEMU_VM_CONFIGURATION (0x07) with the machine type;
//   - the first section is "ram" (QEMU_VM_SECTION_START 0x01), whose setup
//     lists the RAM blocks: "pc.ram" must be exactly the guest's RAM;
//   - the end: QEMU 7.2 writes QEMU_VM_EOF (0x00) after the last device
//     section, then QEMU_VM_VMDESCRIPTION (0x06), a be32 length and that
//     many bytes of JSON describing the devices — the last byte of a
//     complete stream is the JSON's closing brace, and the EOF marker sits
//     exactly 6+length bytes before the end;
//   - the size is plausible: every guest page costs at least 9 bytes (an
//     8-byte page header plus one byte for a zero page) and at most a page
//     plus its header, plus device state.
func sdVerifyStateFile(t *testing.T, path string, memMiB int64) sdStream {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	require.NoError(t, err)
	s, err := io.ReadAll(zr)
	require.NoError(t, err, "%s is not a complete gzip stream", path)
	n := int64(len(s))
	res := sdStream{Raw: n, Blocks: map[string]int64{}}
	require.Greater(t, n, int64(64))
	require.Equal(t, []byte("QEVM\x00\x00\x00\x03"), s[:8], "QEMU_VM_FILE_MAGIC and version 3")

	// Configuration section.
	p := 8
	require.Equal(t, byte(0x07), s[p], "QEMU_VM_CONFIGURATION")
	l := int(be.BigEndian.Uint32(s[p+1:]))
	res.Machine = string(s[p+5 : p+5+l])
	assert.True(t, strings.HasPrefix(res.Machine, "pc-"), "machine %q", res.Machine)

	// The ram section's setup: be64 total|RAM_SAVE_FLAG_MEM_SIZE, then
	// (len, idstr, be64 length) per block.
	hdr := []byte("\x03ram")
	i := bytes.Index(s[p:min(len(s), 4096)], hdr)
	require.GreaterOrEqual(t, i, 0, "no ram section at the start")
	q := p + i + len(hdr)
	require.Equal(t, byte(0x01), s[p+i-5], "QEMU_VM_SECTION_START before the ram section")
	q += 8 // instance id, version id
	v := be.BigEndian.Uint64(s[q:])
	require.Equal(t, uint64(0x04), v&0xfff, "RAM_SAVE_FLAG_MEM_SIZE")
	res.RAMTotal = int64(v &^ 0xfff)
	q += 8
	var sum int64
	for sum < res.RAMTotal {
		nl := int(s[q])
		name := string(s[q+1 : q+1+nl])
		bl := int64(be.BigEndian.Uint64(s[q+1+nl:]))
		res.Blocks[name] = bl
		sum += bl
		q += 1 + nl + 8
	}
	require.Equal(t, res.RAMTotal, sum, "RAM blocks add up")
	assert.Equal(t, memMiB<<20, res.Blocks["pc.ram"], "pc.ram is the guest's RAM: %v", res.Blocks)

	// The end of the stream.
	found := false
	for e := len(s) - 6; e > len(s)-(1<<20) && e > 0; e-- {
		if s[e] == 0x00 && s[e+1] == 0x06 && int(be.BigEndian.Uint32(s[e+2:])) == len(s)-(e+6) {
			var desc struct {
				PageSize int               `json:"page_size"`
				Devices  []json.RawMessage `json:"devices"`
			}
			if json.Unmarshal(s[e+6:], &desc) == nil {
				assert.Equal(t, 4096, desc.PageSize)
				res.Devices = len(desc.Devices)
				found = true
				break
			}
		}
	}
	require.True(t, found, "no QEMU_VM_EOF + QEMU_VM_VMDESCRIPTION trailer: the stream is incomplete (last bytes %q)", s[max(0, len(s)-32):])
	assert.Equal(t, byte('}'), s[len(s)-1])
	assert.Greater(t, res.Devices, 5, "the description lists the machine's devices")

	pages := res.RAMTotal / 4096
	assert.GreaterOrEqual(t, n, pages*9, "smaller than a stream of all-zero pages")
	assert.LessOrEqual(t, n, res.RAMTotal+pages*16+(8<<20), "bigger than all RAM plus headers and devices")
	t.Logf("%s: %d bytes gzip'ed, %d bytes of stream, machine %s, RAM blocks %v, %d devices",
		filepath.Base(path), sdSize(t, path), n, res.Machine, res.Blocks, res.Devices)
	return res
}

func sdSize(t *testing.T, p string) int64 {
	fi, err := os.Stat(p)
	require.NoError(t, err)
	return fi.Size()
}

type sdProc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

// sdStart starts fi-backup in dir (the test's cwd when "") with extra
// environment; it is killed at the end of the test if still running.
func sdStart(t *testing.T, dir string, env []string, args ...string) *sdProc {
	t.Helper()
	cmd := exec.Command(binary(t), args...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Dir = dir
	cmd.Env = append(append(os.Environ(), "LC_ALL=C"), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	p := &sdProc{cmd: cmd, out: out, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

func (p *sdProc) wait(t *testing.T, limit time.Duration) result {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(limit):
		t.Fatalf("fi-backup still running after %s:\n%s", limit, p.out.String())
	}
	r := result{Stdout: p.out.String(), Code: p.cmd.ProcessState.ExitCode()}
	t.Logf("fi-backup %s → %d\n%s", strings.Join(p.cmd.Args[1:], " "), r.Code, r.Stdout)
	if r.Code >= 0 { // not killed by a signal
		assertErrMeansFailure(t, r.Stdout, r.Code)
	}
	return r
}

// sdRun runs fi-backup to the end in dir with extra environment.
func sdRun(t *testing.T, dir string, env []string, args ...string) result {
	t.Helper()
	return sdStart(t, dir, env, args...).wait(t, 3*time.Minute)
}

// sdQMP sends a QMP command through virsh and returns the "return" member.
func sdQMP(t *testing.T, dom, cmd string) json.RawMessage {
	t.Helper()
	out := virsh(t, "qemu-monitor-command", dom, cmd)
	var r struct {
		Return json.RawMessage `json:"return"`
		Error  any             `json:"error"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &r), out)
	require.Nil(t, r.Error, out)
	return r.Return
}

func sdMaxBandwidth(t *testing.T, dom string) int64 {
	t.Helper()
	var p struct {
		MaxBandwidth int64 `json:"max-bandwidth"`
	}
	require.NoError(t, json.Unmarshal(sdQMP(t, dom, `{"execute":"query-migrate-parameters"}`), &p))
	return p.MaxBandwidth
}

func sdMigrationStatus(t *testing.T, dom string) string {
	t.Helper()
	var m struct {
		Status string `json:"status"`
	}
	require.NoError(t, json.Unmarshal(sdQMP(t, dom, `{"execute":"query-migrate"}`), &m))
	return m.Status
}

// sdMount mounts a tmpfs with options at a new directory, unmounted at the
// end of the test.
func sdMount(t *testing.T, opts string) string {
	t.Helper()
	testenv.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "state dir")
	require.NoError(t, os.Mkdir(dir, 0o755))
	sh(t, "mount", "-t", "tmpfs", "-o", opts, "fibt-statedump", dir)
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
	return dir
}

func sdStateDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "state dir")
	require.NoError(t, os.Mkdir(dir, 0o755))
	return dir
}

// sdAssertClean: the domain runs, is not in a migration, and has no
// overlay; the state directory is empty.
func sdAssertClean(t *testing.T, d *Domain, stateDir string) {
	t.Helper()
	assert.Equal(t, "running", d.state(t), "the guest must run again")
	assert.NotContains(t, []string{"setup", "active", "pre-switchover", "device", "cancelling"}, sdMigrationStatus(t, d.Name))
	if stateDir != "" {
		assert.Empty(t, files(t, stateDir), "no (partial) state file")
	}
}

// TestT5StateDump is the old CI's T5: -s with -b on two domains (one with
// two disks) twice, then -c. The state files pair with the overlays by
// timestamp, are complete migration streams, and every guest runs after
// every step; the guest is resumed before the copy starts.
func TestT5StateDump(t *testing.T) {
	d1 := newDomain(t, "t5-one", domOpts{disks: []string{"one.qcow2"}})
	d2 := newDomain(t, "t5-two", domOpts{disks: []string{"two a.qcow2", "two b.img"}})
	bk := backupDir(t)
	sd := sdStateDir(t)
	doms := d1.Name + " " + d2.Name
	for i := 0; i < 2; i++ {
		if i > 0 {
			nextSecond()
		}
		d1.write(t, 0, byte(0x51+i), fmt.Sprintf("%dM", i), "1M")
		r := sdRun(t, "", nil, "-d", "-s", sd, "-b", bk, doms)
		require.Equal(t, 0, r.Code)
		for _, d := range []*Domain{d1, d2} {
			sdInOrder(t, r.Stdout, d.Name,
				"[VER] Dumping domain state\n",
				"[VER] /usr/bin/virsh -q snapshot-create-as "+d.Name+" bimg-",
				"[VER] Snapshot for block devices of '"+d.Name+"' successful\n",
				"[DEB] Resuming domain\n",
				"[VER] Domain resumed\n",
				"[VER] Domain '"+d.Name+"' was paused for ",
				"[VER] Copy backing file '", // B20: copying starts after the resume
			)
			assert.Equal(t, "running", d.state(t))
		}
		pauses := sdPauses(t, r.Stdout)
		assert.Len(t, pauses, 2)
		for dom, p := range pauses {
			assert.Less(t, p, 5.0, "%s paused too long", dom)
		}
		assert.NotContains(t, r.Stdout, "[ERR]")
	}

	states := sdStateFiles(t, sd)
	for _, d := range []*Domain{d1, d2} {
		stamps := sdOverlayStamps(t, d.Dir)
		require.Len(t, stamps, 2)
		assert.Equal(t, stamps, states[d.Name], "one state file per snapshot, same timestamp")
		for _, ts := range states[d.Name] {
			p := filepath.Join(sd, d.Name+".statefile-"+ts+".gz")
			fi, err := os.Stat(p)
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
			sdVerifyStateFile(t, p, sdMemMiB)
		}
	}
	assert.Len(t, overlays(t, d2.Dir), 4, "two disks, two runs")
	ov := overlays(t, d1.Dir)
	assert.Equal(t, []string{filepath.Join(d1.Dir, ov[1]), filepath.Join(d1.Dir, ov[0]), d1.Disks[0]}, d1.liveChain(t, "vda"))
	assert.Equal(t, []string{filepath.Join(bk, ov[0]), filepath.Join(bk, "one.qcow2")}, assertSelfContained(t, filepath.Join(bk, ov[0])))
	first := sdOverlayStamps(t, d2.Dir)[0]
	for _, base := range []string{"two a", "two b"} { // the first run's overlays of both disks
		assertSelfContained(t, filepath.Join(bk, base+".bimg-"+first))
	}
	assert.True(t, readsBack(t, filepath.Join(bk, ov[0]), 0x52, "1M", "1M"), "the second write is in the first overlay's copy")
	// A snapshot taken while QEMU sat in postmigrate consolidates normally.
	r := sdRun(t, "", nil, "-d", "-c", doms)
	require.Equal(t, 0, r.Code)
	assert.Equal(t, []string{d1.Disks[0]}, d1.liveChain(t, "vda"))
	assert.Equal(t, []string{d2.Disks[0]}, d2.liveChain(t, "vda"))
	assert.Equal(t, []string{d2.Disks[1]}, d2.liveChain(t, "vdb"))
	assert.Empty(t, overlays(t, d1.Dir))
	assert.Empty(t, overlays(t, d2.Dir))
	for _, d := range []*Domain{d1, d2} {
		assert.Equal(t, "running", d.state(t))
	}
	assert.Equal(t, states, sdStateFiles(t, sd), "consolidation leaves the state files alone")
}

// TestStateDumpRelativeDir (B21): a relative -s directory is the tool's,
// not QEMU's.
func TestStateDumpRelativeDir(t *testing.T) {
	d := newDomain(t, "sd-rel", domOpts{})
	cwd := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(cwd, "states"), 0o755))
	r := sdRun(t, cwd, nil, "-v", "-s", "states", d.Name)
	require.Equal(t, 0, r.Code)
	st := sdStateFiles(t, filepath.Join(cwd, "states"))
	require.Len(t, st[d.Name], 1)
	assert.Equal(t, sdOverlayStamps(t, d.Dir), st[d.Name])
	sdVerifyStateFile(t, filepath.Join(cwd, "states", d.Name+".statefile-"+st[d.Name][0]+".gz"), sdMemMiB)
	sdPauses(t, r.Stdout)
	sdAssertClean(t, d, "")
}

// TestStateDumpUnwritableDir: a read-only file system: refused before the
// migration, no snapshot.
func TestStateDumpUnwritableDir(t *testing.T) {
	d := newDomain(t, "sd-ro", domOpts{})
	sd := sdMount(t, "ro,size=1m")
	bk := t.TempDir()
	r := sdRun(t, "", nil, "-d", "-s", sd, "-b", bk, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Failed to dump the state of '"+d.Name+"': cannot create the state file in '"+sd+"': read-only file system\n[ERR] Domain state dump failed!\n")
	assert.NotContains(t, r.Stdout, "snapshot-create-as")
	assert.Empty(t, overlays(t, d.Dir))
	assert.Empty(t, files(t, bk))
	sdAssertClean(t, d, sd)
}

// TestStateDumpDiskFull: the state directory fills up during the dump.
func TestStateDumpDiskFull(t *testing.T) {
	d := newDomain(t, "sd-full", domOpts{})
	sd := sdMount(t, "size=64k")
	bk := t.TempDir()
	r := sdRun(t, "", nil, "-d", "-s", sd, "-b", bk, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Failed to dump the state of '"+d.Name+"': cannot write the state file: no space left on device\n")
	assert.Contains(t, r.Stdout, "[ERR] Domain state dump failed!\n")
	assert.NotContains(t, r.Stdout, "snapshot-create-as")
	assert.Empty(t, overlays(t, d.Dir))
	assert.Empty(t, files(t, bk))
	sdPauses(t, r.Stdout)
	sdAssertClean(t, d, sd)
}

// TestStateDumpDirVanishes: the directory is removed while the first
// domain's (slowed-down) dump runs: that dump cannot be saved, the second
// cannot start; both guests run, nothing is left.
func TestStateDumpDirVanishes(t *testing.T) {
	d1 := newDomain(t, "sd-van1", domOpts{})
	d2 := newDomain(t, "sd-van2", domOpts{})
	sd := sdStateDir(t)
	p := sdStart(t, "", []string{"FI_BACKUP_TEST_DUMP_BANDWIDTH=131072"}, "-d", "-s", sd, d1.Name+" "+d2.Name)
	require.True(t, eventually(30*time.Second, func() bool {
		es, _ := os.ReadDir(sd)
		return len(es) > 0
	}), "the dump did not start:\n%s", p.out.String())
	require.NoError(t, os.RemoveAll(sd))
	r := p.wait(t, 2*time.Minute)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Cannot save the state file: cannot rename the state file to '"+filepath.Join(sd, d1.Name)+".statefile-")
	assert.Contains(t, r.Stdout, "[ERR] Failed to dump the state of '"+d2.Name+"': cannot create the state file in '"+sd+"': no such file or directory\n")
	sdPauses(t, r.Stdout)
	sdAssertClean(t, d1, "")
	sdAssertClean(t, d2, "")
	assert.Empty(t, overlays(t, d2.Dir))
	assert.NoDirExists(t, sd)
}

// TestStateDumpSignal: SIGTERM while the (slowed-down) migration runs:
// the migration is cancelled, the bandwidth restored, nothing is left, and
// the tool exits 143.
func TestStateDumpSignal(t *testing.T) {
	d := newDomain(t, "sd-sig", domOpts{})
	sd := sdStateDir(t)
	bw := sdMaxBandwidth(t, d.Name)
	p := sdStart(t, "", []string{"FI_BACKUP_TEST_DUMP_BANDWIDTH=32768"}, "-d", "-s", sd, "-b", t.TempDir(), d.Name)
	// (nothing is printed while a dump runs: QEMU itself is asked)
	require.True(t, eventually(30*time.Second, func() bool {
		return sdMigrationStatus(t, d.Name) == "active"
	}), "the migration did not start:\n%s", p.out.String())
	require.NoError(t, syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM))
	r := p.wait(t, time.Minute)
	assert.Equal(t, 143, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Failed to dump the state of '"+d.Name+"': interrupted by SIGTERM\n")
	assert.Contains(t, r.Stdout, "[DEB] Cancelling the migration of '"+d.Name+"'\n")
	assert.Contains(t, r.Stdout, "[ERR] Domain state dump failed!\n")
	assert.Contains(t, r.Stdout, "[ERR] Interrupted by SIGTERM: stopped after cleaning up\n")
	assert.Empty(t, overlays(t, d.Dir))
	assert.Equal(t, "cancelled", sdMigrationStatus(t, d.Name))
	assert.Equal(t, bw, sdMaxBandwidth(t, d.Name), "max-bandwidth restored")
	sdAssertClean(t, d, sd)
}

// sdPauseBeforeSwitchover makes QEMU stop the guest and wait before the
// final phase of every migration: a dump then hangs with the guest paused,
// the worst moment for a timeout or a signal.
func sdPauseBeforeSwitchover(t *testing.T, d *Domain) {
	t.Helper()
	set := func(on bool) string {
		return fmt.Sprintf(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"pause-before-switchover","state":%t}]}}`, on)
	}
	sdQMP(t, d.Name, set(true))
	t.Cleanup(func() { _ = exec.Command("virsh", "-c", uri, "qemu-monitor-command", d.Name, set(false)).Run() })
}

// sdStartHeldPaused starts `fi-backup -d -s sd dom` with QEMU told to stop
// before the switchover, and returns once the dump holds the guest paused.
func sdStartHeldPaused(t *testing.T, d *Domain, sd string) *sdProc {
	t.Helper()
	sdPauseBeforeSwitchover(t, d)
	p := sdStart(t, "", nil, "-d", "-s", sd, d.Name)
	require.True(t, eventually(30*time.Second, func() bool {
		return sdMigrationStatus(t, d.Name) == "pre-switchover"
	}), "the migration did not reach pre-switchover:\n%s", p.out.String())
	return p
}

// TestStateDumpSignalWhilePaused: SIGTERM while the migration holds the
// guest paused.
func TestStateDumpSignalWhilePaused(t *testing.T) {
	d := newDomain(t, "sd-sigp", domOpts{})
	sd := sdStateDir(t)
	p := sdStartHeldPaused(t, d, sd)
	assert.Equal(t, "paused", d.state(t))
	require.NoError(t, syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM))
	r := p.wait(t, time.Minute)
	assert.Equal(t, 143, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Failed to dump the state of '"+d.Name+"': interrupted by SIGTERM\n")
	assert.Contains(t, r.Stdout, "[DEB] Cancelling the migration of '"+d.Name+"'\n")
	assert.Empty(t, overlays(t, d.Dir))
	sdAssertClean(t, d, sd)
}

// TestStateDumpTimeout: a migration that does not complete in time is
// cancelled, and the guest it paused runs again.
func TestStateDumpTimeout(t *testing.T) {
	d := newDomain(t, "sd-tmo", domOpts{})
	sdPauseBeforeSwitchover(t, d)
	sd := sdStateDir(t)
	start := time.Now()
	r := sdRun(t, "", []string{"FI_BACKUP_DUMP_TIMEOUT=2s"}, "-d", "-s", sd, d.Name)
	assert.Less(t, time.Since(start), 30*time.Second)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, ": pre-switchover\n")
	assert.Contains(t, r.Stdout, "[ERR] Failed to dump the state of '"+d.Name+"': the migration did not complete within 2s\n")
	assert.Contains(t, r.Stdout, "[ERR] Domain state dump failed!\n")
	assert.Empty(t, overlays(t, d.Dir))
	sdAssertClean(t, d, sd)
}

// TestStateDumpSnapshotFails: the dump succeeds but the disk snapshot
// fails (a non-empty file already sits at the overlay name): the guest is
// resumed, the state file (which no disk snapshot matches) removed, and
// nothing is copied.
func TestStateDumpSnapshotFails(t *testing.T) {
	d := newDomain(t, "sd-snapf", domOpts{})
	sd := sdStateDir(t)
	bk := t.TempDir()
	now := time.Now()
	var planted []string
	for i := 0; i < 8; i++ {
		p := filepath.Join(d.Dir, "disk1.bimg-"+now.Add(time.Duration(i)*time.Second).Format("20060102-150405"))
		require.NoError(t, os.WriteFile(p, []byte("not an overlay"), 0o644))
		planted = append(planted, filepath.Base(p))
	}
	r := sdRun(t, "", nil, "-d", "-s", sd, "-b", bk, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "[ERR] Snapshot for '"+d.Name+"' failed! unsupported configuration: external snapshot file for disk vda already exists")
	sdInOrder(t, r.Stdout, d.Name,
		"[VER] Dumping domain state\n",
		"[ERR] Snapshot for '"+d.Name+"' failed!",
		"[DEB] Resuming domain\n",
		"[VER] Domain resumed\n",
		"[VER] Domain '"+d.Name+"' was paused for ",
		"[VER] State dump discarded: no disk snapshot matches it\n")
	sdPauses(t, r.Stdout)
	assert.Equal(t, planted, overlays(t, d.Dir), "no new overlay")
	assert.Equal(t, []string{d.Disks[0]}, d.liveChain(t, "vda"))
	assert.Empty(t, files(t, bk), "nothing copied")
	sdAssertClean(t, d, sd)
}

// sdTicks reads the BIOS data area's timer tick count (0x46c, ticks since
// midnight at 18.2 Hz, kept by SeaBIOS while it idles): guest RAM that
// changes on its own.
func sdTicks(t *testing.T, dom string) uint32 {
	t.Helper()
	out := virsh(t, "qemu-monitor-command", dom, "--hmp", "xp /1wx 0x46c")
	i := strings.LastIndex(out, "0x")
	require.GreaterOrEqual(t, i, 0, out)
	v, err := strconv.ParseUint(strings.TrimSpace(out[i+2:]), 16, 32)
	require.NoError(t, err, out)
	return uint32(v)
}

// TestStateDumpRestores: the state file is a usable migration stream. It
// is wrapped into libvirt's save-image format (header "LibvirtQemudSave",
// version 2, the migratable XML, then the raw stream) and restored with
// `virsh restore`: the guest runs again with the RAM of the dump moment
// (its BIOS tick counter continues from the dumped value instead of the
// time of day a fresh boot would read). A truncated stream is refused.
func TestStateDumpRestores(t *testing.T) {
	d := newDomain(t, "sd-restore", domOpts{})
	sd := sdStateDir(t)
	// The counter runs from the time of day once SeaBIOS has set it up, and
	// wraps at midnight (0x1800b0): too close to it, wait for the wrap.
	require.True(t, eventually(3*time.Minute, func() bool {
		v := sdTicks(t, d.Name)
		return v > 0 && v < 0x1800b0-2000
	}), "the BIOS tick counter did not start (or midnight did not pass)")
	before := sdTicks(t, d.Name)
	r := sdRun(t, "", nil, "-v", "-s", sd, d.Name)
	require.Equal(t, 0, r.Code)
	st := sdStateFiles(t, sd)[d.Name]
	require.Len(t, st, 1)
	path := filepath.Join(sd, d.Name+".statefile-"+st[0]+".gz")
	sdVerifyStateFile(t, path, sdMemMiB)

	xml := virsh(t, "dumpxml", "--migratable", d.Name)
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	require.NoError(t, err)
	stream, err := io.ReadAll(zr)
	require.NoError(t, err)
	saveImage := func(stream []byte) string {
		var b bytes.Buffer
		b.WriteString("LibvirtQemudSave")
		data := append([]byte(xml), 0)
		// version, data_len, was_running, compressed (0 = raw), cookieOffset, unused[14]
		for _, v := range []uint32{2, uint32(len(data)), 1, 0, 0} {
			require.NoError(t, be.Write(&b, be.LittleEndian, v))
		}
		b.Write(make([]byte, 14*4))
		b.Write(data)
		b.Write(stream)
		p := filepath.Join(t.TempDir(), "restore.sav")
		require.NoError(t, os.WriteFile(p, b.Bytes(), 0o600))
		return p
	}

	// Wait until a fresh boot would read clearly more ticks than the dump
	// holds: the running domain's counter shows the time of day.
	require.True(t, eventually(30*time.Second, func() bool { return sdTicks(t, d.Name) >= before+110 }),
		"the tick counter of the running domain did not advance")
	virsh(t, "destroy", d.Name)
	out, err := exec.Command("virsh", "-c", uri, "restore", saveImage(stream[:len(stream)-40000])).CombinedOutput()
	require.Error(t, err, "a truncated stream must not restore: %s", out)
	t.Logf("truncated stream refused: %s", bytes.TrimSpace(out))
	assert.Equal(t, "shut off", d.state(t))

	virsh(t, "restore", saveImage(stream))
	after := sdTicks(t, d.Name)
	assert.Equal(t, "running (restored)", strings.TrimSpace(virsh(t, "domstate", "--reason", d.Name)))
	t.Logf("BIOS ticks: %d before the dump, %d right after the restore", before, after)
	assert.GreaterOrEqual(t, after, before, "the restored RAM is not older than the dump")
	assert.Less(t, after, before+70, "the restored RAM is the dump's, not a fresh boot's")
}
