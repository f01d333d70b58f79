package backup

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/blockjob"
	"github.com/fi-backup/fi-backup/internal/journal"
	"github.com/fi-backup/fi-backup/internal/logging"
	"github.com/fi-backup/fi-backup/internal/virt"
	"github.com/fi-backup/fi-backup/internal/virt/virttest"
)

// TestRecoverAllLeavesOtherJournals: before the domains are listed, a run
// acts only on -s dump journals (a guest perhaps left paused) and on the
// journals of domains that no longer exist. A block-job journal of another
// domain is left, untouched and unreported, to that domain's own turn,
// whose failure counts; a run for other domains prints no [ERR] for it.
func TestRecoverAllLeavesOtherJournals(t *testing.T) {
	locks := t.TempDir()
	fake := virttest.New(map[string]virt.State{"web": virt.StateRunning})
	store := journal.Store{Dir: locks}
	require.NoError(t, store.Write(journal.Record{Domain: "web", Kind: blockjob.KindPull, Disk: "vda", Top: "/nowhere/top"}))
	require.NoError(t, store.Write(journal.Record{Domain: "gone", Kind: blockjob.KindPull, Disk: "vda"}))
	var out bytes.Buffer
	p := logging.New(&out, true, true)
	r := New(Config{}, Env{P: p, Hyp: fake, LockDir: locks})

	require.NoError(t, r.RecoverAll(context.Background()))
	assert.NotContains(t, out.String(), "[ERR]")
	rec, err := store.Read("web")
	require.NoError(t, err)
	require.NotNil(t, rec, "the block-job journal stays for web's own turn")
	assert.Equal(t, blockjob.KindPull, rec.Kind)
	rec, err = store.Read("gone")
	require.NoError(t, err)
	assert.Nil(t, rec, "the journal of a domain that no longer exists is dropped")
	assert.Contains(t, out.String(), "[DEB] Removing the journal of 'gone': the domain no longer exists")
}
