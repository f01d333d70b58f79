package statedump

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// QMPError is a command QEMU rejected: the reply carried a top-level
// "error" member. libvirt hands such replies back as plain text with no
// libvirt error, so they must be found by parsing.
type QMPError struct {
	Class string // e.g. "GenericError"
	Desc  string // QEMU's human-readable description
}

func (e *QMPError) Error() string {
	if e.Class == "" {
		return e.Desc
	}
	return e.Desc + " (" + e.Class + ")"
}

// ErrBadReply marks a reply that is not a QMP response at all.
var ErrBadReply = errors.New("unexpected QMP reply")

// ParseReply reads a QMP response as libvirt returns it, e.g.
// {"return":{...},"id":"libvirt-42"} or
// {"id":"libvirt-42","error":{"class":"GenericError","desc":"..."}}.
// It returns the "return" member, a *QMPError when QEMU rejected the
// command, or an error wrapping ErrBadReply when the text is neither.
func ParseReply(reply string) (json.RawMessage, error) {
	var r struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(reply), &r); err != nil {
		return nil, fmt.Errorf("%w: %q: %v", ErrBadReply, shorten(reply), err)
	}
	if r.Error != nil {
		desc := r.Error.Desc
		if desc == "" {
			desc = "QEMU rejected the command"
		}
		return nil, &QMPError{Class: r.Error.Class, Desc: desc}
	}
	if len(r.Return) == 0 || string(r.Return) == "null" {
		return nil, fmt.Errorf("%w: %q has neither \"return\" nor \"error\"", ErrBadReply, shorten(reply))
	}
	return r.Return, nil
}

// Migration is the part of a query-migrate reply the dump looks at.
type Migration struct {
	// Status is QEMU's MigrationStatus: "none", "setup", "active",
	// "pre-switchover", "device", "cancelling", "cancelled", "failed",
	// "completed", ... ("none" when QEMU reported no status: no
	// migration ever ran).
	Status string `json:"status"`
	// ErrorDesc is QEMU's reason for a "failed" migration.
	ErrorDesc string `json:"error-desc"`
	// Downtime is QEMU's own measure (ms) of how long the guest was
	// stopped for the final stop-and-copy phase; set once completed.
	Downtime *int64 `json:"downtime"`
	// TotalTime is the migration's duration so far (ms).
	TotalTime *int64 `json:"total-time"`
	RAM       *struct {
		Transferred int64 `json:"transferred"`
		Total       int64 `json:"total"`
	} `json:"ram"`
}

// ParseMigration parses a query-migrate reply.
func ParseMigration(reply string) (Migration, error) {
	ret, err := ParseReply(reply)
	if err != nil {
		return Migration{}, err
	}
	var m Migration
	if err := json.Unmarshal(ret, &m); err != nil {
		return Migration{}, fmt.Errorf("%w: query-migrate returned %s: %v", ErrBadReply, shorten(string(ret)), err)
	}
	if m.Status == "" {
		m.Status = "none"
	}
	return m, nil
}

// Terminal reports whether the migration has ended (or never ran): no QEMU
// migration thread is using the stream any more.
func (m Migration) Terminal() bool {
	switch m.Status {
	case "none", "completed", "failed", "cancelled":
		return true
	}
	return false
}

// command renders a QMP command with optional arguments.
func command(name string, args any) string {
	c := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
	}{name, args}
	b, err := json.Marshal(c)
	if err != nil {
		panic(err) // only fixed, marshalable argument types are used
	}
	return string(b)
}

func shorten(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 200 {
		return s[:200] + "…"
	}
	return s
}
