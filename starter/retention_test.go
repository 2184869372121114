package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/client"

	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/retention"
	"github.com/diskferry/diskferry/internal/testenv"
)

func openTestCatalog(t *testing.T, dsn string) *catalog.Store {
	t.Helper()
	store, err := catalog.Open(context.Background(), dsn, slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	return store
}

func TestRetentionSetAndShow(t *testing.T) {
	pc := newPointsCatalog(t)
	store := openTestCatalog(t, pc.dsn)
	ctx := context.Background()

	out, err := runCLI(t, "retention", "show")
	require.NoError(t, err)
	assert.Equal(t, "no retention policies: every point is kept\n", out)

	out, err = runCLI(t, "retention", "set", "--vm", "web01", "--keep-last", "3", "--weekly", "4", "--max-chain", "2")
	require.NoError(t, err)
	assert.Equal(t, "retention of VM web01 (vm-42): keep last 3, weekly 4, chain of at most 3 files\n", out)
	out, err = runCLI(t, "retention", "set", "--schedule", "backup-schedule-db01", "--daily", "7")
	require.NoError(t, err)
	assert.Equal(t, "default retention of schedule backup-schedule-db01: daily 7\n", out)

	web, err := store.FindVMs(ctx, "web01")
	require.NoError(t, err)
	p, source, err := store.ResolvePolicy(ctx, web[0].ID, "backup-schedule-db01")
	require.NoError(t, err)
	assert.Equal(t, catalog.PolicyFromVM, source)
	assert.Equal(t, retention.Policy{KeepLast: 3, Weekly: 4, MaxChain: 2}, p)

	out, err = runCLI(t, "retention", "show")
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 3, out)
	assert.Regexp(t, `^SCOPE\s+NAME\s+KEEP-LAST\s+DAILY\s+WEEKLY\s+MONTHLY\s+YEARLY\s+MAX-CHAIN\s+UPDATED$`, lines[0])
	assert.Regexp(t, `^vm\s+web01 \(vm-42\)\s+3\s+0\s+4\s+0\s+0\s+2\s+\d{4}-`, lines[1])
	assert.Regexp(t, `^schedule\s+backup-schedule-db01\s+0\s+7\s+0\s+0\s+0\s+0\s+\d{4}-`, lines[2])

	out, err = runCLI(t, "retention", "show", "--vm", "vm-42", "--json")
	require.NoError(t, err)
	var rows []policyRow
	require.NoError(t, json.Unmarshal([]byte(out), &rows), out)
	require.Len(t, rows, 1)
	assert.Equal(t, "vm", rows[0].Scope)
	assert.Equal(t, "web01", rows[0].VM)
	assert.Equal(t, retention.Policy{KeepLast: 3, Weekly: 4, MaxChain: 2}, rows[0].Policy)
	assert.Contains(t, out, `"keepLast": 3`)

	out, err = runCLI(t, "retention", "show", "--vm", "db01")
	require.NoError(t, err)
	assert.Equal(t, "VM db01 has no retention policy of its own: its schedule's default applies, else every point is kept\n", out)

	// Setting again replaces the whole policy.
	_, err = runCLI(t, "retention", "set", "--vm", "web01", "--monthly", "12")
	require.NoError(t, err)
	p, err = store.VMPolicy(ctx, web[0].ID)
	require.NoError(t, err)
	assert.Equal(t, retention.Policy{Monthly: 12}, p)
}

func TestRetentionSetRefusesBadInput(t *testing.T) {
	newPointsCatalog(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--keep-last", "1"}, "retention set: give exactly one of --vm or --schedule"},
		{[]string{"--vm", "web01", "--schedule", "s", "--keep-last", "1"}, "retention set: give exactly one of --vm or --schedule"},
		{[]string{"--vm", "web01", "--daily", "-1"}, "retention policy: invalid retention policy: daily -1 is not 0-10000"},
		{[]string{"--vm", "web01", "--max-chain", "5000"}, "retention policy: invalid retention policy: max-chain 5000 is not 0-1000"},
		{[]string{"--vm", "nosuchvm", "--keep-last", "1"}, `no VM "nosuchvm" in the catalog (a VM is known after its first backup; a schedule's default policy covers it until then)`},
	} {
		_, err := runCLI(t, append([]string{"retention", "set"}, tc.args...)...)
		require.Error(t, err, "%v", tc.args)
		assert.Equal(t, tc.want, err.Error(), "%v", tc.args)
	}
	out, err := runCLI(t, "retention", "show")
	require.NoError(t, err)
	assert.Equal(t, "no retention policies: every point is kept\n", out, "nothing was stored")
}

