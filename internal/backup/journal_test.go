package backup

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/virt"
	"github.com/fi-backup/fi-backup/internal/virt/virttest"
)

func testRunner(t *testing.T, fake *virttest.Fake) (*Runner, *bytes.Buffer) {
	t.Helper()
	var out bytes.Buffer
	return &Runner{P: logging.New(&out, true, true), Hyp: fake, LockDir: t.TempDir(), PollEvery: 1}, &out
}

// TestJournalWrittenSafely: the journal is a fresh 0600 file; a link planted
// at its name is replaced, never written through.
func TestJournalWrittenSafely(t *testing.T) {
	r, _ := testRunner(t, virttest.New(nil))
	victim := filepath.Join(t.TempDir(), "victim")
	require.NoError(t, os.WriteFile(victim, []byte("precious"), 0o644))
	require.NoError(t, os.Symlink(victim, r.journalPath("dom")))

	require.NoError(t, r.writeJournal(jobJournal{Domain: "dom", Disk: "vda", Kind: journalCommit, Top: "/t", Base: "/b"}))
	b, err := os.ReadFile(victim)
	require.NoError(t, err)
	assert.Equal(t, "precious", string(b), "not written through the link")
	st, err := os.Lstat(r.journalPath("dom"))
	require.NoError(t, err)
	assert.True(t, st.Mode().IsRegular())
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	j, err := r.readJournal("dom")
	require.NoError(t, err)
	assert.Equal(t, "/t", j.Top)
	assert.Equal(t, os.Getpid(), j.PID)
	entries, err := os.ReadDir(r.LockDir)
	require.NoError(t, err)
	assert.Len(t, entries, 1, "no temporary file left")
}

// TestJournalNotTrusted: a journal that this tool did not write (a link, a
// file of another user, one others may write, garbage, another domain's)
// is not acted upon: a warning, and no job is aborted, no guest resumed.
func TestJournalNotTrusted(t *testing.T) {
	valid := []byte(`{"domain":"dom","disk":"vda","kind":"blockcommit","pid":1}`)
	cases := []struct {
		name  string
		plant func(t *testing.T, p string)
	}{
		{"symlink", func(t *testing.T, p string) {
			target := filepath.Join(t.TempDir(), "j")
			require.NoError(t, os.WriteFile(target, valid, 0o600))
			require.NoError(t, os.Symlink(target, p))
		}},
		{"other owner", func(t *testing.T, p string) {
			requireRoot(t)
			require.NoError(t, os.WriteFile(p, valid, 0o600))
			require.NoError(t, os.Chown(p, 65534, 65534))
		}},
		{"writable by others", func(t *testing.T, p string) {
			require.NoError(t, os.WriteFile(p, valid, 0o600))
			require.NoError(t, os.Chmod(p, 0o666))
		}},
		{"directory", func(t *testing.T, p string) { require.NoError(t, os.Mkdir(p, 0o700)) }},
		{"not JSON", func(t *testing.T, p string) { require.NoError(t, os.WriteFile(p, []byte("rm -rf"), 0o600)) }},
		{"another domain", func(t *testing.T, p string) {
			require.NoError(t, os.WriteFile(p, []byte(`{"domain":"other","kind":"dump"}`), 0o600))
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fake := virttest.New(map[string]virt.State{"dom": virt.StatePaused})
			aborted, resumed := false, false
			fake.JobInfo = func(string, string) (virt.JobInfo, error) {
				return virt.JobInfo{Active: !aborted, Type: virt.JobTypeActiveCommit}, nil
			}
			fake.AbortJob = func(string, string) error { aborted = true; return nil }
			fake.Resume = func(string) error { resumed = true; return nil }
			r, out := testRunner(t, fake)
			tc.plant(t, r.journalPath("dom"))
			dom, err := fake.Lookup("dom")
			require.NoError(t, err)
			defer dom.Close()
			assert.NoError(t, r.recoverJobs(dom))
			assert.Contains(t, out.String(), "[WAR] Ignoring the journal of 'dom'")
			assert.False(t, aborted, "no job aborted on an untrusted journal")
			assert.False(t, resumed, "no guest resumed on an untrusted journal")
		})
	}
}

