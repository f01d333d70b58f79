package itest

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// agentGuestDir caches the guest built by scripts/mk-agent-guest.sh, so
// reruns do not rebuild it.
const agentGuestDir = "/var/tmp/fi-backup-agent-guest"

// agentDomain is a tiny real Linux guest with qemu-guest-agent (see
// testdata/agent-guest/domain.xml.tmpl) and a writer loop on its ext4 vda.
type agentDomain struct {
	Name, Dir, Disk, Console string
}

// agentGuest builds (or finds cached) the guest kernel and initramfs.
func agentGuest(t *testing.T) (kernel, initrd string) {
	t.Helper()
	cmd := exec.Command("bash", "../../scripts/mk-agent-guest.sh", agentGuestDir)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "mk-agent-guest.sh: %s", out)
	return filepath.Join(agentGuestDir, "vmlinuz"), filepath.Join(agentGuestDir, "initrd.gz")
}

// newAgentDomain defines and starts a guest whose vda is a fresh ext4
// file system in a qcow2 file; it is destroyed and undefined at the end.
func newAgentDomain(t *testing.T, tag, kernel, initrd string) *agentDomain {
	t.Helper()
	return newAgentDomainPrefixed(t, "fibt-agent-", tag, kernel, initrd)
}

// newAgentDomainPrefixed is newAgentDomain with the name's prefix chosen
// by the caller (tests of one feature share a prefix).
func newAgentDomainPrefixed(t *testing.T, prefix, tag, kernel, initrd string) *agentDomain {
	t.Helper()
	requireLibvirt(t)
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	a := &agentDomain{
		Name: prefix + tag + "-" + hex.EncodeToString(rnd[:]),
		Dir:  filepath.Join(t.TempDir(), "agent disks"),
	}
	require.NoError(t, os.MkdirAll(a.Dir, 0o755))
	raw := filepath.Join(a.Dir, "fs.raw")
	a.Disk = filepath.Join(a.Dir, "guest disk.qcow2")
	a.Console = filepath.Join(a.Dir, "console.log")
	sh(t, "truncate", "-s", "64M", raw)
	sh(t, "mkfs.ext4", "-q", "-F", raw)
	sh(t, "qemu-img", "convert", "-O", "qcow2", raw, a.Disk)
	require.NoError(t, os.Remove(raw))

	tmpl, err := os.ReadFile("../../testdata/agent-guest/domain.xml.tmpl")
	require.NoError(t, err)
	xml := strings.NewReplacer(
		"@NAME@", xmlEscape(a.Name), "@KERNEL@", xmlEscape(kernel), "@INITRD@", xmlEscape(initrd),
		"@DISK@", xmlEscape(a.Disk), "@CONSOLE@", xmlEscape(a.Console),
	).Replace(string(tmpl))
	xf := filepath.Join(t.TempDir(), "agent.xml")
	require.NoError(t, os.WriteFile(xf, []byte(xml), 0o644))
	virsh(t, "define", xf)
	t.Cleanup(func() {
		_ = exec.Command("virsh", "-c", uri, "destroy", a.Name).Run()
		// With --cbt's checkpoints, if any.
		_ = exec.Command("virsh", "-c", uri, "undefine", a.Name, "--checkpoints-metadata").Run()
		_ = os.Remove("/var/lock/" + a.Name + ".fi-backup.lock")
	})
	virsh(t, "start", a.Name)
	return a
}

