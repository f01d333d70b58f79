// Package qcow2 reads and rewrites the headers of qcow2 images natively: the
// backing reference (BackingFile), a rewrite of it that is byte for byte what
// `qemu-img rebase -u` writes (SetBacking), and the walk of a backing chain
// as `qemu-img info --backing-chain` lists it (Chain). Tool still runs
// qemu-img for the callers that use it.
package qcow2

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
)

// BackingFile returns the backing file name stored in a qcow2 header,
// exactly as stored (relative or absolute; like QEMU, up to a NUL byte if
// it holds one); "" when there is none. The header is checked as QEMU
// checks it when it opens the image: ErrNotQcow2 for a file without the
// qcow2 magic, an error for a header QEMU would refuse.
func BackingFile(path string) (string, error) {
	h, err := readHeader(path)
	if err != nil {
		if errors.Is(err, ErrNotQcow2) {
			return "", err
		}
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return h.backingFile, nil
}

// Tool runs qemu-img.
type Tool struct {
	Path string // qemu-img binary
}

func (t Tool) run(ctx context.Context, args ...string) ([]byte, error) {
	return t.runIn(ctx, "", args...)
}

// runIn runs qemu-img in dir ("": the current directory).
func (t Tool) runIn(ctx context.Context, dir string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, t.Path, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	// A qemu-img writing a backup file (a retention merge) must not go on
	// alone when fi-backup is killed: the next run redoes its work.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return out, fmt.Errorf("qemu-img %s: %s", args[0], msg)
	}
	return out, nil
}

// Rebase rewrites image's backing reference to backing (format fmt) without
// touching data (`qemu-img rebase -u`).
func (t Tool) Rebase(ctx context.Context, image, backing, format string) error {
	args := []string{"rebase", "-u", "-f", "qcow2", "-b", backing}
	if format != "" {
		args = append(args, "-F", format)
	}
	_, err := t.run(ctx, append(args, image)...)
	return err
}

// Image is one element of a chain from qemu-img.
type Image struct {
	Path   string // absolute
	Format string
}

// Chain walks image's backing chain with qemu-img (-U: the image may be in
// use). A missing link is an error, never a shorter chain.
func (t Tool) Chain(ctx context.Context, image string) ([]Image, error) {
	abs, err := filepath.Abs(image)
	if err != nil {
		return nil, err
	}
	out, err := t.run(ctx, "info", "--backing-chain", "--output=json", "-U", abs)
	if err != nil {
		return nil, err
	}
	return parseChain(out)
}

type infoJSON struct {
	Filename            string `json:"filename"`
	Format              string `json:"format"`
	BackingFilename     string `json:"backing-filename"`
	FullBackingFilename string `json:"full-backing-filename"`
}

func parseChain(out []byte) ([]Image, error) {
	var infos []infoJSON
	if err := json.Unmarshal(out, &infos); err != nil {
		return nil, fmt.Errorf("parse qemu-img info output: %w", err)
	}
	if len(infos) == 0 {
		return nil, errors.New("qemu-img info returned no image")
	}
	chain := make([]Image, 0, len(infos))
	for i, in := range infos {
		chain = append(chain, Image{Path: in.Filename, Format: in.Format})
		if in.BackingFilename != "" && i == len(infos)-1 {
			return nil, fmt.Errorf("backing file %q of %q is missing", in.BackingFilename, in.Filename)
		}
	}
	return chain, nil
}

var versionRE = regexp.MustCompile(`(?m)^qemu-img version ([^ \n]+)`)

// Version returns the version qemu-img prints, e.g. "7.2.22".
func Version(path string) (string, error) {
	out, err := exec.Command(path, "--version").Output()
	if err != nil {
		return "", err
	}
	m := versionRE.FindSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("no version in %q", firstLine(out))
	}
	return strings.TrimRight(string(m[1]), ","), nil
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(string(b), "\n")
	return s
}
