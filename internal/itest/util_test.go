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

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; i < 100; i++ {
		if cond() {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("condition not reached in 5 s")
}
