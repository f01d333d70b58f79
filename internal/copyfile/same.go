package copyfile

import (
	"bytes"
	"errors"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// SameContent reports whether the regular files a and b hold the same
// bytes. It stops at the first difference, so files that differ (the usual
// case when it is asked) cost little; memory use is constant. Reading them
// leaves their access times alone where the kernel lets it (see
// openNoatime): a cp -p copy keeps its source's.
func SameContent(a, b string) (bool, error) {
	fa, err := openNoatime(a)
	if err != nil {
		return false, err
	}
	defer fa.Close()
	fb, err := openNoatime(b)
	if err != nil {
		return false, err
	}
	defer fb.Close()
	sa, err := fa.Stat()
	if err != nil {
		return false, err
	}
	sb, err := fb.Stat()
	if err != nil {
		return false, err
	}
	if sa.Size() != sb.Size() {
		return false, nil
	}
	ba, bb := make([]byte, bufSize), make([]byte, bufSize)
	for {
		na, ea := io.ReadFull(fa, ba)
		nb, eb := io.ReadFull(fb, bb)
		if !bytes.Equal(ba[:na], bb[:nb]) {
			return false, nil
		}
		endA, endB := isEOF(ea), isEOF(eb)
		switch {
		case ea != nil && !endA:
			return false, ea
		case eb != nil && !endB:
			return false, eb
		case endA || endB:
			return endA && endB, nil
		}
	}
}

// openNoatime opens path for reading without updating its access time on
// reads (O_NOATIME), which the kernel allows the file's owner and root; for
// other files it opens it plainly.
func openNoatime(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOATIME, 0)
	if errors.Is(err, unix.EPERM) {
		f, err = os.Open(path)
	}
	return f, err
}

func isEOF(err error) bool { return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) }
