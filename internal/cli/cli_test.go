package cli

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/lock"
	"github.com/fi-backup/fi-backup/internal/virt"
	"github.com/fi-backup/fi-backup/internal/virt/virttest"
)

type harness struct {
	fake      *virttest.Fake
	env       map[string]string
	lockDir   string
	connErr   error
	mu        sync.Mutex
	snapshots []string
}

func newHarness(t *testing.T, states map[string]virt.State) *harness {
	h := &harness{fake: virttest.New(states), env: map[string]string{}, lockDir: t.TempDir()}
	h.env["FI_BACKUP_QEMU_IMG"] = fakeQemuImg(t, "7.2.22")
	h.fake.Snapshot = func(name string, spec virt.SnapshotSpec) error {
		h.mu.Lock()
		h.snapshots = append(h.snapshots, name+"@"+spec.Name)
		h.mu.Unlock()
		return nil
	}
	return h
}

// fakeQemuImg writes a stand-in qemu-img that only reports a version.
func fakeQemuImg(t *testing.T, version string) string {
	p := filepath.Join(t.TempDir(), "qemu-img")
	require.NoError(t, os.WriteFile(p, []byte("#!/bin/sh\necho 'qemu-img version "+version+" (fake)'\n"), 0o755))
	return p
}

func (h *harness) run(t *testing.T, args ...string) (stdout, stderr string, code int) {
	var so, se bytes.Buffer
	code = Run(context.Background(), Env{
		Prog: "./fi-backup", Stdout: &so, Stderr: &se,
		Getenv: func(k string) string { return h.env[k] },
		Connect: func(string) (virt.Hypervisor, error) {
			if h.connErr != nil {
				return nil, h.connErr
			}
			return h.fake, nil
		},
		Now:     func() time.Time { return time.Date(2024, 1, 2, 3, 4, 5, 0, time.Local) },
		LockDir: h.lockDir,
	}, args)
	assert.Zero(t, h.fake.OpenDomains(), "every looked-up domain is closed")
	assertErrMeansFailure(t, so.String(), se.String(), code)
	return so.String(), se.String(), code
}

// assertErrMeansFailure pins "[ERR] ⇔ non-zero exit" for every run: an
// [ERR] line is never followed by exit 0, and a failure always says why on
// stdout ([ERR]) — except the old tool's own exceptions: getopt's
// diagnostics on stderr, and -h (usage, exit 1).
func assertErrMeansFailure(t *testing.T, stdout, stderr string, code int) {
	t.Helper()
	hasErr := strings.Contains(stdout, "[ERR] ")
	if hasErr {
		assert.NotZero(t, code, "an [ERR] line was printed but the exit code is 0:\n%s", stdout)
	}
	isHelp := strings.HasPrefix(stdout, "   fi-backup version ")
	if code != 0 && stderr == "" && !isHelp {
		assert.True(t, hasErr, "exit %d without an [ERR] line:\n%s", code, stdout)
	}
}

// wantUsage is the usage text, exactly.
var wantUsage = `   fi-backup version ` + Version + ` - Go reimplementation of fi-backup.sh by Davide Guerri <davide.guerri@gmail.com>

   Usage:

   ./fi-backup [-c|-C] [-q|-s <directory>] [-h] [-d] [-v] [-V] [-b <directory>] [-m <method>] <domain name>|all|-r

   Options:
      -b <directory>    Copy previous snapshot/base image to the specified <directory>
      -c                Consolidation only
      -C                Snapshot and consolidation
      -m <method>       Consolidation method: blockcommit or blockpull
      -q                Use quiescence (qemu agent must be installed in the domain)
      -r                Backup all running domains
      -s <directory>    Dump domain status in the specified directory
      -d                Debug
      -h                Print usage and exit
      -v                Verbose
      -V                Print version and exit

   Long options (any unambiguous prefix works):
      --backup_dir --consolidate_only --consolidate_and_snapshot --method --quiesce
      --all_running --dump_state_dir --debug --help --verbose --version
      --job_timeout <duration>   Consolidation and --cbt backup job timeout (default 30m)
      --rate_limit <rate>        Copy and consolidate at most <rate> bytes/s (K, M, G suffixes)
      --keep <n>                 Keep only the <n> newest restore points of each domain in -b
      --report <file>            Write a JSON report of the run to <file> at its end
      --textfile_dir <directory> Write Prometheus metrics fi-backup-<domain>.prom into <directory>
      --parallel <n>             Back up to <n> domains at once (default 1)
      --list                     List the restore points in the backup directory (-b)
      --verify                   Verify the restore points in the backup directory (-b)
      --restore <moment>         Restore the point YYYYMMDD-HHMMSS (or latest) of one domain
      --target_dir <directory>   Where --restore writes the restored domain
      --format <format>          --list output: text (default) or json
      --cbt                      Back up running domains through changed-block tracking (needs -b)

   Version Requirements:
      qemu_img >= 1.2.0
      qemu     >= 1.2.0
      libvirt  >= 0.9.13

`