// points list shows what each point's files take and the total per VM.
func TestPointsListAllocated(t *testing.T) {
	pc := newPointsCatalog(t)
	store := openTestCatalog(t, pc.dsn)
	ctx := context.Background()
	// A third point of web01 with its allocated sizes recorded at commit.
	web, err := store.FindVMs(ctx, "web01")
	require.NoError(t, err)
	p, err := store.OpenPoint(ctx, catalog.OpenPointRequest{WorkflowID: "backup-web01", RunID: "run-3", Site: "lab", Hub: "hub-1",
		VMID: web[0].ID, Mode: catalog.ModeFull})
	require.NoError(t, err)
	_, err = store.CompletePoint(ctx, p.ID, []catalog.PointDisk{
		{Key: 2000, Path: "/srv/r/a.qcow2", Mode: catalog.ModeFull, CapacityBytes: 1 << 30, AllocatedBytes: 3 << 20},
		{Key: 2016, Path: "/srv/r/b.qcow2", Mode: catalog.ModeFull, CapacityBytes: 2 << 30, AllocatedBytes: 5 << 20},
	})
	require.NoError(t, err)

	out, err := runCLI(t, "points", "list")
	require.NoError(t, err)
	assert.Regexp(t, `(?m)^POINT\s+VM\s+STATUS\s+MODE\s+STARTED\s+FINISHED\s+DISKS\s+SIZE\s+WRITTEN\s+ALLOCATED$`, out)
	assert.Regexp(t, `(?m)^`+regexp.QuoteMeta(p.ID)+`\s+web01\s+complete\s+full\s+.*\s+2\s+3\.0 GiB\s+0 B\s+8\.0 MiB$`, out)
	assert.Regexp(t, `(?m)^`+regexp.QuoteMeta(pc.full.ID)+`\s+web01\s+.*\s+0 B$`, out, "a point from before allocation was recorded")
	assert.Regexp(t, `(?m)^Allocated per VM:\n  web01 \(vm-42\)\s+8\.0 MiB\s+in 3 points\n  db01 \(vm-43\)\s+0 B\s+in 1 point\n  all VMs\s+8\.0 MiB\s+in 4 points$`, out)

	out, err = runCLI(t, "points", "list", "--vm", "web01", "--json")
	require.NoError(t, err)
	var rows []pointSummary
	require.NoError(t, json.Unmarshal([]byte(out), &rows), out)
	require.Len(t, rows, 3)
	assert.Equal(t, int64(8<<20), rows[0].AllocatedBytes)
}

// schedule create with retention flags stores the schedule's default policy; without a
// catalog it refuses before creating the schedule.
func TestScheduleCreateStoresPolicy(t *testing.T) {
	pc := newPointsCatalog(t)
	srv := testenv.StartTemporal(t)
	t.Setenv("DISKFERRY_TEMPORAL_ADDRESS", srv.HostPort)
	t.Setenv("DISKFERRY_TEMPORAL_NAMESPACE", srv.Namespace)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	out, err := runCLI(t, "schedule", "create", "--vm", "web01", "--site", "lab", "--every", "24h", "--paused",
		"--keep-last", "3", "--max-chain", "2")
	require.NoError(t, err)
	assert.Equal(t, "created schedule backup-schedule-web01\ndefault retention of schedule backup-schedule-web01: keep last 3, chain of at most 3 files\n", out)
	p, err := openTestCatalog(t, pc.dsn).SchedulePolicy(ctx, "backup-schedule-web01")
	require.NoError(t, err)
	assert.Equal(t, retention.Policy{KeepLast: 3, MaxChain: 2}, p)
	_, err = srv.Client.ScheduleClient().GetHandle(ctx, "backup-schedule-web01").Describe(ctx)
	require.NoError(t, err)

	_, err = runCLI(t, "schedule", "create", "--vm", "db01", "--site", "lab", "--every", "24h", "--weekly", "-2")
	require.EqualError(t, err, "retention policy: invalid retention policy: weekly -2 is not 0-10000")
	t.Setenv("DISKFERRY_DB_DSN", "")
	_, err = runCLI(t, "schedule", "create", "--vm", "db01", "--site", "lab", "--every", "24h", "--weekly", "2")
	require.EqualError(t, err, "no catalog configured: set DISKFERRY_DB_DSN or DISKFERRY_DB_DSN_FILE to the hub's catalog DSN")
	it, err := srv.Client.ScheduleClient().List(ctx, client.ScheduleListOptions{})
	require.NoError(t, err)
	var ids []string
	for it.HasNext() {
		s, err := it.Next()
		require.NoError(t, err)
		ids = append(ids, s.ID)
	}
	assert.Equal(t, []string{"backup-schedule-web01"}, ids, "no schedule was created without its policy")
}
