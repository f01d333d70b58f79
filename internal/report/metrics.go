package report

import (
	"errors"
	"fmt"
	dto "github.com/prometheus/client_model/go"
	"os"
	"path/filepath"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Metric names of --textfile_dir (node_exporter's textfile collector).
// Every sample has the label domain; host_chain_length has disk too.
const (
	MetricLastRun         = "fi_backup_last_run_timestamp_seconds"
	MetricLastSuccess     = "fi_backup_last_success_timestamp_seconds"
	MetricSuccess         = "fi_backup_last_run_success"
	MetricDuration        = "fi_backup_last_run_duration_seconds"
	MetricCopiedBytes     = "fi_backup_last_run_copied_bytes"
	MetricChainLength     = "fi_backup_host_chain_length"
	MetricRestorePoints   = "fi_backup_restore_points"
	MetricDumpPause       = "fi_backup_state_dump_pause_seconds"
	MetricConsolidation   = "fi_backup_consolidation_duration_seconds"
	metricFilePrefix      = "fi-backup-"
	metricFileSuffix      = ".prom"
	metricFileNameAllowed = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
)

// MetricsFile is the textfile of a domain in dir: fi-backup-<domain>.prom,
// with every byte of the name outside [A-Za-z0-9_.-] written as %XX, so
// that two domains never share a file.
func MetricsFile(dir, domain string) string {
	var b strings.Builder
	for i := 0; i < len(domain); i++ {
		c := domain[i]
		if strings.IndexByte(metricFileNameAllowed, c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return filepath.Join(dir, metricFilePrefix+b.String()+metricFileSuffix)
}

// WriteMetrics writes the textfile of every domain the run handled (none
// for a domain that does not exist), each atomically, so that runs for
// different domains never erase each other's.
func (r *Run) WriteMetrics(dir string) error {
	r.mu.Lock()
	domains := append([]*Domain{}, r.Domains...)
	r.mu.Unlock()
	var errs []error
	for _, d := range domains {
		d.mu.Lock()
		err := d.writeMetrics(dir)
		d.mu.Unlock()
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (d *Domain) writeMetrics(dir string) error {
	if d.Result == ResultMissing {
		return nil
	}
	path := MetricsFile(dir, d.Name)
	reg := prometheus.NewRegistry()
	add := func(name, help string, v float64, labels prometheus.Labels) {
		g := prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help, ConstLabels: labels})
		g.Set(v)
		reg.MustRegister(g)
	}
	dom := prometheus.Labels{"domain": d.Name}
	ok := d.Result == ResultOK
	add(MetricLastRun, "When fi-backup last ran for the domain (end of its turn).", unix(d.End), dom)
	last, found := previousSuccess(path, d.Name)
	if ok {
		last, found = unix(d.End), true
	}
	if found {
		add(MetricLastSuccess, "When the domain's last fully successful fi-backup run ended.", last, dom)
	}
	add(MetricSuccess, "1 if the domain's last run fully succeeded, else 0.", b2f(ok), dom)
	add(MetricDuration, "How long the domain's last run took.", d.Seconds, dom)
	add(MetricCopiedBytes, "Data bytes the domain's last run copied into the backup directory.", float64(d.CopiedBytes), dom)
	for _, k := range d.Disks {
		if k.HostChainLength > 0 {
			g := prometheus.NewGauge(prometheus.GaugeOpts{Name: MetricChainLength,
				Help: "Images in the disk's chain on the host after the last run (1: no backing file); growing means overlays pile up.", ConstLabels: prometheus.Labels{"domain": d.Name, "disk": k.Target}})
			g.Set(float64(k.HostChainLength))
			if err := reg.Register(g); err != nil {
				return err
			}
		}
	}
	if d.RestorePoints >= 0 {
		add(MetricRestorePoints, "Restore points of the domain in the backup directory after the last run.", float64(d.RestorePoints), dom)
	}
	if d.Dump != nil {
		add(MetricDumpPause, "How long the -s state dump kept the guest paused.", d.Dump.PauseSeconds, dom)
	}
	if d.Consolidation != nil {
		add(MetricConsolidation, "How long the last run's consolidation took.", d.Consolidation.Seconds, dom)
	}
	return prometheus.WriteToTextfile(path, reg)
}

// previousSuccess reads the last-success timestamp of the domain from the
// file an earlier run wrote, so that it survives failed runs.
func previousSuccess(path, domain string) (float64, bool) {
	fams, err := ReadMetrics(path)
	if err != nil {
		return 0, false
	}
	return Gauge(fams, MetricLastSuccess, "domain", domain)
}

// ReadMetrics parses a textfile as node_exporter's textfile collector does.
func ReadMetrics(path string) (map[string]*dto.MetricFamily, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(f)
}

// Gauge is the value of the first gauge sample of the family name whose
// labels include the given name, value pairs.
func Gauge(fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
samples:
	for _, m := range fams[name].GetMetric() {
		if m.GetGauge() == nil {
			continue
		}
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue samples
			}
		}
		return m.GetGauge().GetValue(), true
	}
	return 0, false
}

func unix(t interface{ UnixNano() int64 }) float64 { return float64(t.UnixNano()) / 1e9 }

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
