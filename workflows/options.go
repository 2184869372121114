package workflows

import (
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
)

// CopyHeartbeatTimeout is how long a disk copy may go without heartbeating before Temporal
// declares it lost and retries it from its last checkpoint.
const CopyHeartbeatTimeout = 30 * time.Second

// nonRetryable are the error types no retry can fix.
var nonRetryable = []string{activities.ErrBadInput, activities.ErrNotFound, activities.ErrBackupRunning}

// options returns the activity options of one step.
//
// WaitForCancellation is set on every step: on cancel the workflow waits until an in-flight
// activity has really finished (a copy acknowledges through its heartbeat), so a step that
// completed anyway gets its undo registered and compensation never races a running step.
func (b *backup) options(name, queue, summary string) workflow.ActivityOptions {
	opts := workflow.ActivityOptions{
		TaskQueue:           queue,
		StartToCloseTimeout: 2 * time.Minute,
		WaitForCancellation: true,
		Summary:             summary,
		RetryPolicy: &temporal.RetryPolicy{
			InitialInterval:        time.Second,
			BackoffCoefficient:     2,
			MaximumInterval:        time.Minute,
			MaximumAttempts:        5,
			NonRetryableErrorTypes: nonRetryable,
		},
	}
	switch name {
	case activities.CopyDiskName:
		// Long copies: a short heartbeat timeout finds a dead SNA fast, the retry resumes from
		// the heartbeated checkpoint.
		opts.StartToCloseTimeout = 24 * time.Hour
		opts.HeartbeatTimeout = CopyHeartbeatTimeout
		opts.RetryPolicy.InitialInterval = 10 * time.Second
		opts.RetryPolicy.MaximumInterval = 5 * time.Minute
		opts.RetryPolicy.MaximumAttempts = 10
	case activities.AllocatePortName:
		// ErrPortsExhausted clears when other backups finish: keep trying for a while.
		opts.RetryPolicy.InitialInterval = 5 * time.Second
		opts.RetryPolicy.MaximumAttempts = 0
		opts.ScheduleToCloseTimeout = 30 * time.Minute
	case activities.CreateSnapshotName:
		// Quiescing a busy guest can take minutes.
		opts.StartToCloseTimeout = 30 * time.Minute
		opts.RetryPolicy.MaximumAttempts = 3
	case activities.RemoveSnapshotName:
		// Consolidation after a long copy can take long, and an orphaned snapshot grows until
		// its datastore is full: try hard.
		opts.StartToCloseTimeout = 2 * time.Hour
		opts.RetryPolicy.MaximumAttempts = 10
	case activities.VerifyTargetName:
		// Reads the whole written content back.
		opts.StartToCloseTimeout = 12 * time.Hour
		opts.RetryPolicy.MaximumAttempts = 3
	case activities.PrepareTargetName, activities.StartExportName, activities.StopExportName,
		activities.DiscardTargetName, activities.EnsureTunnelName, activities.DropTunnelName,
		activities.InspectVMName, activities.ReadChangeIDsName:
		opts.StartToCloseTimeout = 5 * time.Minute
	case activities.ReleasePortsName, activities.FailPointName:
		// Cleanup of the catalog must outlast a short database outage.
		opts.RetryPolicy.MaximumAttempts = 10
	}
	return opts
}
