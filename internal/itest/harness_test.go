// Package itest holds the integration tests: the real fi-backup binary
// against a real libvirtd with real QEMU domains and qcow2 files made by
// qemu-img. The domains have no OS (they spin in the firmware), which is
// enough for snapshots and block jobs; data is written into their disks
// through QEMU's own HMP qemu-io, like a guest would.
//
// Without libvirtd the tests skip, except when CI=true or
// FI_BACKUP_TEST_DISALLOW_SKIP=1 (make test sets it): then they fail.
package itest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/backupdir"
	"github.com/fi-backup/fi-backup/internal/testenv"
)

const uri = "qemu:///system"

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// requireLibvirt skips or fails (in CI) when libvirtd cannot be reached.
func requireLibvirt(t *testing.T) {
	t.Helper()
	if testing.Short() && !testenv.NoSkip() {
		t.Skip("integration test skipped in -short mode")
	}
	out, err := exec.Command("virsh", "-q", "-c", uri, "uri").CombinedOutput()
	if err == nil {
		return
	}
	testenv.SkipOrFail(t, fmt.Sprintf("libvirtd not reachable (%v: %s); run scripts/setup-host.sh", err, bytes.TrimSpace(out)))
}

// binary builds cmd/fi-backup once per test process.
func binary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "fi-backup-bin-")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "fi-backup")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/fi-backup/fi-backup/cmd/fi-backup").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	require.NoError(t, binErr)
	return binPath
}

type result struct {
	Stdout, Stderr string
	Code           int
}

// run executes fi-backup with args and returns its output and exit code.
func run(t *testing.T, args ...string) result {
	t.Helper()
	cmd := exec.Command(binary(t), args...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run() // in the test's environment: fi-backup must not depend on the locale
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	t.Logf("fi-backup %s → %d\n%s%s", strings.Join(args, " "), code, so.String(), se.String())
	assertErrMeansFailure(t, so.String(), code)
	return result{so.String(), se.String(), code}
}

// assertErrMeansFailure pins "[ERR] ⇔ non-zero exit" on every run of the
// binary: an [ERR] line never ends in exit 0, a failure always has one
// (the old tool's exceptions, getopt diagnostics and -h, do not occur in
// these tests).
func assertErrMeansFailure(t *testing.T, stdout string, code int) {
	t.Helper()
	hasErr := strings.Contains(stdout, "[ERR] ")
	assert.Equal(t, code != 0, hasErr, "[ERR] must be printed exactly when the exit code is non-zero (exit %d)", code)
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %s: %s", name, strings.Join(args, " "), out)
	return string(out)
}

func virsh(t *testing.T, args ...string) string {
	t.Helper()
	return sh(t, "virsh", append([]string{"-q", "-c", uri}, args...)...)
}

// Domain is a throwaway fibt-* domain.
type Domain struct {
	Name  string
	Dir   string   // where its disks live (the path contains a space)
	Disks []string // initial disk paths, vda, vdb, ...

	mu       sync.Mutex
	capacity map[int]int64 // virtual size of disk idx, once asked
}

type domOpts struct {
	disks   []string // file names inside Dir; default one "disk1.qcow2"
	raw     map[string]bool
	backing map[string]string // file name → backing file (absolute) for overlays
	noStart bool
	extra   string // extra <devices> XML
	size    string // virtual size of new images; default 64M
}

// newDomain creates qcow2 disks with qemu-img, defines the domain and starts
// it; everything is destroyed and removed when the test ends.
func newDomain(t *testing.T, name string, o domOpts) *Domain {
	t.Helper()
	requireLibvirt(t)
	name = "fibt-" + name
	dir := filepath.Join(t.TempDir(), "test disks")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	if len(o.disks) == 0 {
		o.disks = []string{"disk1.qcow2"}
	}
	d := &Domain{Name: name, Dir: dir}
	var xml strings.Builder
	for i, f := range o.disks {
		p := filepath.Join(dir, f)
		format := "qcow2"
		size := o.size
		if size == "" {
			size = "64M"
		}
		switch {
		case o.raw[f]:
			format = "raw"
			sh(t, "qemu-img", "create", "-q", "-f", "raw", p, size)
		case o.backing[f] != "":
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", o.backing[f], p)
		default:
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", p, size)
		}
		d.Disks = append(d.Disks, p)
		fmt.Fprintf(&xml, "<disk type='file' device='disk'><driver name='qemu' type='%s'/><source file='%s'/><target dev='vd%c' bus='virtio'/></disk>\n",
			format, xmlEscape(p), 'a'+i)
	}
	domXML := fmt.Sprintf(`<domain type='qemu'><name>%s</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><on_crash>destroy</on_crash>
<devices>%s%s</devices></domain>`, xmlEscape(name), xml.String(), o.extra)
	xf := filepath.Join(t.TempDir(), "dom.xml")
	require.NoError(t, os.WriteFile(xf, []byte(domXML), 0o644))
	_ = exec.Command("virsh", "-c", uri, "destroy", name).Run()
	_ = exec.Command("virsh", "-c", uri, "undefine", name).Run()
	virsh(t, "define", xf)
	t.Cleanup(func() {
		_ = exec.Command("virsh", "-c", uri, "destroy", name).Run()
		// With its checkpoint and snapshot metadata: a domain left defined
		// over deleted disks makes every later consolidation on the host
		// refuse (its chain cannot be read), so a leak fails here, loudly.
		if out, err := exec.Command("virsh", "-c", uri, "undefine", name, "--checkpoints-metadata", "--snapshots-metadata").CombinedOutput(); err != nil {
			if exec.Command("virsh", "-c", uri, "dominfo", name).Run() == nil {
				t.Errorf("domain %s still defined after the test: %s", name, out)
			}
		}
		_ = os.Remove("/var/lock/" + name + ".fi-backup.lock")
	})
	if !o.noStart {
		virsh(t, "start", name)
	}
	return d
}

func xmlEscape(s string) string {
	var b bytes.Buffer
	_ = xmlEscapeTo(&b, s)
	return b.String()
}

// state is the domain state as virsh prints it under LC_ALL=C.
func (d *Domain) state(t *testing.T) string {
	cmd := exec.Command("virsh", "-q", "-c", uri, "domstate", d.Name)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, string(out))
	return strings.TrimSpace(string(out))
}

