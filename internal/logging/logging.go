// Package logging prints the old fi-backup.sh message lines: "[ERR] ",
// "[WAR] ", "[INF] ", "[VER] " and "[DEB] " prefixes, all on one writer
// (stdout in the real program, because wrapper scripts of the old tool read
// stdout for errors too).
//
// Unlike the script, text is printed verbatim: the script ran every line
// through `echo -e`, which mangled backslashes in paths and domain names (B19).
package logging

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"sync"
)

// Printer writes prefixed lines. It is safe for concurrent use; each call
// writes one whole message at once so lines of different goroutines never
// interleave.
//
// Writing must never stop the tool at a bad moment: while a guest is paused
// (the -s dump), a full pipe would block the resume and a closed one would
// kill the process. So output can be held (Hold) and is written when the
// last hold is released, and a failed write (EPIPE: the reader went away)
// is remembered instead of retried: the tool keeps going and reports
// WriteErr at the end.
type Printer struct {
	mu      sync.Mutex
	w       io.Writer
	verbose bool
	debug   bool
	held    int    // active holds
	pending []byte // output written while held
	werr    error  // first write error; nothing is written after it
	tap     func(prefix, msg string)
	buf     bytes.Buffer // a buffered child's lines (see Child)
}

// New returns a Printer writing to w. verbose enables [VER] lines, debug
// enables [DEB] lines (the command line sets verbose too when -d is given).
func New(w io.Writer, verbose, debug bool) *Printer {
	return &Printer{w: w, verbose: verbose, debug: debug}
}

// Verbose reports whether [VER] lines are shown.
func (p *Printer) Verbose() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.verbose
}

// Debugging reports whether [DEB] lines are shown.
func (p *Printer) Debugging() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.debug
}

// SetTap makes tap see every line the printer prints from now on.
func (p *Printer) SetTap(tap func(prefix, msg string)) {
	p.mu.Lock()
	p.tap = tap
	p.mu.Unlock()
}

func (p *Printer) line(prefix, msg string) {
	p.mu.Lock()
	tap := p.tap
	p.mu.Unlock()
	if tap != nil {
		tap(prefix, msg)
	}
	var b strings.Builder
	b.WriteString(prefix)
	b.WriteString(msg)
	b.WriteByte('\n')
	p.write(b.String())
}

func (p *Printer) write(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.held > 0 {
		p.pending = append(p.pending, s...)
		return
	}
	p.writeLocked(s)
}

func (p *Printer) writeLocked(s string) {
	if p.werr != nil || s == "" {
		return
	}
	if _, err := io.WriteString(p.w, s); err != nil {
		p.werr = err
	}
}

// Hold keeps everything printed from now on in memory until the returned
// release function is called (once; later calls do nothing). Holds nest:
// the output is written, in order, when the last one is released.
func (p *Printer) Hold() (release func()) {
	p.mu.Lock()
	p.held++
	p.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			p.mu.Lock()
			defer p.mu.Unlock()
			p.held--
			if p.held == 0 {
				out := string(p.pending)
				p.pending = nil
				p.writeLocked(out)
			}
		})
	}
}

// WriteErr is the first error writing the output (e.g. a closed pipe), or
// nil. Output after that error is dropped.
func (p *Printer) WriteErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.werr
}

// Err prints an [ERR] line; always shown.
func (p *Printer) Err(format string, a ...any) { p.line("[ERR] ", fmt.Sprintf(format, a...)) }

// Warn prints a [WAR] line; always shown.
func (p *Printer) Warn(format string, a ...any) { p.line("[WAR] ", fmt.Sprintf(format, a...)) }

// Info prints an [INF] line; always shown.
func (p *Printer) Info(format string, a ...any) { p.line("[INF] ", fmt.Sprintf(format, a...)) }

// Verb prints a [VER] line when verbose output is on.
func (p *Printer) Verb(format string, a ...any) {
	if p.Verbose() {
		p.line("[VER] ", fmt.Sprintf(format, a...))
	}
}

// Debug prints a [DEB] line when debug output is on.
func (p *Printer) Debug(format string, a ...any) {
	if p.Debugging() {
		p.line("[DEB] ", fmt.Sprintf(format, a...))
	}
}

// ChainWalk prints the old tool's debug lines of a backing-chain walk: for
// the chain top, parent, grandparent, … (paths) it named each file from the
// grandparent down, then an empty name where the chain ended.
func (p *Printer) ChainWalk(paths []string) {
	if len(paths) < 2 {
		return
	}
	for _, f := range paths[2:] {
		p.Debug("Next file in backing file chain: '%s'", f)
	}
	p.Debug("Next file in backing file chain: ''")
}

// Raw writes s as it is (used for the usage text).
func (p *Printer) Raw(s string) { p.write(s) }

// SetLevels changes which optional levels are shown (options are acted on
// in command-line order, so -d may arrive after the Printer exists).
func (p *Printer) SetLevels(verbose, debug bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.verbose, p.debug = verbose, debug
}

// Child is a Printer with p's levels for one part of the run (a domain):
// with buffered false its lines go through p as they come; with buffered
// true they are kept until Flush, which writes them through p in one piece,
// so that parts running at once never interleave their lines. tap, when
// set, sees every line the child prints (prefix and message).
func (p *Printer) Child(buffered bool, tap func(prefix, msg string)) *Printer {
	c := &Printer{verbose: p.Verbose(), debug: p.Debugging(), tap: tap}
	if buffered {
		c.w = &c.buf
	} else {
		c.w = parentWriter{p}
	}
	return c
}

// Flush writes what a buffered child kept through its parent, at once.
func (p *Printer) Flush(parent *Printer) {
	p.mu.Lock()
	out := p.buf.String()
	p.buf.Reset()
	p.mu.Unlock()
	parent.write(out)
}

// parentWriter writes a child's lines through its parent, which keeps its
// hold and write-error rules for them.
type parentWriter struct{ p *Printer }

func (w parentWriter) Write(b []byte) (int, error) {
	w.p.write(string(b))
	return len(b), nil
}
