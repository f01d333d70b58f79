// Package progress draws the live progress of a run on a terminal: one
// bar per file being copied and per consolidation job (file, bytes, rate,
// ETA), on stderr, never on stdout. When stderr is not a terminal (cron,
// pipes) there is no display at all and nothing is written to stderr.
package progress

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/sys/unix"
)

// UI is the display of one run; a nil *UI displays nothing.
type UI struct {
	p       *mpb.Progress
	lines   *queue   // the log lines when they share the display's terminal
	refresh chan any // a redraw (mpb's manual refresh)
	stop    chan struct{}
	ticking sync.WaitGroup
}

// refreshEvery is how often the display is redrawn.
const refreshEvery = 250 * time.Millisecond

// Start returns the display for a run whose log lines go to stdout, and
// the writer the log lines must go to from now on: stdout itself, unless
// stdout is the very terminal the display draws on — then the lines go
// through the display, which prints them above its bars so that neither
// garbles the other. With stderr not a terminal it returns nil and stdout.
func Start(stdout io.Writer, stderr io.Writer) (*UI, io.Writer) {
	errFile, ok := stderr.(*os.File)
	if !ok || !IsTerminal(errFile) {
		return nil, stdout
	}
	// Redraws are requested here rather than by mpb's own timer, so that
	// Stop can ask for a last one: mpb prints the lines written to it only
	// when it redraws, and shutting it down does not redraw for them.
	u := &UI{refresh: make(chan any), stop: make(chan struct{})}
	p := mpb.New(mpb.WithOutput(errFile), mpb.WithWidth(24), mpb.WithManualRefresh(u.refresh))
	u.p = p
	u.ticking.Add(1)
	go func() {
		defer u.ticking.Done()
		t := time.NewTicker(refreshEvery)
		defer t.Stop()
		for {
			select {
			case now := <-t.C:
				select {
				case u.refresh <- now:
				case <-u.stop:
					return
				}
			case <-u.stop:
				return
			}
		}
	}()
	if outFile, ok := stdout.(*os.File); ok && sameTerminal(outFile, errFile) {
		u.lines = newQueue(p)
		return u, u.lines
	}
	return u, stdout
}

// Stop prints what log lines are left and removes the display (bars still
// running are dropped).
func (u *UI) Stop() {
	if u == nil {
		return
	}
	if u.lines != nil {
		u.lines.close() // every line is now in mpb's buffer
	}
	close(u.stop)
	u.ticking.Wait()
	// The second request is taken only once the first redraw has started,
	// and Shutdown lets a started redraw finish: the lines are out. A
	// display that gave up (mpb stops when it cannot draw, e.g. on a
	// terminal that went away) takes no request: never wait for it long.
	for i := 0; i < 2; i++ {
		select {
		case u.refresh <- time.Now():
		case <-time.After(time.Second):
		}
	}
	u.p.Shutdown()
}

// queue hands log lines to the display in order without making the
// printer wait for its refresh (the display prints them at its next one).
type queue struct {
	mu      sync.Mutex
	pending [][]byte
	wake    chan struct{}
	done    chan struct{}
	closed  bool
}

func newQueue(w io.Writer) *queue {
	q := &queue{wake: make(chan struct{}, 1), done: make(chan struct{})}
	go func() {
		defer close(q.done)
		for {
			q.mu.Lock()
			batch, closed := q.pending, q.closed
			q.pending = nil
			q.mu.Unlock()
			for _, b := range batch {
				_, _ = w.Write(b)
			}
			if closed && len(batch) == 0 {
				return
			}
			if len(batch) == 0 {
				<-q.wake
			}
		}
	}()
	return q
}

func (q *queue) Write(b []byte) (int, error) {
	q.mu.Lock()
	q.pending = append(q.pending, append([]byte(nil), b...))
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return len(b), nil
}

func (q *queue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	<-q.done
}

// IsTerminal reports whether f is a terminal.
func IsTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func sameTerminal(a, b *os.File) bool {
	var sa, sb unix.Stat_t
	if unix.Fstat(int(a.Fd()), &sa) != nil || unix.Fstat(int(b.Fd()), &sb) != nil {
		return false
	}
	return sa.Rdev == sb.Rdev && sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

// Bar is one running task of the display; a nil *Bar does nothing.
type Bar struct {
	b    *mpb.Bar
	mu   sync.Mutex
	last time.Time
}

// Copy adds a bar for a file copy of total bytes: "<domain> <file>".
func (u *UI) Copy(domain, path string, total int64) *Bar {
	if u == nil {
		return nil
	}
	return u.add(fmt.Sprintf("%s %s", domain, filepath.Base(path)), total, true)
}

// Job adds a bar for a consolidation job on a disk; its total comes with
// the first update.
func (u *UI) Job(domain, disk, method string) *Bar {
	if u == nil {
		return nil
	}
	return u.add(fmt.Sprintf("%s %s %s", domain, disk, method), 0, false)
}

func (u *UI) add(label string, total int64, bytes bool) *Bar {
	counters := decor.CountersKibiByte("% .1f / % .1f")
	speed := decor.EwmaSpeed(decor.SizeB1024(0), "% .1f", 30)
	if !bytes {
		counters = decor.Percentage(decor.WCSyncSpace)
		speed = decor.Name("")
	}
	b := u.p.AddBar(total,
		mpb.PrependDecorators(decor.Name(label, decor.WCSyncSpaceR), counters),
		mpb.AppendDecorators(speed, decor.Name(" ETA "), decor.EwmaETA(decor.ET_STYLE_GO, 30)),
		mpb.BarRemoveOnComplete(),
	)
	return &Bar{b: b, last: time.Now()}
}

// Set reports done of total units.
func (b *Bar) Set(done, total int64) {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	if total > 0 {
		b.b.SetTotal(total, false)
	}
	b.b.EwmaSetCurrent(done, now.Sub(b.last))
	b.last = now
}

// Done ends the bar (it leaves the display).
func (b *Bar) Done() {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.b.SetTotal(-1, true)
}
