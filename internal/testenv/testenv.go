// Package testenv holds what the tests of several packages need to know
// about the machine they run on: whether they may skip (never in CI), and
// whether they run as root.
package testenv

import (
	"os"
	"testing"
)

// NoSkip reports whether tests must not skip: in CI (CI=true) and under
// FI_BACKUP_TEST_DISALLOW_SKIP=1, which make test sets.
func NoSkip() bool {
	return os.Getenv("CI") == "true" || os.Getenv("FI_BACKUP_TEST_DISALLOW_SKIP") == "1"
}

// SkipOrFail skips the test, or fails it where skipping is not allowed.
func SkipOrFail(t testing.TB, msg string) {
	t.Helper()
	if NoSkip() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// RequireRoot stops a test that needs root (mounts, chattr, chown) when it
// runs as another user: a skip, or a failure where skipping is not allowed.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		SkipOrFail(t, "this test needs root")
	}
}