// agentCmd runs a guest agent command and returns its JSON answer.
func (a *agentDomain) agentCmd(cmd string) (string, error) {
	out, err := exec.Command("virsh", "-q", "-c", uri, "qemu-agent-command", a.Name, cmd).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// exec runs a shell command in the guest through the agent (guest-exec)
// and returns its exit code and output.
func (a *agentDomain) exec(t *testing.T, script string) (int, string) {
	t.Helper()
	req, err := json.Marshal(map[string]any{"execute": "guest-exec", "arguments": map[string]any{
		"path": "/bin/sh", "arg": []string{"-c", script}, "capture-output": true}})
	require.NoError(t, err)
	out, err := a.agentCmd(string(req))
	require.NoError(t, err, out)
	var started struct {
		Return struct{ PID int } `json:"return"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &started), out)
	var st struct {
		Return struct {
			Exited   bool   `json:"exited"`
			ExitCode int    `json:"exitcode"`
			OutData  []byte `json:"out-data"`
			ErrData  []byte `json:"err-data"`
		} `json:"return"`
	}
	require.True(t, eventually(60*time.Second, func() bool {
		out, err := a.agentCmd(fmt.Sprintf(`{"execute":"guest-exec-status","arguments":{"pid":%d}}`, started.Return.PID))
		return err == nil && json.Unmarshal([]byte(out), &st) == nil && st.Return.Exited
	}), "guest command %q did not finish", script)
	return st.Return.ExitCode, string(st.Return.OutData) + string(st.Return.ErrData)
}

// writerRounds is how many files the guest's writer has rewritten so far
// (it appends 4 KiB to append.log per round; the log restarts every 256).
func (a *agentDomain) writerRounds(t *testing.T) int {
	t.Helper()
	code, out := a.exec(t, "wc -c </mnt/vda/append.log")
	require.Equal(t, 0, code, out)
	n, err := strconv.Atoi(strings.TrimSpace(out))
	require.NoError(t, err, out)
	return n / 4096
}

// waitWriting waits until the guest's writer has been through a few rounds.
func (a *agentDomain) waitWriting(t *testing.T) {
	t.Helper()
	require.True(t, eventually(60*time.Second, func() bool { return a.writerRounds(t) >= 3 }), "the guest's writer does not write")
}

// waitReady waits until the agent answers guest-ping and the console says
// the writer runs on /mnt/vda.
func (a *agentDomain) waitReady(t *testing.T, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		_, err := a.agentCmd(`{"execute":"guest-ping"}`)
		console, _ := os.ReadFile(a.Console)
		if err == nil && strings.Contains(string(console), "writer started on /mnt/vda") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest %s not ready after %s (agent: %v); console:\n%s", a.Name, limit, err, console)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// superblock converts a backup copy to raw and returns dumpe2fs -h of it.
func superblock(t *testing.T, image string) string {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "check.raw")
	sh(t, "qemu-img", "convert", "-U", "-O", "raw", image, raw)
	cmd := exec.Command("dumpe2fs", "-h", raw)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "dumpe2fs -h %s: %s", image, out)
	return string(out)
}

// fsck runs e2fsck -fn on a raw conversion of image; it returns the exit
// code and output.
func fsck(t *testing.T, image string) (int, string) {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "fsck.raw")
	sh(t, "qemu-img", "convert", "-U", "-O", "raw", image, raw)
	cmd := exec.Command("e2fsck", "-fn", raw)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out)
	}
	require.NoError(t, err)
	return 0, string(out)
}

var (
	fsStateRE    = regexp.MustCompile(`(?m)^Filesystem state:\s+(.*)$`)
	fsFeaturesRE = regexp.MustCompile(`(?m)^Filesystem features:\s+(.*)$`)
)

// TestQuiesceRealAgent: -q against a real guest agent while the guest keeps
// writing. The base left behind by the quiesced snapshot, as copied into
// the backup directory, is a clean ext4 (frozen, journal flushed); the same
// backup without -q catches the file system mid-transaction, which shows
// that the check can fail.
func TestQuiesceRealAgent(t *testing.T) {
	requireLibvirt(t)
	start := time.Now()
	kernel, initrd := agentGuest(t)
	// Both guests boot at once (TCG, ~5 s each).
	q := newAgentDomain(t, "q", kernel, initrd)
	ctl := newAgentDomain(t, "ctl", kernel, initrd)
	q.waitReady(t, 60*time.Second)
	ctl.waitReady(t, 60*time.Second)
	t.Logf("guests ready after %s", time.Since(start).Round(time.Millisecond))
	q.waitWriting(t)
	ctl.waitWriting(t)

	// -q together with -C (the old tool refused it): a quiesced snapshot,
	// the copy, then the consolidation back onto the base.
	bk := backupDir(t, "quiesced backup")
	r := run(t, "-q", "-C", "-v", "-b", bk, q.Name)
	require.Equal(t, 0, r.Code)
	assert.Regexp(t, `\[VER\] /usr/bin/virsh -q snapshot-create-as `+regexp.QuoteMeta(q.Name)+` \S+ --no-metadata --disk-only --atomic --quiesce\n`, r.Stdout)
	assert.Contains(t, r.Stdout, "[VER] Snapshot for block devices of '"+q.Name+"' successful\n")
	assert.Regexp(t, `\[VER\] Consolidation of block device '.*' for '`+regexp.QuoteMeta(q.Name)+`' successful\n`, r.Stdout)
	assert.Equal(t, []string{q.Disk}, (&Domain{Name: q.Name}).liveChain(t, "vda"), "consolidated back onto the base")
	rounds := q.writerRounds(t)
	require.True(t, eventually(60*time.Second, func() bool { return q.writerRounds(t) != rounds }), "the guest writes on after -q -C")
	copyPath := filepath.Join(bk, "guest disk.qcow2")
	sb := superblock(t, copyPath)
	state, features := fsStateRE.FindStringSubmatch(sb), fsFeaturesRE.FindStringSubmatch(sb)
	require.NotNil(t, state, sb)
	require.NotNil(t, features, sb)
	assert.Equal(t, "clean", strings.TrimSpace(state[1]), "quiesced copy:\n%s", sb)
	assert.NotContains(t, features[1], "needs_recovery", "the quiesced copy has an unflushed journal")
	code, out := fsck(t, copyPath)
	assert.Equal(t, 0, code, "e2fsck -fn of the quiesced copy:\n%s", out)
	// The guest was thawed and still runs.
	st, err := q.agentCmd(`{"execute":"guest-fsfreeze-status"}`)
	require.NoError(t, err, st)
	assert.Contains(t, st, `"thawed"`)
	assert.Equal(t, "running", (&Domain{Name: q.Name}).state(t))

	// Control: the same backup without -q while the writer runs.
	bk2 := backupDir(t, "unquiesced backup")
	r = run(t, "-v", "-b", bk2, ctl.Name)
	require.Equal(t, 0, r.Code)
	assert.NotContains(t, r.Stdout, "--quiesce")
	sb = superblock(t, filepath.Join(bk2, "guest disk.qcow2"))
	features = fsFeaturesRE.FindStringSubmatch(sb)
	require.NotNil(t, features, sb)
	// A journaled ext4 mounted rw carries needs_recovery on disk until it is
	// frozen or unmounted, so without the freeze the flag is always there
	// (seen 10 times out of 10).
	assert.Contains(t, features[1], "needs_recovery", "control: the unquiesced copy should show the live journal")
	code, out = fsck(t, filepath.Join(bk2, "guest disk.qcow2"))
	t.Logf("control: e2fsck -fn of the unquiesced copy → %d", code)
	t.Logf("TestQuiesceRealAgent took %s", time.Since(start).Round(time.Millisecond))
}
