package lab_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	sdkpb "go.temporal.io/api/sdk/v1"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/workflows"
)

// TestPlacementEndToEnd runs placement on two hubs: a VM's second backup stays on the hub of
// its first point; with that hub's worker stopped (and no longer alive), a new VM goes to the
// other hub, and a backup of the first VM still goes to its chain's hub, where no worker
// takes it: it fails with NoWorker naming that hub's queue after the worker wait, its job log
// says whose chain waits for which hub, and nothing of it lands on the other hub.
func TestPlacementEndToEnd(t *testing.T) {
	const heartbeat = time.Second
	l := startLab(t, lab.Options{VMs: 2, Hubs: 2, Disks: 1, DiskSize: 8 << 20, HubHeartbeat: heartbeat})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	chained, fresh := l.VC.VMs[0], l.VC.VMs[1]

	first := runBackup(ctx, t, l, workflows.BackupInput{VM: chained.Name, Site: l.Site})
	second := runBackup(ctx, t, l, workflows.BackupInput{VM: chained.Name, Site: l.Site})
	require.Equal(t, activities.ModeIncremental, second.Mode)
	require.Equal(t, first.HubID, second.HubID, "the incremental stays with its chain")
	home := labHub(t, l, first.HubID)
	var other lab.Hub
	for _, h := range l.Hubs {
		if h.ID != home.ID {
			other = h
		}
	}

	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	defer store.Close()
	l.StopWorker(home.Worker)
	require.Eventually(t, func() bool {
		hubs, err := store.ListHubs(ctx)
		require.NoError(t, err)
		for _, h := range hubs {
			if h.ID == home.ID {
				return !h.Alive(time.Now(), 3*heartbeat)
			}
		}
		return false
	}, time.Minute, 100*time.Millisecond, "hub %s stayed alive after its worker stopped", home.ID)

	placed := runBackup(ctx, t, l, workflows.BackupInput{VM: fresh.Name, Site: l.Site})
	require.Equal(t, other.ID, placed.HubID, "a new VM goes to the alive hub")
	requireSameContent(ctx, t, fresh.Disks[0].FlatPath, placed.Disks[0].Path)

	in := workflows.BackupInput{VM: chained.Name, Site: l.Site, WorkerWaitSeconds: 5}
	run, err := l.Temporal.Client.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
	require.NoError(t, err)
	err = getResult(ctx, run, nil)
	var appErr *temporal.ApplicationError
	require.ErrorAs(t, err, &appErr, "the backup of %s fails", chained.Name)
	require.Equal(t, activities.ErrNoWorker, appErr.Type(), "%v", err)
	require.Contains(t, appErr.Error(), activities.HubHostQueue(home.ID))

	details := currentDetails(ctx, t, l, run.GetID(), run.GetRunID())
	note := fmt.Sprintf("hub %s holding VM %s's chain was last seen", home.ID, chained.Name)
	require.Contains(t, details, note)

	// Nothing of the chained VM on the other hub: no point, no file, no lease or export.
	var p workflows.Progress
	v, err := l.Temporal.Client.QueryWorkflow(ctx, run.GetID(), run.GetRunID(), workflows.ProgressQueryName)
	require.NoError(t, err)
	require.NoError(t, v.Get(&p))
	if p.PointID != "" {
		point, err := store.GetPoint(ctx, p.PointID)
		require.NoError(t, err)
		require.Equal(t, home.ID, point.Hub)
		require.NotEqual(t, catalog.StatusComplete, point.Status)
	}
	layout, err := repo.New(other.RepoRoot)
	require.NoError(t, err)
	dir, err := layout.VMDir(chained.Name, chained.Moref)
	require.NoError(t, err)
	_, err = os.Stat(dir)
	require.ErrorIs(t, err, os.ErrNotExist, "%s has files of %s", other.ID, chained.Name)
	ports, err := catalog.NewPorts(store, catalog.DefaultPortRange)
	require.NoError(t, err)
	leases, err := ports.ListLeases(ctx, other.ID)
	require.NoError(t, err)
	require.Empty(t, leases)
	exports, err := store.ListExports(ctx, other.ID)
	require.NoError(t, err)
	require.Empty(t, exports)
	entries, err := os.ReadDir(filepath.Join(other.RunDir, "exports"))
	require.NoError(t, err)
	require.Empty(t, entries, "export sockets left on %s", other.ID)
}

// currentDetails is a run's Current Details (its job log), as the Web UI shows it.
func currentDetails(ctx context.Context, t *testing.T, l *lab.Lab, workflowID, runID string) string {
	t.Helper()
	v, err := l.Temporal.Client.QueryWorkflow(ctx, workflowID, runID, "__temporal_workflow_metadata")
	require.NoError(t, err)
	var meta sdkpb.WorkflowMetadata
	require.NoError(t, v.Get(&meta))
	return meta.GetCurrentDetails()
}
