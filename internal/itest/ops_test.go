package itest

// Operability: --report, --textfile_dir, progress on a terminal,
// --parallel, --rate_limit and the free-space check, against the real
// libvirtd (issue "Operable from cron and across a fleet").

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/report"
	"github.com/fi-backup/fi-backup/internal/testenv"
)

// readReport parses a --report document.
func readReport(t *testing.T, path string) *report.Run {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	r := new(report.Run)
	require.NoError(t, json.Unmarshal(b, r), string(b))
	require.Equal(t, report.Schema, r.Schema)
	return r
}

func reportDomain(t *testing.T, r *report.Run, name string) *report.Domain {
	t.Helper()
	for _, d := range r.Domains {
		if d.Name == name {
			return d
		}
	}
	t.Fatalf("no domain %s in the report: %+v", name, r.Domains)
	return nil
}

// metrics parses a domain's textfile with the Prometheus text parser, as
// node_exporter's textfile collector does.
func metrics(t *testing.T, dir, domain string) map[string]*dto.MetricFamily {
	t.Helper()
	fams, err := report.ReadMetrics(report.MetricsFile(dir, domain))
	require.NoError(t, err)
	return fams
}

// metric is the value of a sample of fams with the given labels.
func metric(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	t.Helper()
	return report.Gauge(fams, name, labels...)
}

var copiedRE = regexp.MustCompile(`\[DEB\] Copied (\d+) bytes of '([^']*)'`)

