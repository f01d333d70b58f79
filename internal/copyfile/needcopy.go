package copyfile

import (
	"fmt"
	"os"
)

// Reasons returned by NeedCopy, for a debug line.
const (
	ReasonMissing  = "destination missing"
	ReasonNewer    = "source newer than destination"
	ReasonUpToDate = "destination is up to date"
)

// NeedCopy implements the decision of `cp -u`: copy when the destination is
// missing (dst == nil) or when the source's mtime is later than the
// destination's. Mtimes are compared at nanosecond precision, so equal mtimes
// mean "up to date" and a source newer by 1 ns is copied, as with GNU cp on
// file systems with nanosecond timestamps.
//
// A source or destination that is not a regular file is an error: replacing a
// directory (or a device) with an image file is never what the caller meant.
func NeedCopy(src, dst os.FileInfo) (need bool, reason string, err error) {
	if src == nil {
		return false, "", fmt.Errorf("need copy: no source file info")
	}
	if !src.Mode().IsRegular() {
		return false, "", fmt.Errorf("need copy: source %s is not a regular file (%s)", src.Name(), src.Mode().Type())
	}
	if dst == nil {
		return true, ReasonMissing, nil
	}
	if !dst.Mode().IsRegular() {
		return false, "", fmt.Errorf("need copy: destination %s is not a regular file (%s)", dst.Name(), dst.Mode().Type())
	}
	if src.ModTime().After(dst.ModTime()) {
		return true, ReasonNewer, nil
	}
	return false, ReasonUpToDate, nil
}
