package cli

import (
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/fi-backup/fi-backup/internal/lock"
	"github.com/fi-backup/fi-backup/internal/virt"
)

// domainOf names the domain a line is about ('dN' quoted in it), or "".
func domainOf(line string, names []string) string {
	for _, n := range names {
		if strings.Contains(line, "'"+n+"'") {
			return n
		}
	}
	return ""
}

// TestParallelKeepsEachDomainsLinesTogether: --parallel=4 over 8 domains
// backs every one up; each domain's lines come as one block; a held lock
// still fails its domain with the old message, and the exit code is the
// one --parallel=1 gives. (Run under -race: the turns share the runner.)
func TestParallelKeepsEachDomainsLinesTogether(t *testing.T) {
	states := map[string]virt.State{}
	var names []string
	for i := 0; i < 8; i++ {
		n := fmt.Sprintf("d%d", i)
		states[n] = virt.StateRunning
		names = append(names, n)
	}
	outputs := map[int]string{}
	codes := map[int]int{}
	qemuImg := fakeQemuImg(t, "7.2.22")
	for _, par := range []int{1, 4} {
		h := newHarness(t, states)
		h.env["FI_BACKUP_QEMU_IMG"] = qemuImg
		l, err := lock.TryLock(h.lockDir, "d5")
		require.NoError(t, err)
		so, _, code := h.run(t, "-d", fmt.Sprintf("--parallel=%d", par), "d0 d1 d2 d3 d4 d5 d6 d7")
		require.NoError(t, l.Unlock())
		codes[par], outputs[par] = code, so
		snaps := append([]string{}, h.snapshots...)
		sort.Strings(snaps)
		assert.Len(t, snaps, 7, "every domain but the locked one")
		assert.Contains(t, so, "[ERR] Another instance of ./fi-backup is already running on 'd5'! Skipping backup of 'd5'\n")

		// Blocks: once a domain's lines start, no other domain's line
		// comes before its last one.
		lines := strings.Split(so, "\n")
		first, last := map[string]int{}, map[string]int{}
		for i, l := range lines {
			if d := domainOf(l, names); d != "" {
				if _, ok := first[d]; !ok {
					first[d] = i
				}
				last[d] = i
			}
		}
		for i, l := range lines {
			d := domainOf(l, names)
			if d == "" {
				continue
			}
			for o := range first {
				if o != d && first[o] < i && i < last[o] {
					t.Errorf("--parallel=%d: a line of %s inside the block of %s:\n%s", par, d, o, so)
				}
			}
		}
	}
	assert.Equal(t, codes[1], codes[4])
	assert.Equal(t, 1, codes[4])
	// The same lines, whatever the order of the blocks.
	sorted := func(s string) []string {
		l := strings.Split(s, "\n")
		sort.Strings(l)
		return l
	}
	assert.Equal(t, sorted(outputs[1]), sorted(outputs[4]))
}