// TestReportAndMetrics: the report and the textfile after a success, a
// copy that failed on a full file system, a consolidation timeout, SIGTERM
// in the middle of a copy, and a domain that does not exist — each parsed,
// with the values the run really had. An unwritable report path is an
// [ERR] and exit 1, but the backup happened.
func TestReportAndMetrics(t *testing.T) {
	d := newDomain(t, "report", domOpts{})
	bk := backupDir(t)
	tdir := t.TempDir()
	rp := filepath.Join(t.TempDir(), "last.json")
	args := func(extra ...string) []string {
		return append([]string{"-d", "--report=" + rp, "--textfile_dir=" + tdir}, extra...)
	}

	t.Run("success", func(t *testing.T) {
		d.write(t, 0, 0x31, "0", "2M")
		r := consSnap(t, args("-b", bk, d.Name)...)
		rep := readReport(t, rp)
		assert.Equal(t, 0, rep.ExitCode)
		assert.Contains(t, rep.Args, d.Name)
		rd := reportDomain(t, rep, d.Name)
		assert.Equal(t, report.ResultOK, rd.Result)
		assert.Equal(t, "running", rd.State)
		assert.Equal(t, []string{report.ActionSnapshot, report.ActionCopy}, rd.Actions)
		assert.Equal(t, "bimg-"+strings.TrimPrefix(filepath.Ext(d.liveChain(t, "vda")[0]), ".bimg-"), rd.Snapshot)
		pts := points(t, bk, d.Name)
		require.Len(t, pts, 1)
		assert.Equal(t, pts[0].Moment, rd.Moment)
		assert.Equal(t, 1, rd.RestorePoints)
		require.Len(t, rd.Disks, 1)
		assert.Equal(t, 2, rd.Disks[0].HostChainLength)
		m := copiedRE.FindStringSubmatch(r.Stdout)
		require.NotNil(t, m, r.Stdout)
		bytes, _ := strconv.ParseInt(m[1], 10, 64)
		require.Len(t, rd.Disks[0].Files, 1)
		f := rd.Disks[0].Files[0]
		assert.Equal(t, m[2], f.Source)
		assert.True(t, f.Copied)
		assert.Equal(t, bytes, f.Bytes)
		assert.Equal(t, bytes, rd.CopiedBytes)

		fams := metrics(t, tdir, d.Name)
		v, _ := metric(t, fams, report.MetricSuccess, "domain", d.Name)
		assert.Equal(t, 1.0, v)
		v, _ = metric(t, fams, report.MetricCopiedBytes, "domain", d.Name)
		assert.Equal(t, float64(bytes), v)
		v, _ = metric(t, fams, report.MetricChainLength, "domain", d.Name, "disk", "vda")
		assert.Equal(t, 2.0, v)
		v, _ = metric(t, fams, report.MetricRestorePoints, "domain", d.Name)
		assert.Equal(t, 1.0, v)
		v, _ = metric(t, fams, report.MetricLastSuccess, "domain", d.Name)
		assert.InDelta(t, float64(rd.End.UnixNano())/1e9, v, 0.001)
	})
	lastSuccess, _ := metric(t, metrics(t, tdir, d.Name), report.MetricLastSuccess, "domain", d.Name)

	t.Run("full file system", func(t *testing.T) {
		d.write(t, 0, 0x32, "0", "8M")
		small := t.TempDir()
		sh(t, "mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", small)
		t.Cleanup(func() { _ = exec.Command("umount", small).Run() })
		nextSecond()
		r := run(t, args("-b", small, d.Name)...)
		require.Equal(t, 1, r.Code)
		rep := readReport(t, rp)
		assert.Equal(t, 1, rep.ExitCode)
		rd := reportDomain(t, rep, d.Name)
		assert.Equal(t, report.ResultFailed, rd.Result)
		require.NotEmpty(t, rd.Errors)
		assert.Contains(t, rd.Errors[0], "Not enough free space in '"+small+"'")
		fams := metrics(t, tdir, d.Name)
		v, _ := metric(t, fams, report.MetricSuccess, "domain", d.Name)
		assert.Equal(t, 0.0, v)
		v, _ = metric(t, fams, report.MetricLastSuccess, "domain", d.Name)
		assert.Equal(t, lastSuccess, v, "the last success survives the failed run")
		v, _ = metric(t, fams, report.MetricRestorePoints, "domain", d.Name)
		assert.Equal(t, 0.0, v, "none in that directory")
	})

	t.Run("consolidation timeout", func(t *testing.T) {
		d.consWriteMiB(t, 0, 0x33, 0, 32, 16)
		r := run(t, args("--job_timeout", "1ns", "-c", d.Name)...)
		require.Equal(t, 1, r.Code)
		rd := reportDomain(t, readReport(t, rp), d.Name)
		assert.Equal(t, report.ResultFailed, rd.Result)
		require.NotNil(t, rd.Consolidation)
		assert.False(t, rd.Consolidation.OK)
		assert.Equal(t, "blockcommit", rd.Consolidation.Method)
		assert.Contains(t, strings.Join(rd.Errors, "\n"), "timed out")
		assert.Equal(t, 2, rd.Disks[0].HostChainLength, "the chain stays: base and overlay")
		v, _ := metric(t, metrics(t, tdir, d.Name), report.MetricChainLength, "domain", d.Name, "disk", "vda")
		assert.Equal(t, 2.0, v)
		d.consNoBlockJob(t, "vda")
	})

	t.Run("SIGTERM mid-copy", func(t *testing.T) {
		d.write(t, 0, 0x34, "8M", "16M")
		nextSecond()
		cmd, out := consStart(t, args("--rate_limit=1M", "-b", bk, d.Name)...)
		waitForTemp(t, bk, out)
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		assert.Equal(t, 143, consWait(t, cmd, 60*time.Second), out.String())
		rep := readReport(t, rp)
		assert.Equal(t, 143, rep.ExitCode)
		assert.Equal(t, "SIGTERM", rep.Signal)
		rd := reportDomain(t, rep, d.Name)
		assert.Equal(t, report.ResultInterrupted, rd.Result)
		assert.Equal(t, 1, rd.RestorePoints, "the interrupted run added none")
		v, _ := metric(t, metrics(t, tdir, d.Name), report.MetricSuccess, "domain", d.Name)
		assert.Equal(t, 0.0, v)
	})

	t.Run("domain that does not exist", func(t *testing.T) {
		other := t.TempDir()
		r := run(t, "--report="+rp, "--textfile_dir="+other, "-b", bk, "fibt-report-nonexistent")
		require.Equal(t, 1, r.Code)
		rep := readReport(t, rp)
		assert.Equal(t, 1, rep.ExitCode)
		rd := reportDomain(t, rep, "fibt-report-nonexistent")
		assert.Equal(t, report.ResultMissing, rd.Result)
		assert.Contains(t, strings.Join(rep.Errors, "\n"), "Cannot find domain 'fibt-report-nonexistent'")
		assert.Empty(t, files(t, other), "no metrics file for a domain that does not exist")
	})

	t.Run("unwritable report path", func(t *testing.T) {
		before := len(points(t, bk, d.Name))
		nextSecond()
		r := run(t, "--report=/nonexistent-dir/last.json", "-b", bk, d.Name)
		assert.Equal(t, 1, r.Code)
		assert.Contains(t, r.Stdout, "[ERR] Cannot write the report '/nonexistent-dir/last.json': ")
		assert.Len(t, points(t, bk, d.Name), before+1, "the backup happened")
	})
}

// TestProgressOnlyOnATerminal: under a pseudo-terminal the copies are
// shown on stderr as they go; without one, stderr stays empty and stdout
// is byte for byte what it is without progress.
func TestProgressOnlyOnATerminal(t *testing.T) {
	d := newDomain(t, "progress", domOpts{})
	d.write(t, 0, 0x41, "0", "12M")
	nextSecond()
	bk := backupDir(t)

	// stdout to a pipe, stderr a terminal: the display draws on stderr.
	tty, drawTerm := testenv.Terminal(t, 30, 140)
	cmd := exec.Command(binary(t), "--rate_limit=6M", "-b", bk, d.Name)
	var stdout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, tty
	require.NoError(t, cmd.Run())
	drawn := drawTerm()
	assert.Contains(t, drawn, d.Name+" disk1.qcow2", "the copy's bar")
	assert.Contains(t, drawn, "MiB")
	assert.NotContains(t, stdout.String(), "disk1.qcow2 ", "no progress on stdout")
	assert.Equal(t, "[INF] libVirt version '9.0.0' support is experimental\n", stdout.String())

	// No terminal: nothing on stderr; stdout as without progress.
	d.write(t, 0, 0x42, "0", "1M")
	nextSecond()
	r := run(t, "-b", bk, d.Name)
	assert.Equal(t, 0, r.Code)
	assert.Empty(t, r.Stderr)
	assert.Equal(t, "[INF] libVirt version '9.0.0' support is experimental\n", r.Stdout)
}

