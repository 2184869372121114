package workflows

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/worker"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/hub"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/testenv"
)

// catalogOutage is longer than the old retry span of a catalog step (5 attempts, about 15 s).
const catalogOutage = 20 * time.Second

// On a real server with the hub's real catalog activities on a real MariaDB: the database
// shuts down at the end of a backup and comes back after catalogOutage; the commit waits it
// out and the backup completes (it failed with "connection refused" before).
func TestBackupOnServerOutlastsCatalogRestart(t *testing.T) {
	srv := testenv.StartTemporal(t)
	db, dbInfo := testenv.StartMariaDBServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	quiet := slog.New(slog.DiscardHandler)
	store, err := catalog.Open(ctx, dbInfo.DSN, quiet)
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	require.NoError(t, store.Migrate(ctx))
	ports, err := catalog.NewPorts(store, catalog.PortRange{First: 20100, Last: 20110})
	require.NoError(t, err)
	layout, err := repo.New(t.TempDir())
	require.NoError(t, err)
	// Alive for the whole test (placement needs an alive hub), as its worker records it.
	acts, err := hub.New(store, ports, layout, hub.Settings{HubID: testHubID, RunDir: t.TempDir(), HubHeartbeat: time.Hour}, quiet)
	require.NoError(t, err)
	require.NoError(t, store.RecordHub(ctx, catalog.Hub{ID: testHubID, FreeBytes: 1 << 40, Ports: ports.Range()}))

	f := newFakeActivities(activities.ModeFull)
	t.Cleanup(func() { close(f.release) })
	restarted := make(chan error, 1)
	f.before = map[string]func(){"VerifyTarget 2001": func() {
		db.Shutdown()
		time.AfterFunc(catalogOutage, func() { restarted <- db.Restart() })
	}}
	shared := worker.New(srv.Client, activities.HubQueue, worker.Options{})
	Register(shared)
	acts.RegisterShared(shared)
	for _, w := range []worker.Worker{shared,
		worker.New(srv.Client, activities.HubHostQueue(testHubID), worker.Options{}),
		worker.New(srv.Client, activities.SNAQueue(testSite), worker.Options{}),
	} {
		if w != shared {
			f.register(w)
		}
		require.NoError(t, w.Start())
		t.Cleanup(w.Stop)
	}

	in := validInput()
	run, err := srv.Client.ExecuteWorkflow(ctx, StartBackupOptions(in), BackupWorkflowName, in)
	require.NoError(t, err)
	var res BackupResult
	require.NoError(t, run.Get(ctx, &res), "the backup outlasts the catalog restart")
	require.NoError(t, <-restarted)
	point, err := store.GetPoint(ctx, res.PointID)
	require.NoError(t, err)
	assert.Equal(t, catalog.StatusComplete, point.Status)
	assert.Len(t, point.Disks, 2)

	// The commit needed more attempts than the old policy allowed.
	var attempts int32
	it := srv.Client.GetWorkflowHistory(ctx, run.GetID(), run.GetRunID(), false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
	commit := map[int64]bool{}
	for it.HasNext() {
		ev, err := it.Next()
		require.NoError(t, err)
		if a := ev.GetActivityTaskScheduledEventAttributes(); a != nil && a.GetActivityType().GetName() == activities.CommitPointName {
			commit[ev.GetEventId()] = true
		}
		if a := ev.GetActivityTaskStartedEventAttributes(); a != nil && commit[a.GetScheduledEventId()] {
			attempts = a.GetAttempt()
		}
	}
	assert.Greater(t, attempts, int32(5), "CommitPoint attempts")
	t.Logf("CommitPoint succeeded at attempt %d after a %s catalog outage", attempts, catalogOutage)
}
