package copyfile

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/qcow2"
)

// sha256sum runs the real sha256sum on path.
func sha256sum(t testing.TB, path string) string {
	t.Helper()
	out, err := exec.Command("sha256sum", path).Output()
	require.NoError(t, err)
	sum, _, ok := strings.Cut(string(out), " ")
	require.True(t, ok, "sha256sum printed %q", out)
	return sum
}

// hashCases are files to hash: dense, sparse, holes only, empty, odd sizes.
var hashCases = []struct {
	name string
	size int64
	data map[int64][]byte
}{
	{"empty", 0, nil},
	{"small", 11, map[int64][]byte{0: []byte("hello world")}},
	{"dense, odd size", 3*mib + 1234, map[int64][]byte{0: randomBytes(3*mib+1234, 21)}},
	{"only a hole", 5*mib + 7, nil},
	{"sparse: data, holes, trailing hole", 64 * mib, map[int64][]byte{
		0:        randomBytes(mib+123, 22),
		8 * mib:  randomBytes(mib+77, 23),
		40 * mib: randomBytes(2*mib+1, 24),
	}},
	{"sparse: leading hole, data at the end", 9*mib + 3, map[int64][]byte{7 * mib: randomBytes(2*mib+3, 25)}},
}

// TestCopyHash: Stats.SHA256 is what sha256sum prints for the copy, with
// copy_file_range and with the read/write fallback, on dense and sparse
// files; HashFile agrees.
func TestCopyHash(t *testing.T) {
	t.Parallel()
	for _, tc := range hashCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			src := tempDirFile(t, "src.qcow2")
			writeFile(t, src, tc.size, tc.data)
			both(t, func(t *testing.T, opt Options) {
				opt.Hash = true
				dst := tempDirFile(t, "dst.qcow2")
				stats, err := Copy(context.Background(), src, dst, opt)
				require.NoError(t, err)
				assertSameContent(t, src, dst)
				want := sha256sum(t, dst)
				assert.Equal(t, want, stats.SHA256)
				got, err := HashFile(dst)
				require.NoError(t, err)
				assert.Equal(t, want, got)
			})
		})
	}
}

// TestCopyWithoutHash: no hash unless asked for.
func TestCopyWithoutHash(t *testing.T) {
	t.Parallel()
	src := tempDirFile(t, "src")
	require.NoError(t, os.WriteFile(src, []byte("data"), 0o644))
	stats, err := Copy(context.Background(), src, tempDirFile(t, "dst"), Options{})
	require.NoError(t, err)
	assert.Empty(t, stats.SHA256)
}

