package copyfile

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// BenchmarkCopy copies a dense 256 MiB file to a new destination (including
// the final fsync) with
// the default path and with the read/write fallback. Numbers only: nothing
// here asserts a speed.
func BenchmarkCopy(b *testing.B) {
	const size = 256 * mib
	dir := b.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	f, err := os.Create(src)
	require.NoError(b, err)
	stamped(b, f, 0, size)
	require.NoError(b, f.Sync())
	require.NoError(b, f.Close())

	for _, bc := range []struct {
		name string
		opt  Options
	}{{"default", Options{}}, {"readwrite", Options{readWriteOnly: true}}} {
		b.Run(bc.name, func(b *testing.B) {
			dst := filepath.Join(dir, "dst-"+bc.name)
			b.SetBytes(size)
			for b.Loop() {
				// Time the copy into a new file, not the unlink of
				// the previous one that the rename would do.
				b.StopTimer()
				require.NoError(b, os.RemoveAll(dst))
				b.StartTimer()
				if _, err := Copy(context.Background(), src, dst, bc.opt); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkDurableCopy copies a dense file (FI_BENCH_MIB MiB, default 256)
// with the engine as it is (writeback started while copying), without the
// writeback pacing (all of it left to the final fsync, as before), with
// Hash, and with `cp -p SRC DST && sync DST`, which is as durable. Set
// FI_BENCH_DROP_CACHES=1 (root) to drop the page cache before every run
// (not timed), so that the source is read from disk. Numbers only.
func BenchmarkDurableCopy(b *testing.B) {
	size := int64(256)
	if v := os.Getenv("FI_BENCH_MIB"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		require.NoError(b, err)
		size = n
	}
	size *= mib
	dropCaches := os.Getenv("FI_BENCH_DROP_CACHES") == "1"
	dir := b.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	f, err := os.Create(src)
	require.NoError(b, err)
	stamped(b, f, 0, size)
	require.NoError(b, f.Sync())
	require.NoError(b, f.Close())
	noPacing := func(int, int64, int64, int) error { return unix.ENOSYS }

	for _, bc := range []struct {
		name string
		run  func(dst string) error
	}{
		{"engine", func(dst string) error { _, err := Copy(context.Background(), src, dst, Options{}); return err }},
		{"engine-without-pacing", func(dst string) error {
			_, err := Copy(context.Background(), src, dst, Options{syncRange: noPacing})
			return err
		}},
		{"engine-hash", func(dst string) error {
			_, err := Copy(context.Background(), src, dst, Options{Hash: true})
			return err
		}},
		{"engine-without-pacing-hash", func(dst string) error {
			_, err := Copy(context.Background(), src, dst, Options{Hash: true, syncRange: noPacing})
			return err
		}},
		{"cp-p-sync", func(dst string) error {
			out, err := exec.Command("sh", "-c", `cp -p "$1" "$2" && sync "$2"`, "sh", src, dst).CombinedOutput()
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			dst := filepath.Join(dir, "dst-"+bc.name)
			b.SetBytes(size)
			for b.Loop() {
				b.StopTimer()
				require.NoError(b, os.RemoveAll(dst))
				unix.Sync()
				if dropCaches {
					require.NoError(b, os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o644))
				}
				b.StartTimer()
				if err := bc.run(dst); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
