package copyfile

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
	// sector is the unit of Stat_t.Blocks.
	sector = 512
	// extentSlack is the allowed allocation overshoot per data extent: one
	// 4 KiB block, in sectors.
	extentSlack = 4 * kib / sector
)

// randomBytes returns n reproducible pseudo-random bytes (no all-zero
// blocks in practice).
func randomBytes(n int64, seed byte) []byte {
	b := make([]byte, n)
	_, _ = rand.NewChaCha8([32]byte{seed}).Read(b)
	return b
}

// writeFile creates path with the given apparent size and data at the given
// offsets; everything else is a hole. The file is fsynced so that its block
// count is final.
func writeFile(t testing.TB, path string, size int64, data map[int64][]byte) {
	t.Helper()
	f, err := os.Create(path)
	require.NoError(t, err)
	defer func() { require.NoError(t, f.Close()) }()
	require.NoError(t, f.Truncate(size))
	for off, b := range data {
		_, err := f.WriteAt(b, off)
		require.NoError(t, err)
	}
	require.NoError(t, f.Sync())
}

// stamped writes n bytes of non-zero data at off, one megabyte at a time
// from a shared buffer with the offset stamped into it, so memory stays
// small and no two megabytes are equal.
func stamped(t testing.TB, f *os.File, off, n int64) {
	t.Helper()
	buf := randomBytes(mib, 7)
	for end := off + n; off < end; off += mib {
		binary.LittleEndian.PutUint64(buf, uint64(off)+1)
		_, err := f.WriteAt(buf[:min(mib, end-off)], off)
		require.NoError(t, err)
	}
}

func statOf(t testing.TB, path string) *unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	require.NoError(t, unix.Lstat(path, &st))
	return &st
}

// assertSameContent compares two files chunk by chunk, in constant memory.
func assertSameContent(t testing.TB, a, b string) {
	t.Helper()
	fa, err := os.Open(a)
	require.NoError(t, err)
	defer fa.Close()
	fb, err := os.Open(b)
	require.NoError(t, err)
	defer fb.Close()
	ba, bb := make([]byte, 4*mib), make([]byte, 4*mib)
	for off := int64(0); ; {
		na, erra := io.ReadFull(fa, ba)
		nb, errb := io.ReadFull(fb, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			assert.Failf(t, "files differ", "%s and %s differ in the 4 MiB chunk at %d (read %d and %d bytes)", a, b, off, na, nb)
			return
		}
		off += int64(na)
		if erra != nil || errb != nil {
			// Same length read, so both reached their end here (or failed).
			assert.True(t, isEnd(erra) && isEnd(errb), "reading %s: %v; reading %s: %v", a, erra, b, errb)
			return
		}
	}
}

// isEnd reports whether an io.ReadFull error means end of file.
func isEnd(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// dirNames lists the names in dir.
func dirNames(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// assertNoTemps checks that no temporary file is left in dir.
func assertNoTemps(t testing.TB, dir string) {
	t.Helper()
	for _, n := range dirNames(t, dir) {
		assert.False(t, IsTemp(n), "temporary file %s left in %s", n, dir)
	}
}

// countdownCtx is a context that reports cancellation from the (n+1)-th
// call of Err on, so a test can cancel deterministically in mid-copy.
type countdownCtx struct {
	context.Context
	left atomic.Int64
}

func newCountdownCtx(n int64) *countdownCtx {
	c := &countdownCtx{Context: context.Background()}
	c.left.Store(n)
	return c
}

func (c *countdownCtx) Err() error {
	if c.left.Add(-1) < 0 {
		return context.Canceled
	}
	return nil
}

// both runs f once with the default (fast) path and once with the
// read/write fallback forced.
func both(t *testing.T, f func(t *testing.T, opt Options)) {
	t.Run("fast", func(t *testing.T) { f(t, Options{}) })
	t.Run("readwrite", func(t *testing.T) { f(t, Options{readWriteOnly: true}) })
}

// tempDirFile returns a path named name in a fresh temporary directory.
func tempDirFile(t testing.TB, name string) string {
	return filepath.Join(t.TempDir(), name)
}