// TestCopyHashAfterPrepare: the hash covers what Prepare changed (here the
// first bytes, as a header rewrite does, and a longer file), not the
// source's bytes.
func TestCopyHashAfterPrepare(t *testing.T) {
	t.Parallel()
	src := tempDirFile(t, "src")
	writeFile(t, src, 16*mib, map[int64][]byte{0: randomBytes(mib, 26), 10 * mib: randomBytes(mib, 27)})
	both(t, func(t *testing.T, opt Options) {
		opt.Hash = true
		opt.Prepare = func(tmp string) error {
			f, err := os.OpenFile(tmp, os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			if _, err := f.WriteAt([]byte("a new header"), 0); err != nil {
				return err
			}
			_, err = f.WriteAt([]byte("and a tail"), 20*mib)
			return err
		}
		dst := tempDirFile(t, "dst")
		stats, err := Copy(context.Background(), src, dst, opt)
		require.NoError(t, err)
		assert.Equal(t, sha256sum(t, dst), stats.SHA256)
		assert.NotEqual(t, sha256sum(t, src), stats.SHA256)
	})
}

// TestCopyHashPrepareHead: with PrepareHead, Prepare runs once the head
// is copied and before anything past it is (the temporary file is no
// longer than the head then, and holds the source's bytes there), or after
// the whole copy for a file no longer than the head; either way the hash
// is the copy's as Prepare left it, on dense and sparse files, with
// copy_file_range and with the read/write fallback.
func TestCopyHashPrepareHead(t *testing.T) {
	t.Parallel()
	for _, tc := range hashCases {
		for _, head := range []int64{64 << 10, 2 * mib} {
			t.Run(tc.name+"/head "+strconv.FormatInt(head, 10), func(t *testing.T) {
				t.Parallel()
				src := tempDirFile(t, "src")
				writeFile(t, src, tc.size, tc.data)
				srcData, err := os.ReadFile(src)
				require.NoError(t, err)
				both(t, func(t *testing.T, opt Options) {
					opt.Hash, opt.PrepareHead = true, head
					calls := 0
					opt.Prepare = func(tmp string) error {
						calls++
						got, err := os.ReadFile(tmp)
						if err != nil {
							return err
						}
						if tc.size > head {
							assert.LessOrEqual(t, int64(len(got)), head, "nothing past the head is copied before Prepare")
						} else {
							assert.Len(t, got, int(tc.size), "a file no longer than the head is complete")
						}
						assert.Equal(t, srcData[:len(got)], got)
						f, err := os.OpenFile(tmp, os.O_RDWR, 0)
						if err != nil {
							return err
						}
						defer f.Close()
						_, err = f.WriteAt([]byte("a new header"), 0)
						return err
					}
					dst := tempDirFile(t, "dst")
					stats, err := Copy(context.Background(), src, dst, opt)
					require.NoError(t, err)
					assert.Equal(t, 1, calls)
					want := append([]byte(nil), srcData...)
					if len(want) < len("a new header") {
						want = append(want, make([]byte, len("a new header")-len(want))...)
					}
					copy(want, "a new header")
					got, err := os.ReadFile(dst)
					require.NoError(t, err)
					assert.Equal(t, want, got)
					assert.Equal(t, sha256sum(t, dst), stats.SHA256)
				})
			})
		}
	}
}

// TestCopyHashQcow2Rebased: the way fi-backup copies an overlay, its
// backing reference rewritten by qcow2.SetBacking in Prepare.
func TestCopyHashQcow2Rebased(t *testing.T) {
	t.Parallel()
	host := t.TempDir()
	base, top := filepath.Join(host, "base.qcow2"), filepath.Join(host, "top.qcow2")
	for _, args := range [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", base, "64M"},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top},
		{"qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", top},
	} {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		require.NoError(t, err, "%v: %s", args, out)
	}
	dst := tempDirFile(t, "top.qcow2")
	stats, err := Copy(context.Background(), top, dst, Options{Hash: true, Preserve: true, Prepare: func(tmp string) error {
		return qcow2.SetBacking(tmp, "base.qcow2", "qcow2")
	}})
	require.NoError(t, err)
	b, err := qcow2.BackingFile(dst)
	require.NoError(t, err)
	assert.Equal(t, "base.qcow2", b)
	assert.Equal(t, sha256sum(t, dst), stats.SHA256)
}

// TestCopyHashKeepsAtime: hashing the copy reads it after cp -p set its
// times; the access time must stay the source's.
func TestCopyHashKeepsAtime(t *testing.T) {
	t.Parallel()
	both(t, func(t *testing.T, opt Options) {
		opt.Hash, opt.Preserve = true, true
		src := tempDirFile(t, "src")
		writeFile(t, src, 4*mib, map[int64][]byte{mib: randomBytes(mib, 28)})
		// atime before mtime: relatime would update it on any read.
		atime, mtime := time.Unix(1600000000, 123456789), time.Unix(1650000000, 987654321)
		require.NoError(t, os.Chtimes(src, atime, mtime))
		dst := tempDirFile(t, "dst")
		_, err := Copy(context.Background(), src, dst, opt)
		require.NoError(t, err)
		st := statOf(t, dst)
		assert.Equal(t, atime.UnixNano(), st.Atim.Nano())
		assert.Equal(t, mtime.UnixNano(), st.Mtim.Nano())
	})
}

// TestCopyHashCancelled: a context cancelled once the data is written
// (here by Prepare) stops the copy, hash or not, and leaves nothing.
func TestCopyHashCancelled(t *testing.T) {
	t.Parallel()
	src := tempDirFile(t, "src")
	writeFile(t, src, 8*mib, map[int64][]byte{0: randomBytes(8*mib, 29)})
	dir := t.TempDir()
	dst := filepath.Join(dir, "dst")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stats, err := Copy(ctx, src, dst, Options{Hash: true, Prepare: func(string) error {
		cancel()
		return nil
	}})
	assert.ErrorIs(t, err, context.Canceled)
	assert.Empty(t, stats.SHA256)
	assert.Empty(t, dirNames(t, dir))
}

// TestHashFDCancelled: the hash itself stops at a cancelled context, and
// its reader has ended when it returns.
func TestHashFDCancelled(t *testing.T) {
	t.Parallel()
	p := tempDirFile(t, "f")
	writeFile(t, p, 8*mib, map[int64][]byte{0: randomBytes(8*mib, 30)})
	fd, err := syscall.Open(p, syscall.O_RDONLY, 0)
	require.NoError(t, err)
	defer syscall.Close(fd)
	_, err = hashFD(newCountdownCtx(2), fd, finished(8*mib))
	assert.ErrorIs(t, err, context.Canceled)
}

// TestHashFile compares HashFile with sha256sum on dense and sparse files.
func TestHashFile(t *testing.T) {
	t.Parallel()
	for _, tc := range hashCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := tempDirFile(t, "f")
			writeFile(t, p, tc.size, tc.data)
			got, err := HashFile(p)
			require.NoError(t, err)
			assert.Equal(t, sha256sum(t, p), got)
		})
	}
}

