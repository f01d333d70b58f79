package cli

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestOptionNames: the exported names are the table's, the old script's
// getopt letters (b:cCm:s:qrdhvV) among them.
func TestOptionNames(t *testing.T) {
	names := OptionNames()
	assert.Len(t, names, len(options()))
	longs, shorts := map[string]bool{}, map[string]OptionName{}
	for _, n := range names {
		assert.False(t, longs[n.Long], "long option %q twice", n.Long)
		longs[n.Long] = true
		if n.Short != "" {
			assert.NotContains(t, shorts, n.Short, "short option -%s twice", n.Short)
			shorts[n.Short] = n
		}
	}
	for _, c := range "bcCmsqrdhvV" {
		assert.Contains(t, shorts, string(c))
	}
	assert.Len(t, shorts, 11)
	for _, c := range "bms" {
		assert.True(t, shorts[string(c)].Arg, "-%c takes an argument", c)
	}
	assert.Equal(t, OptionName{Long: "backup_dir", Short: "b", Arg: true}, names[0])
	assert.Contains(t, names, OptionName{Long: "list"})
}
