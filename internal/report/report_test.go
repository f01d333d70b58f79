package report

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	dto "github.com/prometheus/client_model/go"
)

func parseMetrics(t *testing.T, path string) map[string]*dto.MetricFamily {
	t.Helper()
	fams, err := ReadMetrics(path)
	require.NoError(t, err)
	return fams
}

func gauge(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	t.Helper()
	return Gauge(fams, name, labels...)
}

// TestReportAndMetrics: the JSON document holds what the run recorded; the
// textfiles parse, one per domain; a failed run keeps the last success of
// the one before; a domain that does not exist gets no file.
func TestReportAndMetrics(t *testing.T) {
	dir := t.TempDir()
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	run := New("fi-backup test", []string{"-b", "/b", "a b", "gone"}, t0)
	d := run.Domain("a b", "running", t0)
	d.Act(ActionSnapshot)
	d.Act(ActionCopy)
	d.Act(ActionCopy)
	d.AddFile("vda", "/d/x.qcow2", File{Source: "/d/x.qcow2", Dest: "/b/x.qcow2", Copied: true, Bytes: 1000, Seconds: 0.5})
	d.Disk("vda", "").HostChainLength = 3
	d.Update(func(d *Domain) {
		d.Snapshot, d.RestorePoints, d.Dump = "bimg-20260102-030405", 4, &Dump{File: "/s/f.gz", PauseSeconds: 0.25}
	})
	d.Finish(t0.Add(2*time.Second), ResultOK)
	g := run.Domain("gone", "missing", t0)
	g.Finish(t0, ResultMissing)
	run.Error("Cannot find domain 'gone'")
	run.Finish(t0.Add(3*time.Second), 1, "")

	path := filepath.Join(dir, "r.json")
	require.NoError(t, run.WriteFile(path))
	var back map[string]any
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &back))
	assert.EqualValues(t, Schema, back["schema"])
	assert.EqualValues(t, 1, back["exit_code"])
	doms := back["domains"].([]any)
	require.Len(t, doms, 2)
	first := doms[0].(map[string]any)
	assert.Equal(t, []any{"snapshot", "copy"}, first["actions"])
	assert.EqualValues(t, 1000, first["copied_bytes"])
	assert.EqualValues(t, 3, first["disks"].([]any)[0].(map[string]any)["host_chain_length"])

	require.NoError(t, run.WriteMetrics(dir))
	mf := MetricsFile(dir, "a b")
	assert.Equal(t, "fi-backup-a%20b.prom", filepath.Base(mf))
	fams := parseMetrics(t, mf)
	v, ok := gauge(t, fams, MetricSuccess, "domain", "a b")
	assert.True(t, ok)
	assert.Equal(t, 1.0, v)
	v, _ = gauge(t, fams, MetricLastSuccess, "domain", "a b")
	assert.Equal(t, float64(t0.Add(2*time.Second).Unix()), v)
	v, _ = gauge(t, fams, MetricChainLength, "domain", "a b", "disk", "vda")
	assert.Equal(t, 3.0, v)
	v, _ = gauge(t, fams, MetricRestorePoints, "domain", "a b")
	assert.Equal(t, 4.0, v)
	v, _ = gauge(t, fams, MetricDumpPause, "domain", "a b")
	assert.Equal(t, 0.25, v)
	_, err = os.Stat(MetricsFile(dir, "gone"))
	assert.True(t, os.IsNotExist(err), "no file for a domain that does not exist")

	// The next run fails: the last success stays the previous one's.
	t1 := t0.Add(time.Hour)
	run2 := New("fi-backup test", nil, t1)
	d2 := run2.Domain("a b", "running", t1)
	d2.Finish(t1.Add(time.Second), ResultFailed)
	run2.Finish(t1.Add(time.Second), 1, "")
	require.NoError(t, run2.WriteMetrics(dir))
	fams = parseMetrics(t, mf)
	v, _ = gauge(t, fams, MetricSuccess, "domain", "a b")
	assert.Equal(t, 0.0, v)
	v, _ = gauge(t, fams, MetricLastSuccess, "domain", "a b")
	assert.Equal(t, float64(t0.Add(2*time.Second).Unix()), v, "survives the failed run")
	v, _ = gauge(t, fams, MetricLastRun, "domain", "a b")
	assert.Equal(t, float64(t1.Add(time.Second).Unix()), v)
	_, ok = gauge(t, fams, MetricRestorePoints, "domain", "a b")
	assert.False(t, ok, "unknown: not written")
}