func usageWith(msg string) string {
	return "\n[ERR] " + msg + "\n\n" + wantUsage
}

// TestExitCodeTable covers every row of the old tool's exit-code table
// (behaviour spec §1.5) and every validation message of §1.3.
func TestExitCodeTable(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name       string
		args       []string
		code       int
		stdout     string // exact, when set
		contains   []string
		stderr     string
		noSnapshot bool
	}{
		{name: "help", args: []string{"-h"}, code: 1, stdout: wantUsage},
		{name: "help long abbreviated", args: []string{"--h"}, code: 1, contains: []string{"   Usage:"}},
		{name: "version", args: []string{"-V"}, code: 0, stdout: "fi-backup version " + Version + "\n"},
		{name: "version before bad dir", args: []string{"-V", "-b", "/nonexistent"}, code: 0, stdout: "fi-backup version " + Version + "\n"},
		{name: "bad dir before version", args: []string{"-b", "/nonexistent", "-V"}, code: 1, stdout: "[ERR] Backup directory '/nonexistent' doesn't exist!\n"},
		{name: "empty backup dir", args: []string{"-b", "", "dom"}, code: 1, stdout: "[ERR] Backup directory '' doesn't exist!\n"},
		{name: "missing dump dir", args: []string{"-s", "/nonexistent", "dom"}, code: 1, stdout: "[ERR] Dump state directory '/nonexistent' doesn't exist!\n"},
		{name: "bad method", args: []string{"-m", "blockcopy", "dom"}, code: 1, stdout: usageWith("-m requires specifying 'blockcommit' or 'blockpull'")},
		{name: "method is case-sensitive", args: []string{"--method=BlockCommit", "dom"}, code: 1, stdout: usageWith("-m requires specifying 'blockcommit' or 'blockpull'")},
		{name: "c twice", args: []string{"-c", "-C", "dom"}, code: 1, stdout: usageWith("-c or -C already specified!")},
		{name: "cc bundled", args: []string{"-cc", "dom"}, code: 1, stdout: usageWith("-c or -C already specified!")},
		{name: "consolidate and quiesce", args: []string{"-c", "-q", "dom"}, code: 1, stdout: usageWith("consolidation (-c | -C) and quiesce (-q) are not compatible")},
		{name: "consolidate and dump", args: []string{"-C", "-s", dir, "dom"}, code: 1, stdout: usageWith("consolidation (-c | -C) and dump state (-s) are not compatible")},
		{name: "quiesce checked before dump", args: []string{"-c", "-s", dir, "-q", "dom"}, code: 1, stdout: usageWith("consolidation (-c | -C) and quiesce (-q) are not compatible")},
		{name: "quiesce allowed with -C", args: []string{"-C", "-q", "dom"}, code: 0, stdout: "[INF] libVirt version '9.0.0' support is experimental\n"},
		{name: "dump still refused with -C and -q", args: []string{"-C", "-s", dir, "-q", "dom"}, code: 1, stdout: usageWith("consolidation (-c | -C) and dump state (-s) are not compatible")},
		{name: "dump and quiesce", args: []string{"-s", dir, "-q", "dom"}, code: 1, stdout: usageWith("dump state (-s) and quiesce (-q) are not compatible")},
		{name: "no domain", args: []string{}, code: 2, contains: []string{"[ERR] <domain name> is missing!"}},
		{name: "no domain after options", args: []string{"-d", "-b", dir}, code: 2, contains: []string{"[ERR] <domain name> is missing!"}},
		{name: "all_running plus domain", args: []string{"-r", "dom"}, code: 2, contains: []string{"[ERR] Setting all_running (-r) and specifying domains not compatible"}},
		{name: "all_running debug line", args: []string{"-d", "-r"}, code: 0, contains: []string{"[DEB] all_running_domains = '1' so all running domains will be backed up\n"}},
		{name: "getopt invalid option", args: []string{"-x", "dom"}, code: 1, stdout: "-", stderr: "fi-backup: invalid option -- 'x'\nFailed parsing options.\n"},
		{name: "getopt ambiguous", args: []string{"--cons", "dom"}, code: 1, stdout: "-", stderr: "fi-backup: option '--cons' is ambiguous; possibilities: '--consolidate_only' '--consolidate_and_snapshot'\nFailed parsing options.\n"},
		{name: "getopt missing argument", args: []string{"dom", "-b"}, code: 1, stdout: "-", stderr: "fi-backup: option requires an argument -- 'b'\nFailed parsing options.\n"},
		{name: "getopt reports all errors", args: []string{"-x", "--foo"}, code: 1, stdout: "-", stderr: "fi-backup: invalid option -- 'x'\nfi-backup: unrecognized option '--foo'\nFailed parsing options.\n"},
		{name: "experimental line always shown", args: []string{"dom"}, code: 0, stdout: "[INF] libVirt version '9.0.0' support is experimental\n"},
		{name: "list needs -b", args: []string{"--list"}, code: 1, stdout: usageWith("--list requires -b <directory>")},
		{name: "list and -s", args: []string{"--list", "-b", dir, "-s", dir}, code: 1, stdout: usageWith("--list and dump state (-s) are not compatible")},
		{name: "verify and -c", args: []string{"--verify", "-b", dir, "-c"}, code: 1, stdout: usageWith("--verify and consolidation (-c | -C) are not compatible")},
		{name: "restore and -r", args: []string{"--restore=latest", "--target_dir", dir, "-b", dir, "-r"}, code: 1, stdout: usageWith("--restore and all_running (-r) are not compatible")},
		{name: "restore and -q", args: []string{"--restore=latest", "--target_dir", dir, "-b", dir, "-q", "dom"}, code: 1, stdout: usageWith("--restore and quiesce (-q) are not compatible")},
		{name: "restore needs a target", args: []string{"--restore=latest", "-b", dir, "dom"}, code: 1, stdout: usageWith("--restore requires --target_dir <directory>")},
		{name: "restore moment", args: []string{"--restore=yesterday", "--target_dir", dir, "-b", dir, "dom"}, code: 1, stdout: usageWith("--restore requires a moment YYYYMMDD-HHMMSS or 'latest'")},
		{name: "restore no domain", args: []string{"--restore=latest", "--target_dir", dir, "-b", dir}, code: 2, contains: []string{"[ERR] <domain name> is missing!"}},
		{name: "restore two domains", args: []string{"--restore=latest", "--target_dir", dir, "-b", dir, "a b"}, code: 1, contains: []string{"[ERR] --restore takes exactly one domain"}},
		{name: "two commands", args: []string{"--list", "--verify", "-b", dir}, code: 1, stdout: usageWith("--list, --verify and --restore are not compatible with each other")},
		{name: "format without list", args: []string{"--format=json", "dom"}, code: 1, stdout: usageWith("--format only works with --list")},
		{name: "format value", args: []string{"--list", "--format=xml", "-b", dir}, code: 1, stdout: usageWith("--format requires 'text' or 'json'")},
		{name: "target_dir without restore", args: []string{"--target_dir", dir, "dom"}, code: 1, stdout: usageWith("--target_dir only works with --restore")},
		{name: "keep zero", args: []string{"--keep=0", "-b", dir, "dom"}, code: 1, stdout: usageWith("--keep requires a number of restore points, at least 1")},
		{name: "keep negative", args: []string{"--keep", "-1", "-b", dir, "dom"}, code: 1, stdout: usageWith("--keep requires a number of restore points, at least 1")},
		{name: "keep not a number", args: []string{"--keep=abc", "-b", dir, "dom"}, code: 1, stdout: usageWith("--keep requires a number of restore points, at least 1")},
		{name: "keep without -b", args: []string{"--keep=3", "dom"}, code: 1, stdout: usageWith("--keep requires -b <directory>")},
		{name: "keep with -c", args: []string{"--keep=3", "-c", "-b", dir, "dom"}, code: 1, stdout: usageWith("--keep and consolidation only (-c) are not compatible")},
		{name: "keep with list", args: []string{"--keep=3", "--list", "-b", dir}, code: 1, stdout: usageWith("--list and --keep are not compatible")},
		{name: "cbt needs -b", args: []string{"--cbt", "dom"}, code: 1, stdout: usageWith("--cbt requires -b <directory>")},
		{name: "cbt and -c", args: []string{"--cbt", "-c", "-b", dir, "dom"}, code: 1, stdout: usageWith("--cbt and consolidation (-c | -C) are not compatible: --cbt adds no overlay, there is nothing to consolidate")},
		{name: "cbt and -C", args: []string{"-C", "-b", dir, "dom", "--cbt"}, code: 1, stdout: usageWith("--cbt and consolidation (-c | -C) are not compatible: --cbt adds no overlay, there is nothing to consolidate")},
		{name: "cbt and -s", args: []string{"--cbt", "-s", dir, "-b", dir, "dom"}, code: 1, stdout: usageWith("--cbt and dump state (-s) are not compatible")},
		{name: "cbt and -m", args: []string{"--cbt", "-m", "blockpull", "-b", dir, "dom"}, code: 1, stdout: usageWith("--cbt and -m are not compatible: --cbt never consolidates")},
		{name: "cbt with list", args: []string{"--list", "--cbt", "-b", dir}, code: 1, stdout: usageWith("--list and --cbt are not compatible")},
		{name: "cbt abbreviated, with -q", args: []string{"--cb", "-q", "-b", dir, "fibt-none"}, code: 1, contains: []string{"[ERR] Cannot find domain 'fibt-none'"}},
		{name: "getopt ambiguous --c", args: []string{"--c", "dom"}, code: 1, stdout: "-", stderr: "fi-backup: option '--c' is ambiguous; possibilities: '--consolidate_only' '--consolidate_and_snapshot' '--cbt'\nFailed parsing options.\n"},
		{name: "list of an empty directory", args: []string{"--list", "-b", dir}, code: 0, stdout: "[INF] libVirt version '9.0.0' support is experimental\nDOMAIN  MOMENT  METHOD  DISKS  OWN  FLAGS  MANIFEST  FILES\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, map[string]virt.State{"dom": virt.StateRunning})
			so, se, code := h.run(t, tc.args...)
			assert.Equal(t, tc.code, code, "exit code")
			switch tc.stdout {
			case "":
			case "-":
				assert.Empty(t, so)
			default:
				assert.Equal(t, tc.stdout, so)
			}
			for _, c := range tc.contains {
				assert.Contains(t, so, c)
			}
			assert.Equal(t, tc.stderr, se, "stderr")
		})
	}
}