// TestHashFileErrors: a missing file and a directory.
func TestHashFileErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	_, err := HashFile(filepath.Join(dir, "missing"))
	assert.ErrorIs(t, err, os.ErrNotExist)
	_, err = HashFile(dir)
	assert.ErrorContains(t, err, "not a regular file")
}

// TestHashFileSkipsHoles: a 256 MiB file holding 1 MiB of data is hashed
// reading about 1 MiB, not 256 (the bytes the process reads, from
// /proc/self/io; not parallel, so nothing else of this test binary reads
// meanwhile).
func TestHashFileSkipsHoles(t *testing.T) {
	p := tempDirFile(t, "sparse")
	writeFile(t, p, 256*mib, map[int64][]byte{100 * mib: randomBytes(mib, 31)})
	before := readChars(t)
	got, err := HashFile(p)
	require.NoError(t, err)
	read := readChars(t) - before
	assert.Equal(t, sha256sum(t, p), got)
	assert.Less(t, read, 8*mib, "HashFile read %d bytes of a file with 1 MiB of data", read)
}

// readChars is rchar of /proc/self/io: bytes this process got from read
// system calls.
func readChars(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/io")
	require.NoError(t, err)
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "rchar:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			require.NoError(t, err)
			return n
		}
	}
	t.Fatal("no rchar in /proc/self/io")
	return 0
}

// TestStartHashKeepsAtime: the hash of a copy does not move its access
// time, even when relatime would (atime older than mtime): cp -p has set
// the source's times on the copy by the time the hash reads it.
func TestStartHashKeepsAtime(t *testing.T) {
	t.Parallel()
	p := tempDirFile(t, "f")
	writeFile(t, p, 2*mib, map[int64][]byte{0: randomBytes(2*mib, 32)})
	atime, mtime := time.Unix(1600000000, 5), time.Unix(1650000000, 7)
	require.NoError(t, os.Chtimes(p, atime, mtime))
	fd, err := syscall.Open(p, syscall.O_RDWR, 0)
	require.NoError(t, err)
	defer syscall.Close(fd)
	h, err := startHash(context.Background(), fd, finished(2*mib))
	require.NoError(t, err)
	sum, err := h.wait()
	require.NoError(t, err)
	assert.Equal(t, atime.UnixNano(), statOf(t, p).Atim.Nano())
	assert.Equal(t, sha256sum(t, p), sum) // reading moves the atime: last
}

// TestCopyHashFollowsAFailingCopy: when the copy that the hash follows
// fails halfway (cancelled, a writeback error), the hash stops too and the
// copy fails as it would without it, leaving nothing.
func TestCopyHashFollowsAFailingCopy(t *testing.T) {
	t.Parallel()
	src := tempDirFile(t, "src")
	writeFile(t, src, 64*mib, map[int64][]byte{0: randomBytes(20*mib, 33), 40 * mib: randomBytes(20*mib, 34)})
	both(t, func(t *testing.T, opt Options) {
		opt.Hash = true
		for _, tc := range []struct {
			name string
			ctx  context.Context
			sync syncRangeFunc
			want error
		}{
			{"cancelled", newCountdownCtx(3), nil, context.Canceled},
			{"writeback error", context.Background(), (&syncRecorder{failAt: 2, failErr: syscall.EIO}).sync, syscall.EIO},
		} {
			opt.syncRange = tc.sync
			dir := t.TempDir()
			stats, err := Copy(tc.ctx, src, filepath.Join(dir, "dst"), opt)
			assert.ErrorIs(t, err, tc.want, tc.name)
			assert.Empty(t, stats.SHA256, tc.name)
			assert.Empty(t, dirNames(t, dir), tc.name)
		}
	})
}

// TestCopyHashRateLimited: a hash that follows a slow copy waits for it
// and is still exact.
func TestCopyHashRateLimited(t *testing.T) {
	t.Parallel()
	src := tempDirFile(t, "src")
	writeFile(t, src, 32*mib, map[int64][]byte{mib: randomBytes(3*mib, 35), 20 * mib: randomBytes(mib, 36)})
	dst := tempDirFile(t, "dst")
	stats, err := Copy(context.Background(), src, dst, Options{Hash: true, Limit: NewLimiter(64 << 20)})
	require.NoError(t, err)
	assert.Equal(t, sha256sum(t, dst), stats.SHA256)
}
