package main

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/workflows"
)

func TestBackupSchedule(t *testing.T) {
	in := workflows.BackupInput{VM: "web01", Site: "dc1"}
	opts, err := backupSchedule("s1", in, nil, 6*time.Hour, true)
	require.NoError(t, err)
	assert.Equal(t, enumspb.SCHEDULE_OVERLAP_POLICY_SKIP, opts.Overlap, "a tick during a running backup is skipped")
	assert.True(t, opts.Paused)
	require.Len(t, opts.Spec.Intervals, 1)
	assert.Equal(t, 6*time.Hour, opts.Spec.Intervals[0].Every)
	action, ok := opts.Action.(*client.ScheduleWorkflowAction)
	require.True(t, ok)
	assert.Equal(t, workflows.BackupWorkflowName, action.Workflow)
	assert.Equal(t, activities.HubQueue, action.TaskQueue)
	assert.Equal(t, []any{in}, action.Args)
	vm, ok := action.TypedSearchAttributes.GetKeyword(workflows.VMNameKey)
	require.True(t, ok)
	assert.Equal(t, "web01", vm)

	opts, err = backupSchedule("s2", in, []string{"0 1 * * *"}, 0, false)
	require.NoError(t, err)
	assert.Equal(t, []string{"0 1 * * *"}, opts.Spec.CronExpressions)
}

func TestBackupScheduleRejectsBadInput(t *testing.T) {
	in := workflows.BackupInput{VM: "web01", Site: "dc1"}
	for name, tc := range map[string]struct {
		in    workflows.BackupInput
		cron  []string
		every time.Duration
		want  string
	}{
		"neither cron nor every": {in: in, want: "exactly one of --cron or --every"},
		"both":                   {in: in, cron: []string{"@daily"}, every: time.Hour, want: "exactly one of --cron or --every"},
		"negative interval":      {in: in, every: -time.Hour, want: "negative"},
		"no site":                {in: workflows.BackupInput{VM: "web01"}, every: time.Hour, want: "site"},
		"bad mode":               {in: workflows.BackupInput{VM: "web01", Site: "dc1", Mode: "often"}, every: time.Hour, want: "mode"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := backupSchedule("s", tc.in, tc.cron, tc.every, false)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}
