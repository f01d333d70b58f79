package backup

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/virt"
)

func TestCommitBase(t *testing.T) {
	img := func(p ...string) []virt.Image {
		var out []virt.Image
		for _, x := range p {
			out = append(out, virt.Image{Path: x})
		}
		return out
	}
	for _, tc := range []struct {
		chain []virt.Image
		want  string
	}{
		{img("/d/vm.bimg-20240101-000002", "/d/vm.bimg-20240101-000001", "/d/vm.qcow2"), "/d/vm.qcow2"},
		{img("/d/vm.bimg-20240101-000002", "/d/vm.qcow2", "/t/template.qcow2"), "/d/vm.qcow2"},
		{img("/d/vm.bimg-20240101-000003", "/d/vm.bimg-20240101-000002", "/d/vm.bimg-20240101-000001"), "/d/vm.bimg-20240101-000001"},
		{img("/d/vm.qcow2", "/d/vm.bimg-20240101-000001.old", "/d/base"), "/d/vm.bimg-20240101-000001.old"},
	} {
		assert.Equal(t, tc.want, commitBase(tc.chain))
	}
}

func TestCheckResult(t *testing.T) {
	before := []virt.Image{{Path: "/d/top"}, {Path: "/d/base"}}
	assert.NoError(t, checkResult(virt.JobCommit, "/d/base", before, virt.Disk{Source: "/d/base"}))
	assert.Error(t, checkResult(virt.JobCommit, "/d/base", before, virt.Disk{Source: "/d/top"}))
	assert.NoError(t, checkResult(virt.JobPull, "", before, virt.Disk{Source: "/d/top", Chain: before[:1]}))
	assert.Error(t, checkResult(virt.JobPull, "", before, virt.Disk{Source: "/d/top", Chain: before}))
}

func TestGenerationName(t *testing.T) {
	dir := t.TempDir()
	dst := filepath.Join(dir, "vm.qcow2")
	require.NoError(t, os.WriteFile(dst, []byte("old"), 0o600))
	mt := time.Date(2024, 5, 6, 7, 8, 9, 0, time.Local)
	require.NoError(t, os.Chtimes(dst, mt, mt))
	st, err := os.Stat(dst)
	require.NoError(t, err)
	name, err := generationName(dst, st)
	require.NoError(t, err)
	assert.Equal(t, dst+".gen-20240506-070809", name)

	// A different file already holds that name: count on.
	require.NoError(t, os.WriteFile(name, []byte("other"), 0o600))
	name2, err := generationName(dst, st)
	require.NoError(t, err)
	assert.Equal(t, dst+".gen-20240506-070809.1", name2)

	// The same file (a link made by an interrupted run) is reused.
	require.NoError(t, os.Remove(name))
	require.NoError(t, os.Link(dst, name))
	name3, err := generationName(dst, st)
	require.NoError(t, err)
	assert.Equal(t, name, name3)
}