// liveChain is the active image and backing chain of a disk target, as
// qemu-img sees it (-U: the image is in use).
func (d *Domain) liveChain(t *testing.T, target string) []string {
	t.Helper()
	src := d.source(t, target)
	return chainOf(t, src)
}

// source returns the current source file of a disk target.
func (d *Domain) source(t *testing.T, target string) string {
	t.Helper()
	out := virsh(t, "domblklist", d.Name, "--details")
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 4 && f[2] == target {
			// the source is everything after the third field
			idx := strings.Index(line, target)
			return strings.TrimSpace(line[idx+len(target):])
		}
	}
	t.Fatalf("disk %s not found in %s", target, out)
	return ""
}

// chainOf lists an image's backing chain (absolute paths) with qemu-img.
func chainOf(t *testing.T, image string) []string {
	t.Helper()
	out := sh(t, "qemu-img", "info", "-U", "--backing-chain", "--output=json", image)
	return parseChainJSON(t, out)
}

// write writes pattern bytes at off..off+n into the active layer of disk
// number idx through QEMU (HMP qemu-io), as a guest would.
func (d *Domain) write(t *testing.T, idx int, pattern byte, off, n string) {
	t.Helper()
	// qemu-io through HMP says nothing when a write goes past the end of
	// the disk: check the range here, so a test never believes it wrote.
	require.LessOrEqual(t, ioSize(t, off)+ioSize(t, n), d.capacityOf(t, idx), "write %s+%s past the end of disk %d", off, n, idx)
	cmd := fmt.Sprintf(`qemu-io -d /machine/peripheral/virtio-disk%d/virtio-backend "write -P 0x%02x %s %s"`, idx, pattern, off, n)
	out := virsh(t, "qemu-monitor-command", d.Name, "--hmp", cmd)
	require.NotContains(t, out, "rror", "qemu-io write failed: %s", out)
}

