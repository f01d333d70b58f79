package statedump

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseReply(t *testing.T) {
	ret, err := ParseReply(`{"return":{},"id":"libvirt-414"}`)
	require.NoError(t, err)
	assert.JSONEq(t, `{}`, string(ret))

	ret, err = ParseReply(`{"return":{"status":"running","singlestep":false,"running":true},"id":"libvirt-415"}`)
	require.NoError(t, err)
	assert.JSONEq(t, `{"status":"running","singlestep":false,"running":true}`, string(ret))

	// A rejected command: libvirt returns it with a nil error (notes §8.2).
	_, err = ParseReply(`{"id":"libvirt-458","error":{"class":"GenericError","desc":"Parameter 'uri' expects a valid migration protocol"}}`)
	var qe *QMPError
	require.ErrorAs(t, err, &qe)
	assert.Equal(t, "GenericError", qe.Class)
	assert.Equal(t, "Parameter 'uri' expects a valid migration protocol", qe.Desc)
	assert.Equal(t, "Parameter 'uri' expects a valid migration protocol (GenericError)", err.Error())

	_, err = ParseReply(`{"error":{}}`)
	require.ErrorAs(t, err, &qe)
	assert.Equal(t, "QEMU rejected the command", qe.Desc)

	for _, garbage := range []string{"", "garbage", `{"id":"libvirt-1"}`, `{"return":null}`, `[1,2]`, `{"return":` + "\x00"} {
		_, err = ParseReply(garbage)
		assert.True(t, errors.Is(err, ErrBadReply), "%q: %v", garbage, err)
	}
}

func TestParseMigration(t *testing.T) {
	m, err := ParseMigration(`{"return":{},"id":"libvirt-1"}`)
	require.NoError(t, err)
	assert.Equal(t, "none", m.Status)
	assert.True(t, m.Terminal())

	m, err = ParseMigration(`{"return":{"status":"active","ram":{"transferred":123,"total":456}},"id":"x"}`)
	require.NoError(t, err)
	assert.Equal(t, "active", m.Status)
	assert.False(t, m.Terminal())
	assert.Equal(t, int64(123), m.RAM.Transferred)
	assert.Nil(t, m.Downtime)

	m, err = ParseMigration(`{"return":{"status":"completed","downtime":8,"total-time":67},"id":"x"}`)
	require.NoError(t, err)
	assert.True(t, m.Terminal())
	require.NotNil(t, m.Downtime)
	assert.Equal(t, int64(8), *m.Downtime)
	assert.Equal(t, int64(67), *m.TotalTime)

	m, err = ParseMigration(`{"return":{"status":"failed","error-desc":"Unable to write to file: Broken pipe"}}`)
	require.NoError(t, err)
	assert.Equal(t, "Unable to write to file: Broken pipe", m.ErrorDesc)

	_, err = ParseMigration(`{"return":"a string"}`)
	assert.True(t, errors.Is(err, ErrBadReply), "%v", err)
	_, err = ParseMigration(`{"error":{"class":"CommandNotFound","desc":"The command query-migrate has not been found"}}`)
	var qe *QMPError
	assert.ErrorAs(t, err, &qe)
}

func TestCommand(t *testing.T) {
	assert.Equal(t, `{"execute":"query-migrate"}`, command("query-migrate", nil))
	assert.Equal(t, `{"execute":"migrate","arguments":{"uri":"fd:fi-backup-state"}}`,
		command("migrate", map[string]string{"uri": "fd:" + FDName}))
	// A quote in an argument cannot break the JSON (it broke the old shell/JSON line).
	assert.Equal(t, `{"execute":"getfd","arguments":{"fdname":"a\"b"}}`, command("getfd", map[string]string{"fdname": `a"b`}))
}