// TestRecoverAbortsOnlyTheJournaledJob: the next run aborts the job the
// journal describes, and no other job (someone's pull, a commit into
// another base) even when the journal is there.
func TestRecoverAbortsOnlyTheJournaledJob(t *testing.T) {
	j := jobJournal{Domain: "dom", Disk: "vda", Kind: journalCommit, Top: "/d/vm.bimg-20240101-000001", Base: "/d/vm.qcow2"}
	disk := func(src, mirror string) virt.Disk {
		d := virt.Disk{Target: "vda", Device: "disk", Source: src, Complete: true, Chain: []virt.Image{{Path: src}}}
		if mirror != "" {
			d.Mirror = &virt.Mirror{Job: "active-commit", Source: mirror}
		}
		return d
	}
	for _, tc := range []struct {
		name    string
		typ     virt.JobType
		disk    virt.Disk
		aborted bool
		warn    string
	}{
		{"the journaled commit", virt.JobTypeActiveCommit, disk(j.Top, j.Base), true, "[WAR] Aborting the blockcommit job on disk 'vda' of 'dom'"},
		{"someone's pull", virt.JobTypePull, disk(j.Top, ""), false, "[WAR] A pull job runs on disk 'vda' of 'dom', but not the blockcommit job"},
		{"a commit into another base", virt.JobTypeActiveCommit, disk(j.Top, "/elsewhere/base.qcow2"), false, "[WAR] A active commit job runs"},
		{"a commit of another top", virt.JobTypeActiveCommit, disk("/d/other-top", j.Base), false, "[WAR] A active commit job runs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := virttest.New(map[string]virt.State{"dom": virt.StateRunning})
			fake.Disks["dom"] = []virt.Disk{tc.disk}
			aborted := false
			fake.JobInfo = func(string, string) (virt.JobInfo, error) {
				if aborted {
					return virt.JobInfo{}, nil
				}
				return virt.JobInfo{Active: true, Type: tc.typ}, nil
			}
			fake.AbortJob = func(string, string) error {
				aborted = true
				fake.Disks["dom"][0].Mirror = nil
				return nil
			}
			r, out := testRunner(t, fake)
			require.NoError(t, r.writeJournal(j))
			dom, err := fake.Lookup("dom")
			require.NoError(t, err)
			defer dom.Close()
			assert.NoError(t, r.recoverJobs(dom))
			assert.Equal(t, tc.aborted, aborted)
			assert.Contains(t, out.String(), tc.warn)
			assert.NoFileExists(t, r.journalPath("dom"), "the journal is done with either way")
		})
	}
}

// TestAbortFailureIsReported: an abort libvirt refuses while the job is
// still there is worth a warning, not silence.
func TestAbortFailureIsReported(t *testing.T) {
	fake := virttest.New(map[string]virt.State{"dom": virt.StateRunning})
	fake.Disks["dom"] = []virt.Disk{{Target: "vda", Device: "disk", Source: "/d/top"}}
	calls := 0
	fake.JobInfo = func(string, string) (virt.JobInfo, error) {
		calls++
		return virt.JobInfo{Active: calls < 3, Type: virt.JobTypeActiveCommit}, nil
	}
	fake.AbortJob = func(string, string) error { return &virt.Error{Msg: "internal error: boom"} }
	r, out := testRunner(t, fake)
	dom, err := fake.Lookup("dom")
	require.NoError(t, err)
	defer dom.Close()
	assert.True(t, r.abortJob(dom, "vda"))
	assert.Contains(t, out.String(), "[WAR] Aborting the block job on disk 'vda' of 'dom' failed: internal error: boom\n")
}

// TestClearJournalFailureIsReported: a journal that cannot be removed is
// reported (the next run will look at the domain again).
func TestClearJournalFailureIsReported(t *testing.T) {
	r, out := testRunner(t, virttest.New(nil))
	require.NoError(t, os.Mkdir(r.journalPath("dom"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(r.journalPath("dom"), "x"), nil, 0o600))
	r.clearJournal("dom")
	assert.Contains(t, out.String(), "[WAR] Could not remove the journal '"+r.journalPath("dom")+"'")
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" || os.Getenv("FI_BACKUP_TEST_DISALLOW_SKIP") == "1" {
		t.Fatal("this test needs root")
	}
	t.Skip("this test needs root")
}
