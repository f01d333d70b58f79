package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestMakeInstall runs the Makefile's install and uninstall targets into a
// DESTDIR. They run in a copy of what they read (the Makefile, the man
// page, the completion, and a stand-in bin/fi-backup, which install takes
// as built), so the repository's bin/ is left alone. No setup target runs
// (make -n would show it): install must never touch a production host's
// libvirt configuration.
func TestMakeInstall(t *testing.T) {
	t.Parallel()
	mk := needTool(t, "make")
	src := t.TempDir()
	files := map[string]string{
		"Makefile":                     readFile(t, filepath.Join(repo, "Makefile")),
		"cmd/fi-backup/fi-backup.8":    readFile(t, manPage),
		"cmd/fi-backup/fi-backup.bash": readFile(t, completion),
		"bin/fi-backup":                "#!/bin/sh\necho fi-backup stand-in\n",
	}
	for name, content := range files {
		writeFile(t, filepath.Join(src, name), content, 0o644)
	}
	require.NoError(t, os.Chmod(filepath.Join(src, "bin/fi-backup"), 0o755))

	installed := map[string]struct {
		from string
		mode os.FileMode
	}{
		"bin/fi-backup":                               {"bin/fi-backup", 0o755},
		"share/man/man8/fi-backup.8":                  {"cmd/fi-backup/fi-backup.8", 0o644},
		"share/bash-completion/completions/fi-backup": {"cmd/fi-backup/fi-backup.bash", 0o644},
	}
	for _, prefix := range []string{"", "/opt/fib"} { // "": the default, /usr/local
		dest := t.TempDir()
		args := []string{"-C", src, "DESTDIR=" + dest}
		root := filepath.Join(dest, "usr/local")
		if prefix != "" {
			args = append(args, "PREFIX="+prefix)
			root = filepath.Join(dest, prefix)
		}
		mkCmd := func(target string) *exec.Cmd {
			cmd := exec.Command(mk, append(args, target)...)
			// Not the flags of a make that runs these tests (make test).
			cmd.Env = append(os.Environ(), "MAKEFLAGS=", "MFLAGS=", "MAKELEVEL=")
			return cmd
		}
		dry := mkCmd("install")
		dry.Args = append(dry.Args[:len(dry.Args)-1], "-n", "install")
		plan, err := dry.Output()
		require.NoError(t, err)
		assert.NotContains(t, string(plan), "setup-host.sh", "install runs no host setup")
		run(t, mkCmd("install"))
		var got []string
		require.NoError(t, filepath.Walk(dest, func(p string, fi os.FileInfo, err error) error {
			if err == nil && !fi.IsDir() {
				rel, _ := filepath.Rel(root, p)
				got = append(got, rel)
				if want, ok := installed[rel]; assert.True(t, ok, "unexpected file %s", p) {
					assert.Equal(t, want.mode, fi.Mode().Perm(), rel)
					assert.Equal(t, files[want.from], readFile(t, p), rel)
				}
			}
			return err
		}))
		assert.Len(t, got, len(installed), "installed under %s: %v", dest, got)

		run(t, mkCmd("uninstall"))
		for rel := range installed {
			_, err := os.Stat(filepath.Join(root, rel))
			assert.True(t, os.IsNotExist(err), "%s left by make uninstall", rel)
		}
	}
}
