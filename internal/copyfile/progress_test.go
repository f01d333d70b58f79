package copyfile

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestCopyProgress checks that Options.Progress climbs, never goes back,
// skips the holes and ends at the source's data: what a progress bar whose
// total is the allocated size needs.
func TestCopyProgress(t *testing.T) {
	t.Parallel()
	both(t, func(t *testing.T, opt Options) {
		const size = 96 * mib
		data := map[int64][]byte{
			0:        randomBytes(mib+123, 2),
			8 * mib:  randomBytes(40*mib, 3), // more than one chunk
			80 * mib: randomBytes(2*mib+1, 4),
		}
		var dataLen int64
		for _, b := range data {
			dataLen += int64(len(b))
		}
		src := tempDirFile(t, "src.qcow2")
		writeFile(t, src, size, data)
		dst := tempDirFile(t, "dst.qcow2")

		var seen []int64
		opt.Progress = func(done int64) { seen = append(seen, done) }
		stats, err := Copy(context.Background(), src, dst, opt)
		require.NoError(t, err)
		require.NotEmpty(t, seen)
		last := seen[len(seen)-1]
		if stats.Reflinked {
			assert.Equal(t, []int64{size}, seen)
			return
		}
		assert.IsNonDecreasing(t, seen)
		assert.Greater(t, len(seen), 2, "one report per chunk at least")
		// SEEK_DATA works in blocks: an extent may be reported up to the
		// end of its last block.
		assert.GreaterOrEqual(t, last, dataLen)
		assert.LessOrEqual(t, last, dataLen+int64(len(data))*4*kib)
	})
}