func TestDependencyChecks(t *testing.T) {
	t.Run("qemu-img missing", func(t *testing.T) {
		h := newHarness(t, nil)
		h.env["FI_BACKUP_QEMU_IMG"] = "/nonexistent/qemu-img"
		so, _, code := h.run(t, "dom")
		assert.Equal(t, ExitDependency, code)
		assert.Contains(t, so, "[ERR] '/nonexistent/qemu-img' cannot be found or executed\n")
	})
	t.Run("old qemu-img", func(t *testing.T) {
		h := newHarness(t, nil)
		h.env["FI_BACKUP_QEMU_IMG"] = fakeQemuImg(t, "1.1.9")
		so, _, code := h.run(t, "dom")
		assert.Equal(t, ExitDependency, code)
		assert.Contains(t, so, "[ERR] Unsupported "+h.env["FI_BACKUP_QEMU_IMG"]+" version '1.1.9'. Please use 'qemu-img' 1.2.0 or later\n")
	})
	t.Run("old libvirt and qemu, errors accumulate", func(t *testing.T) {
		h := newHarness(t, nil)
		h.fake.Lib, h.fake.QEMU = "0.9.12", "1.1.0"
		so, _, code := h.run(t) // exit 3 wins over the missing domain (exit 2)
		assert.Equal(t, ExitDependency, code)
		assert.Contains(t, so, "[ERR] Unsupported libVirt version '0.9.12'. Please use libVirt 0.9.13 or later\n")
		assert.Contains(t, so, "[ERR] Unsupported QEMU/KVM version '1.1.0'. Please use QEMU/KVM 1.2.0 or later\n")
	})
	t.Run("debug lines", func(t *testing.T) {
		h := newHarness(t, map[string]virt.State{"dom": virt.StateRunning})
		h.fake.Lib = "0.9.13"
		so, _, code := h.run(t, "-d", "dom")
		assert.Equal(t, 0, code)
		q := h.env["FI_BACKUP_QEMU_IMG"]
		assert.Contains(t, so, "[DEB] libVirt version '0.9.13' is supported\n"+
			"[DEB] "+q+" version '7.2.22' is supported\n"+
			"[DEB] "+q+" version '7.2.22' will use --force-share for file access\n"+
			"[DEB] QEMU/KVM version '7.2.22' is supported\n")
	})
	t.Run("libvirtd unreachable", func(t *testing.T) {
		h := newHarness(t, nil)
		h.connErr = &virt.Error{Msg: "Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory"}
		so, _, code := h.run(t, "dom")
		assert.Equal(t, ExitDependency, code)
		assert.Contains(t, so, "[ERR] Cannot connect to libvirt: Failed to connect socket")
	})
}

