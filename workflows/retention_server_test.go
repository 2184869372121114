package workflows

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/testenv"
)

// TestBackupStartsRetentionOnServer checks on a real dev server what the test environment
// cannot show: the retention a backup starts outlives the backup (abandoned child); the next
// backup finds it running and completes without a warning; a backup started by a schedule
// passes the schedule's ID (TemporalScheduledById) to its retention.
func TestBackupStartsRetentionOnServer(t *testing.T) {
	srv := testenv.StartTemporal(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	f := newFakeActivities(activities.ModeFull)
	t.Cleanup(func() { close(f.release) })
	// The first retention holds its plan until cancelled: it is still running when the next
	// backup ends.
	f.blockAt = activities.PlanRetentionName
	startWorkers(t, srv.Client, f)
	retentionID := RetentionWorkflowID("web01")

	in := validInput()
	for i := range 2 {
		run, err := srv.Client.ExecuteWorkflow(ctx, StartBackupOptions(in), BackupWorkflowName, in)
		require.NoError(t, err)
		var res BackupResult
		require.NoError(t, run.Get(ctx, &res), "backup %d", i)
		assert.Equal(t, retentionID, res.Retention, "backup %d", i)
		assert.Empty(t, res.Warnings, "backup %d: a running retention is no warning", i)

		desc, err := srv.Client.DescribeWorkflow(ctx, retentionID, "")
		require.NoError(t, err)
		info := desc.RawResponse.GetWorkflowExecutionInfo()
		assert.Equal(t, enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING, info.GetStatus(), "the retention outlives backup %d", i)
		assert.Equal(t, RetentionWorkflowName, info.GetType().GetName())
	}
	f.mu.Lock()
	assert.Len(t, f.planRetentions, 1, "one retention for both backups")
	f.mu.Unlock()
	require.NoError(t, srv.Client.CancelWorkflow(ctx, retentionID, ""))
	var canceled *temporal.CanceledError
	require.ErrorAs(t, srv.Client.GetWorkflow(ctx, retentionID, "").Get(ctx, nil), &canceled)

	const scheduleID = "backup-schedule-web01"
	handle, err := srv.Client.ScheduleClient().Create(ctx, client.ScheduleOptions{
		ID:     scheduleID,
		Spec:   client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: 24 * time.Hour}}},
		Paused: true,
		Action: &client.ScheduleWorkflowAction{
			ID: BackupWorkflowID(in.VM), Workflow: BackupWorkflowName, Args: []any{in}, TaskQueue: activities.HubQueue,
		},
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = handle.Delete(context.Background()) })
	require.NoError(t, handle.Trigger(ctx, client.ScheduleTriggerOptions{}))
	require.Eventually(t, func() bool {
		desc, err := srv.Client.DescribeWorkflow(ctx, retentionID, "")
		return err == nil && desc.RawResponse.GetWorkflowExecutionInfo().GetStatus() == enumspb.WORKFLOW_EXECUTION_STATUS_COMPLETED
	}, time.Minute, 100*time.Millisecond, "the scheduled backup's retention never completed")
	var out RetentionOutcome
	require.NoError(t, srv.Client.GetWorkflow(ctx, retentionID, "").Get(ctx, &out))
	assert.Equal(t, activities.RetentionResult{Deleted: []string{"p1"}, Flattened: []string{"p2"}, BytesFreed: 3 * gib}, out.Result)
	f.mu.Lock()
	defer f.mu.Unlock()
	require.Len(t, f.planRetentions, 2)
	assert.Equal(t, activities.PlanRetentionInput{VM: "web01", ScheduleID: scheduleID}, f.planRetentions[1])
}
