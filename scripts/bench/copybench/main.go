// Command copybench runs fi-backup's copy engine (internal/copyfile) alone,
// for scripts/bench.sh: it times nothing itself, the script does.
//
//	copybench [-p] [-hash] SRC DST            copy one file to DST
//	copybench [-p] [-hash] SRC... DIR/        copy every SRC into the existing DIR
//
// Each copy is exactly what fi-backup does for one image of a chain, minus
// the backing-reference rewrite: temporary file, reflink or
// copy_file_range or read/write keeping holes, writeback while copying,
// fsync, rename, directory fsync. -p keeps mode, owner and times (cp -p);
// -hash also computes the SHA-256 of the copy, as fi-backup does for its
// manifests, and prints it.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/fi-backup/fi-backup/internal/copyfile"
)

func main() {
	preserve := flag.Bool("p", false, "keep mode, owner and times (cp -p)")
	hash := flag.Bool("hash", false, "compute and print the SHA-256 of each copy")
	flag.Parse()
	args := flag.Args()
	if len(args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: copybench [-p] [-hash] SRC DST | copybench [-p] [-hash] SRC... DIR/")
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
		stats, err := copyfile.Copy(ctx, s, d, copyfile.Options{Preserve: *preserve, Hash: *hash})
		if err != nil {
			fmt.Fprintln(os.Stderr, "copybench:", err)
			os.Exit(1)
		}
		if *hash {
			fmt.Printf("%s  %s\n", stats.SHA256, d)
		}
	}
}