func TestDefaultMethod(t *testing.T) {
	for _, tc := range []struct{ qemu, lib, want string }{
		{"7.2.22", "9.0.0", "blockcommit"},
		{"2.1.0", "1.2.9", "blockcommit"},
		{"2.0.9", "9.0.0", "blockpull"},
		{"7.2.22", "1.2.8", "blockpull"},
	} {
		h := newHarness(t, map[string]virt.State{"dom": virt.StateRunning})
		h.fake.QEMU, h.fake.Lib = tc.qemu, tc.lib
		so, _, code := h.run(t, "-dc", "dom")
		assert.Equal(t, 0, code)
		assert.Contains(t, so, "[DEB] Consolidation method: "+tc.want+"\n", "qemu %s libvirt %s", tc.qemu, tc.lib)
	}
	h := newHarness(t, map[string]virt.State{"dom": virt.StateRunning})
	so, _, _ := h.run(t, "-dc", "-m", "blockpull", "dom")
	assert.Contains(t, so, "[DEB] Consolidation method: blockpull\n", "-m overrides the default")
}

// TestB14LongConsolidateAndSnapshot: the documented long form works (the
// old script took it for a domain name).
func TestB14LongConsolidateAndSnapshot(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"dom": virt.StateRunning})
	so, _, code := h.run(t, "--consolidate_and_snapshot", "-d", "dom")
	assert.Equal(t, 0, code)
	assert.Equal(t, []string{"dom@bimg-20240102-030405"}, h.snapshots)
	assert.Contains(t, so, "[DEB] Consolidation of block devices for 'dom' requested")
	assert.Contains(t, so, "[DEB] Domains RUNNING to backup:  dom\n", "-d after the option is honoured")
}

