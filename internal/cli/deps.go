package cli

import (
	"os/exec"
	"path/filepath"

	"github.com/fi-backup/fi-backup/internal/blockjob"
	"github.com/fi-backup/fi-backup/internal/qcow2"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// defaultMethod is the old rule: blockcommit when QEMU ≥ 2.1.0 and libvirt
// ≥ 1.2.9, else blockpull (also when the versions cannot be read).
func defaultMethod(hyp virt.Hypervisor) blockjob.Method {
	if hyp == nil {
		return blockjob.Pull
	}
	qv, err1 := hyp.HypervisorVersion()
	lv, err2 := hyp.LibVersion()
	if err1 == nil && err2 == nil && versionAtLeast(qv, "2.1.0") && versionAtLeast(lv, "1.2.9") {
		return blockjob.Commit
	}
	return blockjob.Pull
}

// qemuImgProbe is the run's qemu-img version: remembered from an earlier
// run of the same binary, else its one `qemu-img --version`, started
// together with the libvirt connection so that the two overlap instead of
// adding up (the process costs tens of milliseconds, as much as the
// connection, and competes with it for the CPU).
type qemuImgProbe struct {
	name, path string
	lookErr    error
	done       chan struct{} // closed when version and err are set
	version    string
	err        error
}

func (a *app) startQemuImgProbe() *qemuImgProbe {
	p := &qemuImgProbe{name: a.Getenv("FI_BACKUP_QEMU_IMG"), done: make(chan struct{})}
	if p.name == "" {
		p.name = "qemu-img"
	}
	p.path, p.lookErr = exec.LookPath(p.name)
	if p.lookErr != nil {
		close(p.done)
		return p
	}
	go func() {
		defer close(p.done)
		p.version, p.err = qcow2.VersionCached(p.path, a.versionCache())
	}()
	return p
}

// versionCache is where qemu-img's version is remembered between runs
// (see qcow2.VersionCached): $XDG_CACHE_HOME/fi-backup, else
// $HOME/.cache/fi-backup; "" (no cache) when neither is set.
func (a *app) versionCache() string {
	dir := a.Getenv("XDG_CACHE_HOME")
	if !filepath.IsAbs(dir) {
		dir = a.Getenv("HOME")
		if !filepath.IsAbs(dir) {
			return ""
		}
		dir = filepath.Join(dir, ".cache")
	}
	return filepath.Join(dir, "fi-backup", "qemu-img-version.json")
}

func (a *app) checkDependencies(hyp virt.Hypervisor, connErr error, probe *qemuImgProbe) (string, bool) {
	ok := true
	if probe == nil {
		probe = a.startQemuImgProbe()
	}
	qemuImg := probe.path
	if probe.lookErr != nil {
		a.p.Err("'%s' cannot be found or executed", probe.name)
		ok = false
	}
	if connErr != nil {
		a.p.Err("Cannot connect to libvirt: %s", virt.Describe(connErr))
		return qemuImg, false
	}
	lv, err := hyp.LibVersion()
	switch {
	case err != nil:
		a.p.Err("Cannot read libVirt version: %s", virt.Describe(err))
		ok = false
	case versionAtLeast(lv, "1.0.0"):
		a.p.Info("libVirt version '%s' support is experimental", lv)
	case versionAtLeast(lv, "0.9.13"):
		a.p.Debug("libVirt version '%s' is supported", lv)
	default:
		a.p.Err("Unsupported libVirt version '%s'. Please use libVirt 0.9.13 or later", lv)
		ok = false
	}
	if qemuImg != "" {
		<-probe.done
		iv, err := probe.version, probe.err
		switch {
		case err != nil:
			a.p.Err("'%s' cannot be found or executed", qemuImg)
			ok = false
		case versionAtLeast(iv, "1.2.0"):
			a.p.Debug("%s version '%s' is supported", qemuImg, iv)
		default:
			a.p.Err("Unsupported %s version '%s'. Please use 'qemu-img' 1.2.0 or later", qemuImg, iv)
			ok = false
		}
		if err == nil && versionAtLeast(iv, "2.10.0") {
			a.p.Debug("%s version '%s' will use --force-share for file access", qemuImg, iv)
		}
	}
	qv, err := hyp.HypervisorVersion()
	switch {
	case err != nil:
		a.p.Err("Cannot read QEMU/KVM version from libvirt: %s", virt.Describe(err))
		ok = false
	case versionAtLeast(qv, "1.2.0"):
		a.p.Debug("QEMU/KVM version '%s' is supported", qv)
	default:
		a.p.Err("Unsupported QEMU/KVM version '%s'. Please use QEMU/KVM 1.2.0 or later", qv)
		ok = false
	}
	return qemuImg, ok
}