// capacityOf is the virtual size of disk idx as libvirt reports it.
func (d *Domain) capacityOf(t *testing.T, idx int) int64 {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	if size, ok := d.capacity[idx]; ok {
		return size
	}
	blk := virsh(t, "domblkinfo", d.Name, fmt.Sprintf("vd%c", 'a'+idx))
	var size int64
	for _, l := range strings.Split(blk, "\n") {
		if v, ok := strings.CutPrefix(l, "Capacity:"); ok {
			size, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	require.Positive(t, size, "capacity of disk %d: %s", idx, blk)
	if d.capacity == nil {
		d.capacity = map[int]int64{}
	}
	d.capacity[idx] = size
	return size
}

// ioSize parses a qemu-io size: a number with an optional k, M or G.
func ioSize(t *testing.T, s string) int64 {
	t.Helper()
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "k"), strings.HasSuffix(s, "K"):
		mult = 1 << 10
	case strings.HasSuffix(s, "M"):
		mult = 1 << 20
	case strings.HasSuffix(s, "G"):
		mult = 1 << 30
	}
	if mult > 1 {
		s = s[:len(s)-1]
	}
	v, err := strconv.ParseInt(s, 0, 64)
	require.NoError(t, err, "qemu-io size %q", s)
	return v * mult
}

// readsBack reports whether image (opened read-only, with its backing chain)
// has pattern at off..off+n.
func readsBack(t *testing.T, image string, pattern byte, off, n string) bool {
	t.Helper()
	cmd := exec.Command("qemu-io", "-r", "-U", "-c", fmt.Sprintf("read -P 0x%02x %s %s", pattern, off, n), image)
	out, err := cmd.CombinedOutput()
	return err == nil && !bytes.Contains(out, []byte("Pattern verification failed")) && !bytes.Contains(out, []byte("rror"))
}

// files lists the names in dir.
func files(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var out []string
	for _, e := range entries {
		if e.Name() == backupdir.MetaDir {
			continue // the restore points' records, not images
		}
		out = append(out, e.Name())
	}
	return out
}

// checkImages runs qemu-img check on every qcow2 file of a chain.
func checkImages(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		out, err := exec.Command("qemu-img", "check", "-U", p).CombinedOutput()
		if err != nil && !bytes.Contains(out, []byte("does not support checks")) {
			t.Errorf("qemu-img check %s: %v\n%s", p, err, out)
		}
	}
}

// nextSecond waits until the wall clock enters a new second, so two runs
// never share a snapshot name.
func nextSecond() {
	now := time.Now()
	time.Sleep(now.Truncate(time.Second).Add(time.Second + 10*time.Millisecond).Sub(now))
}

// restorePoint writes pattern at off (1 MiB) into d's first disk, backs d
// up into bk, and returns a check that this restore point — the copy of the
// layer that held the write — still opens from bk alone and reads back
// exactly. Fault tests call it afterwards: older restore points survive.
func restorePoint(t *testing.T, d *Domain, bk string, pattern byte, off string) func() {
	t.Helper()
	d.write(t, 0, pattern, off, "1M")
	nextSecond()
	r := run(t, "-b", bk, d.Name)
	require.Equal(t, 0, r.Code)
	rp := filepath.Join(bk, filepath.Base(d.liveChain(t, "vda")[1]))
	return func() {
		t.Helper()
		assertSelfContained(t, rp)
		assert.True(t, readsBack(t, rp, pattern, off, "1M"), "restore point %s no longer reads back", rp)
	}
}

// backupDir makes an empty backup directory whose path contains a space
// (name defaults to "backup dir").
func backupDir(t *testing.T, name ...string) string {
	t.Helper()
	n := "backup dir"
	if len(name) > 0 {
		n = name[0]
	}
	bk := filepath.Join(t.TempDir(), n)
	require.NoError(t, os.Mkdir(bk, 0o755))
	return bk
}

// syncBuffer is a bytes.Buffer that may be read while a process writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitForTemp waits until a temporary copy appears in dir: the run writing
// it holds the domain's lock and has taken its snapshot.
func waitForTemp(t *testing.T, dir string, out fmt.Stringer) string {
	t.Helper()
	var temp string
	require.True(t, eventually(60*time.Second, func() bool {
		for _, f := range files(t, dir) {
			if strings.Contains(f, ".fi-backup-tmp-") {
				temp = f
				return true
			}
		}
		return false
	}), "no temporary copy appeared in %s:\n%s", dir, out)
	return temp
}
