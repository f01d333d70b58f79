package itest

import (
	"encoding/json"
	"encoding/xml"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func xmlEscapeTo(w io.Writer, s string) error { return xml.EscapeText(w, []byte(s)) }

func parseChainJSON(t *testing.T, out string) []string {
	t.Helper()
	var infos []struct {
		Filename string `json:"filename"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &infos), out)
	var chain []string
	for _, i := range infos {
		chain = append(chain, i.Filename)
	}
	return chain
}

// eventually polls cond until it holds or limit passes.
func eventually(limit time.Duration, cond func() bool) bool {
	end := time.Now().Add(limit)
	for time.Now().Before(end) {
		if cond() {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return cond()
}

// waitFor fails the test when cond does not hold within 30 s (generous: the
// machines are shared and loaded).
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	require.True(t, eventually(30*time.Second, cond), "condition not reached in 30 s")
}
