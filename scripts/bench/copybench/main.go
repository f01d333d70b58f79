// Command copybench runs fi-backup's copy engine (internal/copyfile) alone,
// for scripts/bench.sh: it times nothing itself, hyperfine does.
//
//	copybench SRC DST            copy one file to DST
//	copybench SRC... DIR/        copy every SRC into the existing DIR
//
// Each copy is exactly what fi-backup does for one image of a chain, minus
// the qemu-img rebase: temporary file, reflink or copy_file_range or
// read/write keeping holes, fsync, rename, directory fsync.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/fi-backup/fi-backup/internal/copyfile"
)

func main() {
	args := os.Args[1:]
	if len(args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: copybench SRC DST | copybench SRC... DIR/")
		os.Exit(2)
	}
	srcs, dst := args[:len(args)-1], args[len(args)-1]
	st, err := os.Stat(dst)
	toDir := strings.HasSuffix(dst, "/") || (err == nil && st.IsDir())
	if len(srcs) > 1 && !toDir {
		fmt.Fprintln(os.Stderr, "copybench: several sources need a directory destination")
		os.Exit(2)
	}
	ctx := context.Background()
	for _, s := range srcs {
		d := dst
		if toDir {
			d = filepath.Join(dst, filepath.Base(s))
		}
		if _, err := copyfile.Copy(ctx, s, d, copyfile.Options{}); err != nil {
			fmt.Fprintln(os.Stderr, "copybench:", err)
			os.Exit(1)
		}
	}
}
