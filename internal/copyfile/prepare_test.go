package copyfile

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestCopyPrepare: the Prepare hook sees the complete temp file, its change
// ends up in dst, and cp -p times are applied after it.
func TestCopyPrepare(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	require.NoError(t, os.WriteFile(src, []byte("backing=/host/path"), 0o644))
	mtime := time.Unix(1650000000, 42)
	require.NoError(t, os.Chtimes(src, mtime, mtime))

	var seen string
	_, err := Copy(context.Background(), src, dst, Options{Preserve: true, Prepare: func(tmp string) error {
		seen = tmp
		got, err := os.ReadFile(tmp)
		if err != nil {
			return err
		}
		assert.Equal(t, "backing=/host/path", string(got), "Prepare must see all the data")
		return os.WriteFile(tmp, []byte("backing=rel"), 0o600)
	}})
	require.NoError(t, err)
	assert.True(t, IsTemp(filepath.Base(seen)), seen)
	assert.Equal(t, dir, filepath.Dir(seen))
	fi, err := os.Stat(dst)
	require.NoError(t, err)
	assert.Equal(t, mtime.UnixNano(), fi.ModTime().UnixNano(), "times must be set after Prepare")
	assert.Equal(t, os.FileMode(0o644), fi.Mode())
	assertFile(t, dst, "backing=rel")
}

// TestCopyPrepareError: a failing Prepare aborts the copy like any error.
func TestCopyPrepareError(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	require.NoError(t, os.WriteFile(src, []byte("new"), 0o644))
	require.NoError(t, os.WriteFile(dst, []byte("previous backup"), 0o644))
	boom := errors.New("boom")

	_, err := Copy(context.Background(), src, dst, Options{Prepare: func(string) error { return boom }})
	assert.ErrorIs(t, err, boom)
	assert.Equal(t, "copy "+src+" to "+dst+": prepare: boom", err.Error())
	assert.ElementsMatch(t, []string{"src", "dst"}, dirNames(t, dir))
	assertFile(t, dst, "previous backup")
}
