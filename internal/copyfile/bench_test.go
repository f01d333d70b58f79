package copyfile

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
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
