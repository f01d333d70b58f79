package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
)

// VirtualSize is the size of the disk an image holds: the qcow2 header's
// size field, or a raw file's own size. format is "qcow2" or "raw".
func VirtualSize(path string) (format string, size int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	var hdr [32]byte
	n, err := io.ReadFull(f, hdr[:])
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return "", 0, err
	}
	if n >= len(hdr) && bytes.Equal(hdr[:4], magic) {
		return "qcow2", int64(binary.BigEndian.Uint64(hdr[24:32])), nil
	}
	st, err := f.Stat()
	if err != nil {
		return "", 0, err
	}
	return "raw", st.Size(), nil
}
