package copyfile

import (
	"io/fs"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// fileInfo is a minimal os.FileInfo for NeedCopy.
type fileInfo struct {
	name  string
	mode  fs.FileMode
	mtime time.Time
}

func (fi fileInfo) Name() string       { return fi.name }
func (fi fileInfo) Size() int64        { return 0 }
func (fi fileInfo) Mode() fs.FileMode  { return fi.mode }
func (fi fileInfo) ModTime() time.Time { return fi.mtime }
func (fi fileInfo) IsDir() bool        { return fi.mode.IsDir() }
func (fi fileInfo) Sys() any           { return nil }

func TestNeedCopy(t *testing.T) {
	t.Parallel()
	base := time.Date(2024, 5, 1, 12, 0, 0, 123456789, time.UTC)
	file := func(mtime time.Time) os.FileInfo { return fileInfo{name: "f", mode: 0o644, mtime: mtime} }
	src := file(base)
	tests := []struct {
		name     string
		src, dst os.FileInfo
		need     bool
		reason   string
		wantErr  bool
	}{
		{"destination missing", src, nil, true, ReasonMissing, false},
		{"source newer by 2s", src, file(base.Add(-2 * time.Second)), true, ReasonNewer, false},
		{"destination newer", src, file(base.Add(time.Second)), false, ReasonUpToDate, false},
		{"equal mtime", src, file(base), false, ReasonUpToDate, false},
		{"source newer by 1ns", src, file(base.Add(-time.Nanosecond)), true, ReasonNewer, false},
		{"destination is a directory", src, fileInfo{name: "d", mode: fs.ModeDir | 0o755, mtime: base.Add(-time.Hour)}, false, "", true},
		{"source is a directory", fileInfo{name: "d", mode: fs.ModeDir | 0o755, mtime: base}, nil, false, "", true},
		{"source nil", nil, nil, false, "", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			need, reason, err := NeedCopy(tc.src, tc.dst, time.Nanosecond)
			if tc.wantErr {
				assert.Error(t, err)
				assert.False(t, need)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.need, need)
			assert.Equal(t, tc.reason, reason)
		})
	}
}

// TestNeedCopyRealFiles checks NeedCopy on what os.Stat returns, with
// nanosecond mtimes set on disk.
func TestNeedCopyRealFiles(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	src, dst := dir+"/src", dir+"/dst"
	require.NoError(t, os.WriteFile(src, []byte("a"), 0o644))
	require.NoError(t, os.WriteFile(dst, []byte("a"), 0o644))
	mtime := time.Unix(1700000000, 999999999)
	require.NoError(t, os.Chtimes(src, mtime, mtime))
	require.NoError(t, os.Chtimes(dst, mtime.Add(-time.Nanosecond), mtime.Add(-time.Nanosecond)))
	si, err := os.Stat(src)
	require.NoError(t, err)
	di, err := os.Stat(dst)
	require.NoError(t, err)
	need, _, err := NeedCopy(si, di, 0)
	require.NoError(t, err)
	assert.True(t, need, "source newer by 1 ns on disk must be copied")
	need, _, err = NeedCopy(di, si, 0)
	require.NoError(t, err)
	assert.False(t, need)
	dirInfo, err := os.Stat(dir)
	require.NoError(t, err)
	_, _, err = NeedCopy(si, dirInfo, 0)
	assert.Error(t, err)
}

// TestNeedCopyCoarseDestination: on a file system that keeps whole or even
// seconds, a copy made with cp -p carries the source's time truncated; it
// must still count as up to date, while a source that really changed later
// is still copied (GNU cp compares the same way).
func TestNeedCopyCoarseDestination(t *testing.T) {
	t.Parallel()
	src := time.Date(2024, 5, 1, 12, 0, 1, 900_000_000, time.UTC) // an odd second
	file := func(mtime time.Time) os.FileInfo { return fileInfo{name: "f", mode: 0o644, mtime: mtime} }
	for _, tc := range []struct {
		name string
		res  time.Duration
		dst  time.Time
		need bool
	}{
		{"1s: copy of this version", time.Second, src.Truncate(time.Second), false},
		{"1s: source changed a second later", time.Second, src.Truncate(time.Second).Add(-time.Second), true},
		{"2s: copy of this version", 2 * time.Second, time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC), false},
		{"2s: source changed two seconds later", 2 * time.Second, time.Date(2024, 5, 1, 11, 59, 58, 0, time.UTC), true},
		{"100ns: copy of this version", 100 * time.Nanosecond, src, false},
		{"ns: the same copy on a precise file system", time.Nanosecond, src.Truncate(time.Second), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			need, _, err := NeedCopy(file(src), file(tc.dst), tc.res)
			require.NoError(t, err)
			assert.Equal(t, tc.need, need)
		})
	}
}

func TestResolutionFrom(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		sec, nsec int64
		want      time.Duration
	}{
		{1700000001, 123456789, time.Nanosecond},
		{1700000001, 123456700, 100 * time.Nanosecond},
		{1700000001, 123456000, time.Microsecond},
		{1700000001, 123000000, time.Millisecond},
		{1700000001, 0, time.Second},
		{1700000000, 0, 2 * time.Second},
		{1700000002, 0, 2 * time.Second},
	} {
		assert.Equal(t, tc.want, resolutionFrom(unix.Timespec{Sec: tc.sec, Nsec: tc.nsec}), "%d.%09d", tc.sec, tc.nsec)
	}
}