// TestB15B16DomainArguments: every positional argument names domains, one
// argument may hold several names, nothing is globbed, duplicates run once.
func TestB15B16DomainArguments(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"a": virt.StateRunning, "b": virt.StateRunning, "c": virt.StateRunning})
	_, _, code := h.run(t, "a b", "c", "a")
	assert.Equal(t, 0, code)
	assert.Equal(t, []string{"a@bimg-20240102-030405", "b@bimg-20240102-030405", "c@bimg-20240102-030405"}, h.snapshots)

	t.Chdir(t.TempDir())
	require.NoError(t, os.WriteFile("a-glob-match", nil, 0o644))
	h = newHarness(t, map[string]virt.State{"a": virt.StateRunning})
	so, _, code := h.run(t, "a*")
	assert.Equal(t, 1, code)
	assert.Contains(t, so, "[ERR] Cannot find domain 'a*': Domain not found: no domain with matching name 'a*'\n")
	assert.Empty(t, h.snapshots)
}

// TestB1ExitAggregated: a failed domain is not hidden by a later good one,
// and the good one still runs.
func TestB1ExitAggregated(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"good": virt.StateRunning})
	so, _, code := h.run(t, "missing", "good")
	assert.Equal(t, 1, code)
	assert.Contains(t, so, "[ERR] Cannot find domain 'missing'")
	assert.Equal(t, []string{"good@bimg-20240102-030405"}, h.snapshots)
}

// TestB2OfflineExitFromCopies: an offline domain that copied fine exits 0
// without -d (the old script exited 1 without -d and 0 with it).
func TestB2OfflineExitFromCopies(t *testing.T) {
	for _, args := range [][]string{{"-b", t.TempDir(), "off"}, {"-d", "-b", t.TempDir(), "off"}} {
		h := newHarness(t, map[string]virt.State{"off": virt.StateShutoff})
		_, _, code := h.run(t, args...)
		assert.Equal(t, 0, code, "%v", args)
	}
	h := newHarness(t, map[string]virt.State{"off": virt.StateShutoff})
	so, _, code := h.run(t, "-d", "off")
	assert.Equal(t, 1, code)
	assert.Contains(t, so, "[ERR] -b flag (directory) required for backing up the shut-off domain 'off'\n[ERR] Skipping backup of 'off'\n")
}

func TestStatesAndAll(t *testing.T) {
	states := map[string]virt.State{"run": virt.StateRunning, "off": virt.StateShutoff, "pause": virt.StatePaused, "sus": virt.StatePMSuspended}
	h := newHarness(t, states)
	so, _, code := h.run(t, "-d", "-b", t.TempDir(), "all")
	assert.Equal(t, 0, code, "skipping a suspended domain under all is a warning")
	assert.Contains(t, so, "[WAR] Skipping domain 'sus': it is neither running, paused nor shut off\n")
	assert.Contains(t, so, "[DEB] Domains NOTRUNNING to backup: off\npause\n[DEB] Domains RUNNING to backup: run\n", "virsh list's one name per line")

	h = newHarness(t, states)
	so, _, code = h.run(t, "-b", t.TempDir(), "sus")
	assert.Equal(t, 1, code, "a named domain that cannot be backed up fails")
	assert.Contains(t, so, "[ERR] Domain 'sus' is pmsuspended: skipping it\n")

	h = newHarness(t, states)
	so, _, code = h.run(t, "-d", "-r")
	assert.Equal(t, 0, code)
	assert.Contains(t, so, "[DEB] Domains NOTRUNNING to backup: \n[DEB] Domains RUNNING to backup: run\n")
}

