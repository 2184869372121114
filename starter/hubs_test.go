package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/catalog"
)

// newHubsCatalog is a migrated catalog with hub-a (recorded by its worker: 4 ports, 10 GiB
// free) where a backup holds 2 ports and a mount 1, a 2-disk backup waits first in line
// and a 1-disk restore behind it has gone silent; and hub-b, only named by a lease (its
// worker never recorded itself), so it shows the default range.
func newHubsCatalog(t *testing.T) {
	t.Helper()
	store, dsn := cliCatalog(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	rng := catalog.PortRange{First: 20000, Last: 20003}
	require.NoError(t, store.RecordHub(ctx, catalog.Hub{ID: "hub-a", FreeBytes: 10 << 30, UsedBytes: 1 << 30, Ports: rng}))
	ports, err := catalog.NewPorts(store, rng)
	require.NoError(t, err)
	_, err = ports.AllocateAll(ctx, "hub-a", "backup-web01", []int32{2000, 2001})
	require.NoError(t, err)
	_, err = ports.AllocateAll(ctx, "hub-a", "mount-20261202T000000.000Z-00000001", []int32{2000})
	require.NoError(t, err)
	for _, w := range []struct {
		id    string
		disks []int32
	}{{"backup-db01", []int32{2000, 2001}}, {"restore-file-x", []int32{2000}}} {
		_, err = ports.AllocateAll(ctx, "hub-a", w.id, w.disks)
		require.True(t, errors.Is(err, catalog.ErrPortsExhausted), "%s: %v", w.id, err)
	}
	db, err := sql.Open("mysql", dsn)
	require.NoError(t, err)
	defer db.Close()
	_, err = db.ExecContext(ctx, "UPDATE port_waits SET seen_at = ? WHERE workflow_id = 'restore-file-x'",
		time.Now().UTC().Add(-catalog.PortWaitStale-time.Minute))
	require.NoError(t, err)
	_, err = ports.AllocateAll(ctx, "hub-b", "backup-app01", []int32{2000})
	require.NoError(t, err)
}

func TestHubsListShowsPortsAndLine(t *testing.T) {
	newHubsCatalog(t)

	out, err := runCLI(t, "hubs", "list")
	require.NoError(t, err)
	assert.Regexp(t, regexp.MustCompile(`(?m)^hub-a\s+\S+ ago\s+10\.0 GiB\s+1\.0 GiB\s+0 B\s+20000-20003\s+3/4\s+2$`), out)
	def := catalog.DefaultPortRange
	assert.Regexp(t, regexp.MustCompile(`(?m)^hub-b\s+never\s+0 B\s+0 B\s+0 B\s+`+itoa(int32(def.First))+`-`+itoa(int32(def.Last))+`\s+1/\d+\s+0$`), out)

	out, err = runCLI(t, "hubs", "list", "--json")
	require.NoError(t, err)
	var rows []hubSummary
	require.NoError(t, json.Unmarshal([]byte(out), &rows))
	require.Len(t, rows, 2)
	assert.Equal(t, "hub-a", rows[0].ID)
	assert.NotNil(t, rows[0].LastSeen)
	assert.Equal(t, 3, rows[0].Leased)
	assert.Equal(t, 2, rows[0].InLine)
	assert.Nil(t, rows[1].LastSeen, "hub-b's worker never recorded itself")
}

func TestHubsShowListsLeasesAndTheLineInOrder(t *testing.T) {
	newHubsCatalog(t)

	out, err := runCLI(t, "hubs", "show", "hub-a")
	require.NoError(t, err)
	assert.Contains(t, out, "ports:   20000-20003, 3 of 4 leased, 2 jobs in line")
	assert.Regexp(t, regexp.MustCompile(`(?m)^20000\s+backup-web01\s+2000\s`), out)
	assert.Regexp(t, regexp.MustCompile(`(?m)^20001\s+backup-web01\s+2001\s`), out)
	assert.Regexp(t, regexp.MustCompile(`(?m)^20002\s+mount-20261202T000000\.000Z-00000001\s+2000\s`), out)
	assert.NotRegexp(t, regexp.MustCompile(`(?m)^20003\s`), out, "the free port has no lease line")
	first := regexp.MustCompile(`(?m)^1\s+backup-db01\s+2 ports\s+\S+\s+\S+ ago$`)
	second := regexp.MustCompile(`(?m)^2\s+restore-file-x\s+1 port\s+\S+\s+\S+ ago \(silent: passed over until it asks again\)$`)
	assert.Regexp(t, first, out)
	assert.Regexp(t, second, out)

	out, err = runCLI(t, "hubs", "show", "hub-a", "--json")
	require.NoError(t, err)
	var d hubDetail
	require.NoError(t, json.Unmarshal([]byte(out), &d))
	require.Len(t, d.Line, 2)
	assert.Equal(t, "backup-db01", d.Line[0].WorkflowID)
	assert.False(t, d.Line[0].Silent)
	assert.Equal(t, 2, d.Line[0].Needed)
	assert.True(t, d.Line[1].Silent)
	require.Len(t, d.Leases, 3)

	_, err = runCLI(t, "hubs", "show", "hub-z")
	require.ErrorContains(t, err, `hub "hub-z" is not in the catalog`)
}