// TestParallelDomains: --parallel=4 over 8 domains backs every one up,
// never interleaves two domains' lines, reports a held lock with the old
// message, and exits as --parallel=1 does.
func TestParallelDomains(t *testing.T) {
	var names []string
	var doms []*Domain
	for i := 0; i < 8; i++ {
		// Distinct file names: one backup directory holds them all.
		d := newDomain(t, fmt.Sprintf("par%d", i), domOpts{disks: []string{fmt.Sprintf("par%d.qcow2", i)}})
		d.write(t, 0, byte(0x50+i), "0", "2M")
		doms = append(doms, d)
		names = append(names, d.Name)
	}
	release := holdLock(t, "/var/lock/"+names[5]+".fi-backup.lock")
	defer release()
	codes := map[int]int{}
	for _, par := range []int{1, 4} {
		bk := backupDir(t)
		nextSecond()
		r := run(t, append([]string{"-d", fmt.Sprintf("--parallel=%d", par), "-b", bk}, names...)...)
		codes[par] = r.Code
		assert.Contains(t, r.Stdout, "[ERR] Another instance of "+binary(t)+" is already running on '"+names[5]+"'! Skipping backup of '"+names[5]+"'")
		for i, n := range names {
			if i == 5 {
				continue
			}
			pts := points(t, bk, n)
			assert.Len(t, pts, 1, "%s backed up with --parallel=%d", n, par)
		}
		lines := strings.Split(r.Stdout, "\n")
		owner := func(l string) string {
			if strings.HasPrefix(l, "[DEB] Domains ") {
				return "" // the list of all of them, before any turn
			}
			for _, n := range names {
				if strings.Contains(l, "'"+n+"'") || strings.Contains(l, " "+n+" ") || strings.Contains(l, "/"+n+"/") {
					return n
				}
			}
			return ""
		}
		first, last := map[string]int{}, map[string]int{}
		for i, l := range lines {
			if n := owner(l); n != "" {
				if _, ok := first[n]; !ok {
					first[n] = i
				}
				last[n] = i
			}
		}
		for i, l := range lines {
			n := owner(l)
			for o := range first {
				if n != "" && o != n && first[o] < i && i < last[o] {
					t.Errorf("--parallel=%d: line %d (%s) inside the block of %s", par, i, n, o)
				}
			}
		}
	}
	assert.Equal(t, 1, codes[1])
	assert.Equal(t, codes[1], codes[4])
}

// TestRateLimitAndFreeSpace: a 256 MiB copy at --rate_limit=64M takes at
// least 4 s; a backup that cannot fit in the backup file system is refused
// before any overlay exists.
func TestRateLimitAndFreeSpace(t *testing.T) {
	d := newDomain(t, "rate", domOpts{size: "320M"})
	d.write(t, 0, 0x61, "0", "256M")
	nextSecond()
	bk := backupDir(t)
	start := time.Now()
	r := run(t, "-d", "--rate_limit=64M", "-b", bk, d.Name)
	took := time.Since(start)
	require.Equal(t, 0, r.Code)
	m := regexp.MustCompile(`\[DEB\] Copied (\d+) bytes of '[^']*disk1.qcow2' in ([0-9.]+)s`).FindStringSubmatch(r.Stdout)
	require.NotNil(t, m, r.Stdout)
	n, _ := strconv.ParseInt(m[1], 10, 64)
	secs, _ := strconv.ParseFloat(m[2], 64)
	require.GreaterOrEqual(t, n, int64(256<<20))
	assert.GreaterOrEqual(t, secs, 4.0, "256 MiB at 64 MiB/s")
	assert.GreaterOrEqual(t, took, 4*time.Second)

	small := t.TempDir()
	sh(t, "mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", small)
	t.Cleanup(func() { _ = exec.Command("umount", small).Run() })
	before := overlays(t, d.Dir)
	nextSecond()
	r = run(t, "-b", small, d.Name)
	assert.Equal(t, 1, r.Code)
	assert.Regexp(t, `\[ERR\] Not enough free space in '`+regexp.QuoteMeta(small)+`' for the backup of '`+d.Name+`': it copies up to 256\.\d MiB, and 64\.0 MiB are free`, r.Stdout)
	assert.Equal(t, before, overlays(t, d.Dir), "refused before the snapshot")
	assert.Empty(t, files(t, small))
}