// TestOfflineWithConsolidation: a shut-off domain is consolidated offline
// (nothing to merge on the fake: exit 0, no refusal); a paused one keeps
// the old refusal, with exit 1 even under all, where the copy still runs.
func TestOfflineWithConsolidation(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"off": virt.StateShutoff})
	so, _, code := h.run(t, "-d", "-c", "off")
	assert.Equal(t, 0, code, "-c on a shut-off domain needs no -b")
	assert.NotContains(t, so, "Consolidation only works with running domains")
	assert.Contains(t, so, "[DEB] Consolidation method: blockcommit (offline, with qemu-img: 'off' is shut off)\n")

	h = newHarness(t, map[string]virt.State{"p": virt.StatePaused})
	so, _, code = h.run(t, "-c", "-b", t.TempDir(), "p")
	assert.Equal(t, 1, code)
	assert.Contains(t, so, "[ERR] Consolidation only works with running domains. 'p' is not running! Doing full backup only of 'p'\n[ERR] Skipping consolidation/backup of 'p'\n")

	h = newHarness(t, map[string]virt.State{"p": virt.StatePaused})
	so, _, code = h.run(t, "-d", "-C", "-b", t.TempDir(), "all")
	assert.Equal(t, 1, code, "the refusal is an error under all too")
	assert.Contains(t, so, "[ERR] Consolidation only works with running domains. 'p' is not running! Doing full backup only of 'p'\n")
	assert.Contains(t, so, "[DEB] Doing full backup (not consolidation) of 'p'\n")
	assert.Contains(t, so, "All 0 block files for 'p'", "the copy still runs")
}

// TestB4B6Locking: contention is a failure with the old message; an
// unusable lock directory is reported as such.
func TestB4B6Locking(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"dom": virt.StateRunning})
	l, err := lock.TryLock(h.lockDir, "dom")
	require.NoError(t, err)
	so, _, code := h.run(t, "dom")
	assert.Equal(t, 1, code)
	assert.Contains(t, so, "[ERR] Another instance of ./fi-backup is already running on 'dom'! Skipping backup of 'dom'\n")
	so, _, code = h.run(t, "-c", "dom")
	assert.Equal(t, 1, code)
	assert.Contains(t, so, "[ERR] Another instance of ./fi-backup is already running on 'dom'! Skipping consolidation of 'dom'\n")
	require.NoError(t, l.Unlock())
	_, err = os.Stat(lock.Path(h.lockDir, "dom"))
	assert.NoError(t, err, "the lock file is never deleted")

	h.lockDir = filepath.Join(t.TempDir(), "missing")
	so, _, code = h.run(t, "dom")
	assert.Equal(t, 1, code)
	assert.NotContains(t, so, "Another instance")
	assert.Contains(t, so, "[ERR] Cannot lock domain 'dom': open lock file:")
}

func TestSnapshotFailureMessage(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"dom": virt.StateRunning})
	h.fake.Snapshot = func(string, virt.SnapshotSpec) error {
		return &virt.Error{Code: 1, Kind: virt.ErrPermission, Msg: "internal error: unable to execute QEMU command 'transaction': Could not create file: Permission denied"}
	}
	so, _, code := h.run(t, "dom")
	assert.Equal(t, 1, code)
	assert.Contains(t, so, "[ERR] Snapshot for 'dom' failed! internal error: unable to execute QEMU command 'transaction': Could not create file: Permission denied\n"+
		"[ERR] Check apparmor status or check if running with sufficient permissions\n")
	assert.NotContains(t, so, "Exit code: 0", "B13")
}

func TestVersionCompare(t *testing.T) {
	for _, tc := range []struct {
		v, min string
		ok     bool
	}{
		{"7.2.22", "2.10.0", true}, {"2.9.1", "2.10.0", false}, {"2.10.0", "2.10.0", true},
		{"2.1.3,", "2.1.0", true}, {"", "0.0.1", false}, {"1.2.9", "1.2.10", false}, {"10.0", "9.9.9", true},
	} {
		assert.Equal(t, tc.ok, versionAtLeast(tc.v, tc.min), "%s >= %s", tc.v, tc.min)
	}
}

var _ = errors.New

// TestDomainNameWithSpace: an argument that is the exact name of an
// existing domain is taken whole; otherwise it is split as before.
func TestDomainNameWithSpace(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"my vm": virt.StateRunning, "a": virt.StateRunning, "b": virt.StateRunning})
	_, _, code := h.run(t, "my vm", "a b")
	assert.Equal(t, 0, code)
	assert.Equal(t, []string{"my vm@bimg-20240102-030405", "a@bimg-20240102-030405", "b@bimg-20240102-030405"}, h.snapshots)
}

