package qcow2

import (
	"context"
	"encoding/json"
	"strconv"
	"strings"
)

// Check runs `qemu-img check` on one image alone (its backing chain is not
// opened, so a file can be checked wherever its backing reference points).
// Formats without checks (raw) pass.
func (t Tool) Check(ctx context.Context, path, format string) error {
	if format == "raw" {
		return nil
	}
	if format == "" {
		format = "qcow2"
	}
	_, err := t.run(ctx, "check", "-U", ImageOpts(format, path, nil))
	return err
}

// ImageOpts is a json: image name for qemu-img that opens path with the
// given format and, instead of the backing reference stored in its header,
// the explicit chain below it (paths with formats, top first; none: no
// backing file at all). It reads a chain from the backup directory alone,
// whatever its headers say.
func ImageOpts(format, path string, below []Image) string {
	b, _ := json.Marshal(imageOpts(format, path, below))
	return "json:" + string(b)
}

func imageOpts(format, path string, below []Image) map[string]any {
	o := map[string]any{
		"driver": format,
		"file":   map[string]any{"driver": "file", "filename": path},
	}
	if format == "qcow2" {
		if len(below) == 0 {
			o["backing"] = nil
		} else {
			o["backing"] = imageOpts(formatOr(below[0].Format), below[0].Path, below[1:])
		}
	}
	return o
}

// Convert flattens a chain (top first) into one standalone, sparse qcow2
// file at dst (`qemu-img convert -O qcow2`), reading only the given files,
// at most rate bytes/s when rate > 0.
func (t Tool) Convert(ctx context.Context, chain []Image, dst string, rate int64) error {
	if len(chain) == 0 {
		return nil
	}
	args := []string{"convert", "-O", "qcow2"}
	if rate > 0 {
		args = append(args, "-r", strconv.FormatInt(rate, 10))
	}
	_, err := t.run(ctx, append(args, ImageOpts(formatOr(chain[0].Format), chain[0].Path, chain[1:]), dst)...)
	return err
}

func formatOr(f string) string {
	if strings.TrimSpace(f) == "" {
		return "qcow2"
	}
	return f
}

// Commit writes the data of every layer of chain (top first) except the
// last into the last one, the base (`qemu-img commit -d`), at most rate
// bytes/s when rate > 0. The chain is named explicitly, so only the given
// files are read and written whatever their headers reference; the layers
// above the base are left as they were.
func (t Tool) Commit(ctx context.Context, chain []Image, rate int64) error {
	if len(chain) < 2 {
		return nil
	}
	args := []string{"commit", "-q", "-d", "-b", chain[len(chain)-1].Path}
	if rate > 0 {
		args = append(args, "-r", strconv.FormatInt(rate, 10))
	}
	_, err := t.run(ctx, append(args, ImageOpts(formatOr(chain[0].Format), chain[0].Path, chain[1:]))...)
	return err
}
