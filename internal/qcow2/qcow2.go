// Package qcow2 reads the backing reference of qcow2 images natively and
// uses qemu-img for what must stay byte-exact with QEMU: rewriting a backing
// reference (`qemu-img rebase -u`) and walking chains of files that no
// running domain describes (`qemu-img info --backing-chain --output=json -U`).
package qcow2

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
)

var magic = []byte{'Q', 'F', 'I', 0xfb}

// ErrNotQcow2 means the file has no qcow2 header (a raw image, say).
var ErrNotQcow2 = errors.New("not a qcow2 image")

// BackingFile returns the backing file name stored in a qcow2 header,
// exactly as stored (relative or absolute); "" when there is none.
func BackingFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var hdr [20]byte
	if _, err := io.ReadFull(f, hdr[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return "", ErrNotQcow2
		}
		return "", err
	}
	if !bytes.Equal(hdr[:4], magic) {
		return "", ErrNotQcow2
	}
	off := binary.BigEndian.Uint64(hdr[8:16])
	size := binary.BigEndian.Uint32(hdr[16:20])
	if off == 0 || size == 0 {
		return "", nil
	}
	if size > 4096 { // QEMU's own limit is 1023
		return "", fmt.Errorf("%s: backing file name of %d bytes is implausible", path, size)
	}
	name := make([]byte, size)
	if _, err := f.ReadAt(name, int64(off)); err != nil {
		return "", fmt.Errorf("%s: read backing file name: %w", path, err)
	}
	return string(name), nil
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
