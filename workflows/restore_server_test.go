package workflows

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/testenv"
)

// TestRestoreOnServer runs a restore to a new VM on a real dev server with the fake
// activities, blocked in the write of one disk, and checks what the CLI relies on: the
// progress query plus the WriteDisk heartbeat give live bytes keyed by the point's disk, the
// search attributes find the run, and a cancel removes the new VM after the tunnel, exports
// and leases.
func TestRestoreOnServer(t *testing.T) {
	srv := testenv.StartTemporal(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	f, blocked := blockedFakes(t, "WriteDisk 2101")
	f.blockHeartbeat = activities.CopyProgress{Checkpoint: 3 * gib, BytesDone: 3 * gib, BytesTotal: 8 * gib}
	startWorkers(t, srv.Client, f)

	opts := client.StartWorkflowOptions{ID: RestoreWorkflowID(activities.DestinationNewVM, "web01-restore-p1"), TaskQueue: activities.HubQueue}
	run, err := srv.Client.ExecuteWorkflow(ctx, opts, RestoreWorkflowName, RestoreInput{Point: testPointID})
	require.NoError(t, err)
	select {
	case <-blocked:
	case <-ctx.Done():
		t.Fatal("the write of disk 2001 never started")
	}

	var live Progress
	require.Eventually(t, func() bool {
		desc, err := srv.Client.DescribeWorkflow(ctx, run.GetID(), run.GetRunID())
		require.NoError(t, err)
		copies, err := LiveCopies(desc.RawResponse.GetPendingActivities(), converter.GetDefaultDataConverter())
		require.NoError(t, err)
		if _, ok := copies[2001]; !ok {
			return false
		}
		v, err := srv.Client.QueryWorkflow(ctx, run.GetID(), run.GetRunID(), ProgressQueryName)
		require.NoError(t, err)
		var p Progress
		require.NoError(t, v.Get(&p))
		live = p.WithLiveCopies(copies, time.Now())
		return true
	}, 10*time.Second, 50*time.Millisecond, "no heartbeat of the write of disk 2001")
	assert.Equal(t, StatusCopying, live.Status)
	assert.Equal(t, activities.DestinationNewVM, live.Mode)
	d := live.disk(2001)
	require.NotNil(t, d)
	assert.Equal(t, PhaseCopying, d.Phase)
	assert.Equal(t, 3*gib, d.BytesDone)
	assert.Equal(t, 8*gib, d.BytesTotal)

	assertVisible(ctx, t, srv, `WorkflowType = "RestoreWorkflow" AND VMName = "web01" AND Site = "lab" AND BackupStatus = "copying"`)

	require.NoError(t, srv.Client.CancelWorkflow(ctx, run.GetID(), run.GetRunID()))
	err = run.Get(ctx, nil)
	var canceled *temporal.CanceledError
	require.ErrorAs(t, err, &canceled)
	assert.Equal(t, append(until(t, newVMForward, "WriteDisk 2101"), newVMUndosAfter["WriteDisk 2101"]...), f.recorded())
	assertVisible(ctx, t, srv, `WorkflowType = "RestoreWorkflow" AND VMName = "web01" AND BackupStatus = "cancelled"`)
}
