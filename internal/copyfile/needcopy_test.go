package copyfile

import (
	"io/fs"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
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
			need, reason, err := NeedCopy(tc.src, tc.dst)
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
	need, _, err := NeedCopy(si, di)
	require.NoError(t, err)
	assert.True(t, need, "source newer by 1 ns on disk must be copied")
	need, _, err = NeedCopy(di, si)
	require.NoError(t, err)
	assert.False(t, need)
	dirInfo, err := os.Stat(dir)
	require.NoError(t, err)
	_, _, err = NeedCopy(si, dirInfo)
	assert.Error(t, err)
}