// TestEmptyArguments: empty arguments are not domain names. An empty
// $DOMAINS in a cron line is "no domain given" (exit 2), as with the old
// script; "-r ”" backs up the running domains, as before.
func TestEmptyArguments(t *testing.T) {
	for _, args := range [][]string{{"-b", t.TempDir(), ""}, {""}, {" ", "\t"}} {
		h := newHarness(t, map[string]virt.State{"dom": virt.StateRunning})
		so, _, code := h.run(t, args...)
		assert.Equal(t, ExitNoDomain, code, "%q", args)
		assert.Contains(t, so, "[ERR] <domain name> is missing!")
		assert.Empty(t, h.snapshots)
	}
	h := newHarness(t, map[string]virt.State{"run": virt.StateRunning, "off": virt.StateShutoff})
	_, _, code := h.run(t, "-r", "")
	assert.Equal(t, 0, code)
	assert.Equal(t, []string{"run@bimg-20240102-030405"}, h.snapshots)
}

// TestProgName: $0 as bash showed it: a name found through PATH comes with
// its directory; a path as typed stays as typed.
func TestProgName(t *testing.T) {
	look := func(name string) (string, error) {
		if name == "fi-backup" {
			return "/usr/local/sbin/fi-backup", nil
		}
		return "", errors.New("not found")
	}
	assert.Equal(t, "/usr/local/sbin/fi-backup", progName("fi-backup", look))
	assert.Equal(t, "./fi-backup", progName("./fi-backup", look))
	assert.Equal(t, "/opt/fi-backup", progName("/opt/fi-backup", look))
	assert.Equal(t, "other", progName("other", look))
}

// TestLockContentionWithConsolidateAndSnapshot: -C skips both phases of a
// locked domain and, as the old tool did, says so for each.
func TestLockContentionWithConsolidateAndSnapshot(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"dom": virt.StateRunning})
	l, err := lock.TryLock(h.lockDir, "dom")
	require.NoError(t, err)
	defer l.Unlock()
	so, _, code := h.run(t, "-C", "dom")
	assert.Equal(t, 1, code)
	assert.Contains(t, so, "[ERR] Another instance of ./fi-backup is already running on 'dom'! Skipping backup of 'dom'\n"+
		"[ERR] Another instance of ./fi-backup is already running on 'dom'! Skipping consolidation of 'dom'\n")
}

// TestDomainOrder: all and -r go through the domains in libvirt's (virsh
// list's) order: running domains by ID, then the others by name.
func TestDomainOrder(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"a": virt.StateRunning, "b": virt.StateRunning, "Zed": virt.StateShutoff, "carl": virt.StateShutoff})
	h.fake.IDs = map[string]int{"a": 7, "b": 3}
	so, _, code := h.run(t, "-d", "-b", t.TempDir(), "all")
	assert.Equal(t, 0, code)
	assert.Equal(t, []string{"b@bimg-20240102-030405", "a@bimg-20240102-030405"}, h.snapshots)
	assert.Contains(t, so, "[DEB] Domains NOTRUNNING to backup: carl\nZed\n[DEB] Domains RUNNING to backup: b\na\n")
	assert.Less(t, strings.Index(so, "All 0 block files for 'carl'"), strings.Index(so, "All 0 block files for 'Zed'"))
}

// TestPausedDomainWording: a paused domain is called paused, not shut-off.
func TestPausedDomainWording(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"p": virt.StatePaused, "off": virt.StateShutoff})
	so, _, code := h.run(t, "-C", "all")
	assert.Equal(t, 1, code)
	assert.Contains(t, so, "[ERR] -b flag (directory) required for backing up the paused domain 'p'\n")
	assert.Contains(t, so, "[ERR] -b flag (directory) required for backing up the shut-off domain 'off'\n")
}

// TestStateReadAgainUnderLock: a domain listed as shut off that is started
// before its turn is backed up online (snapshot), never copied offline as
// if its disks were at rest.
func TestStateReadAgainUnderLock(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"a": virt.StateRunning, "b": virt.StateShutoff})
	h.fake.Snapshot = func(name string, spec virt.SnapshotSpec) error {
		h.snapshots = append(h.snapshots, name+"@"+spec.Name)
		if name == "a" {
			h.fake.States["b"] = virt.StateRunning // someone starts b meanwhile
		}
		return nil
	}
	so, _, code := h.run(t, "-d", "-b", t.TempDir(), "a", "b")
	assert.Equal(t, 0, code)
	assert.Contains(t, so, "[DEB] Domains NOTRUNNING to backup:  b\n")
	assert.Equal(t, []string{"a@bimg-20240102-030405", "b@bimg-20240102-030405"}, h.snapshots)
	assert.NotContains(t, so, "All 0 block files for 'b'", "no offline copy of a running domain")
}

