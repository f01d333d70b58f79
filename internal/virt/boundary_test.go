package virt_test

import (
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestOnlyLibvirtconnImportsCgoBindings keeps the architecture's rule: the
// cgo libvirt bindings are imported by internal/virt/libvirtconn alone, so
// everything else builds and unit-tests without libvirt.
func TestOnlyLibvirtconnImportsCgoBindings(t *testing.T) {
	root := filepath.Join("..", "..")
	var offenders []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".go") {
			return err
		}
		f, err := parser.ParseFile(token.NewFileSet(), p, nil, parser.ImportsOnly)
		require.NoError(t, err, p)
		for _, imp := range f.Imports {
			if imp.Path.Value == `"libvirt.org/go/libvirt"` && filepath.Base(filepath.Dir(p)) != "libvirtconn" {
				offenders = append(offenders, p)
			}
		}
		return nil
	})
	require.NoError(t, err)
	assert.Empty(t, offenders)
}
