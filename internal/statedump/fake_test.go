package statedump

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/fi-backup/fi-backup/internal/virt"
)

// step is one scripted query-migrate answer after "migrate".
type step struct {
	status string
	paused bool   // the guest is stopped while this status is reported
	desc   string // error-desc for "failed"
}

// fakeQEMU is a scripted Monitor: a domain whose QEMU accepts getfd,
// writes stream to the descriptor on migrate, and answers query-migrate from
// script (the last step repeats). Like real QEMU it restarts a guest it
// stopped when the migration is cancelled or fails, unless noAutoResume.
type fakeQEMU struct {
	t *testing.T

	mu           sync.Mutex
	state        virt.State
	script       []step
	stream       []byte
	hold         bool   // keep the descriptor open (after writing stream) until cancel/closefd
	migrateReply string // non-empty: migrate answers this instead of starting
	getfdReply   string
	noAutoResume bool
	resumeErr    error
	stateErr     error
	busy         bool // a migration of someone else's runs

	fd        *os.File
	migrating bool
	polls     int
	cancelled bool
	bandwidth int64
	calls     []string
	resumes   int
	writerWG  sync.WaitGroup
}

func newFake(t *testing.T) *fakeQEMU {
	f := &fakeQEMU{t: t, state: virt.StateRunning, bandwidth: 134217728}
	t.Cleanup(func() {
		f.mu.Lock()
		if f.fd != nil {
			_ = f.fd.Close()
			f.fd = nil
		}
		f.mu.Unlock()
		f.writerWG.Wait()
	})
	return f
}

func (f *fakeQEMU) Name() string { return "dom" }

func (f *fakeQEMU) State() (virt.State, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stateErr != nil {
		return 0, f.stateErr
	}
	return f.state, nil
}

func (f *fakeQEMU) Resume() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "resume")
	if f.resumeErr != nil {
		return f.resumeErr
	}
	if f.state != virt.StatePaused {
		return &virt.Error{Code: 55, Msg: "Requested operation is not valid: domain is already running", Kind: virt.ErrNotRunning}
	}
	f.resumes++
	f.state = virt.StateRunning
	return nil
}

func (f *fakeQEMU) QMPWithFile(cmd string, file *os.File) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	name, _ := parseCmd(f.t, cmd)
	f.calls = append(f.calls, name)
	if name != "getfd" {
		return "", errors.New("unexpected command with file: " + cmd)
	}
	if f.getfdReply != "" {
		return f.getfdReply, nil
	}
	nfd, err := unix.Dup(int(file.Fd()))
	if err != nil {
		return "", err
	}
	f.fd = os.NewFile(uintptr(nfd), "fake-qemu-fd")
	return `{"return":{},"id":"libvirt-1"}`, nil
}

func (f *fakeQEMU) QMP(cmd string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	name, args := parseCmd(f.t, cmd)
	f.calls = append(f.calls, name)
	if f.state == virt.StateCrashed {
		return "", &virt.Error{Code: 55, Msg: "Requested operation is not valid: domain is not running", Kind: virt.ErrNotRunning}
	}
	ok := `{"return":{},"id":"libvirt-2"}`
	switch name {
	case "query-migrate":
		if f.busy {
			return `{"return":{"status":"active"}}`, nil
		}
		if !f.migrating {
			if f.cancelled {
				return `{"return":{"status":"cancelled"}}`, nil
			}
			return ok, nil
		}
		s := f.script[min(f.polls, len(f.script)-1)]
		f.polls++
		if s.paused && f.state == virt.StateRunning {
			f.state = virt.StatePaused
		}
		if s.status == "failed" {
			f.end()
		}
		if s.status == "crash" { // QEMU dies (e.g. killed by seccomp)
			f.closeFD()
			f.state = virt.StateCrashed
			return "", &virt.Error{Code: 38, Msg: "Unable to read from monitor: Connection reset by peer"}
		}
		b, _ := json.Marshal(map[string]any{"return": map[string]any{"status": s.status, "error-desc": s.desc, "downtime": 5, "total-time": 40}})
		return string(b), nil
	case "migrate":
		if f.migrateReply != "" {
			return f.migrateReply, nil
		}
		if args["uri"] != "fd:"+FDName || f.fd == nil {
			return `{"error":{"class":"GenericError","desc":"File descriptor named '` + FDName + `' has not been found"}}`, nil
		}
		f.migrating = true
		fd := f.fd
		f.writerWG.Add(1)
		go func() {
			defer f.writerWG.Done()
			_, _ = fd.Write(f.stream)
			if !f.hold {
				f.mu.Lock()
				f.closeFD()
				f.mu.Unlock()
			}
		}()
		return ok, nil
	case "migrate_cancel":
		if f.migrating && f.script[min(f.polls, len(f.script)-1)].status != "completed" {
			f.cancelled = true
			f.end()
		}
		return ok, nil
	case "closefd":
		if f.fd == nil {
			return `{"error":{"class":"GenericError","desc":"File descriptor named 'x' not found"}}`, nil
		}
		f.closeFD()
		return ok, nil
	case "query-migrate-parameters":
		return fmt.Sprintf(`{"return":{"max-bandwidth":%d,"downtime-limit":300}}`, f.bandwidth), nil
	case "migrate-set-parameters":
		bw, _ := args["max-bandwidth"].(float64)
		f.bandwidth = int64(bw)
		return ok, nil
	}
	return `{"error":{"class":"CommandNotFound","desc":"The command ` + name + ` has not been found"}}`, nil
}

// end stops the migration like QEMU does after cancel/failure: close the
// stream, restart a guest the migration stopped.
func (f *fakeQEMU) end() {
	f.migrating = false
	f.closeFD()
	if f.state == virt.StatePaused && !f.noAutoResume {
		f.state = virt.StateRunning
	}
}

func (f *fakeQEMU) closeFD() {
	if f.fd != nil {
		_ = f.fd.Close()
		f.fd = nil
	}
}

func (f *fakeQEMU) called(name string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		if c == name {
			n++
		}
	}
	return n
}

func parseCmd(t *testing.T, cmd string) (string, map[string]any) {
	var c struct {
		Execute   string         `json:"execute"`
		Arguments map[string]any `json:"arguments"`
	}
	if err := json.Unmarshal([]byte(cmd), &c); err != nil {
		t.Errorf("bad QMP command %q: %v", cmd, err)
	}
	return c.Execute, c.Arguments
}

// logRec records the dump's messages as the old tool prints them.
type logRec struct {
	mu    sync.Mutex
	lines []string
}

func (l *logRec) add(prefix, format string, a ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, prefix+fmt.Sprintf(format, a...))
}
func (l *logRec) Err(format string, a ...any)   { l.add("[ERR] ", format, a...) }
func (l *logRec) Verb(format string, a ...any)  { l.add("[VER] ", format, a...) }
func (l *logRec) Debug(format string, a ...any) { l.add("[DEB] ", format, a...) }
func (l *logRec) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n") + "\n"
}