// TestRunningOnlyResumesJournaledPausedGuest: a guest left paused by a
// killed -s run is resumed before -r lists the running domains, and then
// backed up with them.
func TestRunningOnlyResumesJournaledPausedGuest(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"run": virt.StateRunning, "p": virt.StatePaused})
	require.NoError(t, os.WriteFile(filepath.Join(h.lockDir, "p.fi-backup.job"), []byte(`{"domain":"p","kind":"dump","pid":4242}`), 0o600))
	var cmds []string
	h.fake.QMP = func(name, cmd string) (string, error) {
		cmds = append(cmds, name+" "+cmd)
		return `{"return":{}}`, nil
	}
	h.fake.Resume = func(name string) error {
		h.fake.States[name] = virt.StateRunning
		return nil
	}
	so, _, code := h.run(t, "-d", "-r")
	assert.Equal(t, 0, code)
	assert.Contains(t, so, "[WAR] Resumed domain 'p', left paused by an interrupted fi-backup -s run (pid 4242)\n")
	assert.Equal(t, []string{`p {"execute":"migrate_cancel"}`}, cmds)
	assert.ElementsMatch(t, []string{"run@bimg-20240102-030405", "p@bimg-20240102-030405"}, h.snapshots)
	assert.NoFileExists(t, filepath.Join(h.lockDir, "p.fi-backup.job"))
}

// TestSecondSignalExitsAtOnce: the first SIGTERM asks for a clean stop;
// while the cleanup hangs (here: a libvirt call that never returns), a
// second one exits at once with 143.
func TestSecondSignalExitsAtOnce(t *testing.T) {
	h := newHarness(t, map[string]virt.State{"dom": virt.StateRunning})
	entered := make(chan struct{})
	hang := make(chan struct{})
	defer close(hang)
	h.fake.Snapshot = func(string, virt.SnapshotSpec) error {
		close(entered)
		<-hang
		return nil
	}
	sigs := make(chan os.Signal, 2)
	exited := make(chan int, 1)
	var so syncWriter
	go Run(context.Background(), Env{
		Prog: "./fi-backup", Stdout: &so, Stderr: io.Discard,
		Getenv:  func(k string) string { return h.env[k] },
		Connect: func(string) (virt.Hypervisor, error) { return h.fake, nil },
		LockDir: h.lockDir, Signals: sigs,
		Exit: func(code int) { exited <- code },
	}, []string{"dom"})
	<-entered
	sigs <- syscall.SIGTERM
	sigs <- syscall.SIGTERM
	select {
	case code := <-exited:
		assert.Equal(t, 143, code)
	case <-time.After(10 * time.Second):
		t.Fatal("a second SIGTERM did not exit")
	}
	assert.Contains(t, so.String(), "[ERR] Interrupted again by SIGTERM: exiting without cleaning up")
}

type syncWriter struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *syncWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// TestConsolidateOnlyOurOverlays: a disk whose top is not one of this
// tool's overlays (a -c after an earlier -c, or after a failed backup) has
// nothing to consolidate: no job starts, for either method, whatever lies
// below (here a golden image other domains use), and the run succeeds.
func TestConsolidateOnlyOurOverlays(t *testing.T) {
	for _, method := range []string{"blockcommit", "blockpull"} {
		h := newHarness(t, map[string]virt.State{"dom": virt.StateRunning, "other": virt.StateShutoff})
		golden := virt.Image{Path: "/img/golden.qcow2", Format: "qcow2"}
		h.fake.Disks["dom"] = []virt.Disk{{Target: "vda", Device: "disk", Type: "file", Source: "/img/vm.qcow2", Format: "qcow2",
			Chain: []virt.Image{{Path: "/img/vm.qcow2", Format: "qcow2"}, golden}, Complete: true}}
		h.fake.Disks["other"] = []virt.Disk{{Target: "vda", Device: "disk", Type: "file", Source: "/img/other.qcow2",
			Chain: []virt.Image{{Path: "/img/other.qcow2"}, golden}, Complete: true}}
		so, _, code := h.run(t, "-d", "-m", method, "-c", "dom")
		assert.Equal(t, 0, code, method)
		assert.Contains(t, so, "[INF] No backup overlay (.bimg-) on top of '/img/vm.qcow2' for 'dom'. Nothing to do.\n", method)
		assert.NotContains(t, so, "Committing into", method)
		assert.NotContains(t, so, "[ERR]", method)
	}
}
