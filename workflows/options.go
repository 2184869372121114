package workflows

import (
	"slices"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
)

// CopyHeartbeatTimeout is how long a disk copy may go without heartbeating before Temporal
// declares it lost and retries it from its last checkpoint.
const CopyHeartbeatTimeout = 30 * time.Second

// LongStepHeartbeatTimeout is the heartbeat timeout of the other long steps (verification,
// vCenter snapshot tasks): they heartbeat every few seconds while they wait, so a worker
// that died is noticed within this, not after the step's start-to-close timeout of hours.
const LongStepHeartbeatTimeout = time.Minute

// DefaultWorkerWait bounds how long an SNA or hub-host step waits in its task queue for a
// worker to take it (schedule-to-start). Nobody polling the queue (a mistyped site, an SNA
// that is down) fails the backup with a message naming the queue instead of waiting forever;
// a worker restart takes well under this. BackupInput.WorkerWaitSeconds overrides it.
const DefaultWorkerWait = 2 * time.Minute

// MaxWorkerWait is the largest WorkerWaitSeconds a backup accepts.
const MaxWorkerWait = time.Hour

// Retry of the steps that read or write the catalog: with the backoff capped at
// catalogMaxInterval, catalogAttempts attempts span about 7.5 minutes, so a catalog restart
// or failover of a few minutes is waited out by every step and every undo that needs it.
const (
	catalogMaxInterval = 30 * time.Second
	catalogAttempts    = 20
)

// nonRetryable are the error types no retry can fix.
var nonRetryable = []string{
	activities.ErrBadInput, activities.ErrNotFound, activities.ErrBackupRunning,
	activities.ErrNoSpace, activities.ErrRefused, activities.ErrChangeIDRefused,
	activities.ErrPoweredOn, activities.ErrMismatch,
}

// usesCatalog are the activities that read or write the catalog.
var usesCatalog = map[string]bool{
	activities.PlanBackupName: true, activities.AllocatePortName: true, activities.ReleasePortsName: true,
	activities.CommitPointName: true, activities.FailPointName: true,
	activities.PrepareTargetName: true, activities.DiscardTargetName: true,
	activities.StartExportName: true, activities.StopExportName: true,
	activities.ResolvePointName: true, activities.MarkRestoredInPlaceName: true,
	activities.PlanRetentionName: true,
}

// options returns the activity options of one step.
//
// WaitForCancellation is set on every step: on cancel the workflow waits until an in-flight
// activity has really finished (a copy acknowledges through its heartbeat), so a step that
// completed anyway gets its undo registered and compensation never races a running step.
func (j *job) options(name, queue, summary string) workflow.ActivityOptions {
	opts := workflow.ActivityOptions{
		TaskQueue:           queue,
		StartToCloseTimeout: 2 * time.Minute,
		WaitForCancellation: true,
		Summary:             escapeMarkdown(summary),
		RetryPolicy: &temporal.RetryPolicy{
			InitialInterval:        time.Second,
			BackoffCoefficient:     2,
			MaximumInterval:        time.Minute,
			MaximumAttempts:        5,
			NonRetryableErrorTypes: nonRetryable,
		},
	}
	// The shared hub queue is polled by the worker running this workflow; the SNA and
	// hub-host queues by one machine each, which may be missing.
	if queue != activities.HubQueue {
		opts.ScheduleToStartTimeout = j.workerWait()
	}
	if usesCatalog[name] {
		opts.RetryPolicy.MaximumInterval = catalogMaxInterval
		opts.RetryPolicy.MaximumAttempts = catalogAttempts
	}
	switch name {
	case activities.PlanRetentionName:
		// A busy chain stays busy for the length of a backup: the run is skipped, the next
		// one does it. (PlanBackup and ResolvePoint retry ErrBusy: they wait for a retention.)
		opts.RetryPolicy.NonRetryableErrorTypes = append(slices.Clone(nonRetryable), activities.ErrBusy)
	case activities.CopyDiskName, activities.WriteDiskName:
		// Long copies: a short heartbeat timeout finds a dead SNA fast, the retry resumes from
		// the heartbeated checkpoint.
		opts.StartToCloseTimeout = 24 * time.Hour
		opts.HeartbeatTimeout = CopyHeartbeatTimeout
		opts.RetryPolicy.InitialInterval = 10 * time.Second
		opts.RetryPolicy.MaximumInterval = 5 * time.Minute
		opts.RetryPolicy.MaximumAttempts = 10
	case activities.AllocatePortName:
		// ErrPortsExhausted clears when other jobs finish: the run waits for it itself and
		// says so (allocatePort), the retries are for the catalog.
		opts.RetryPolicy.NonRetryableErrorTypes = append(slices.Clone(nonRetryable), activities.ErrPortsExhausted)
	case activities.CreateSnapshotName:
		// Quiescing a busy guest can take minutes.
		opts.StartToCloseTimeout = 30 * time.Minute
		opts.HeartbeatTimeout = LongStepHeartbeatTimeout
		opts.RetryPolicy.MaximumAttempts = 3
	case activities.RemoveSnapshotName:
		// Consolidation after a long copy can take long, and an orphaned snapshot grows until
		// its datastore is full: try hard.
		opts.StartToCloseTimeout = 2 * time.Hour
		opts.HeartbeatTimeout = LongStepHeartbeatTimeout
		opts.RetryPolicy.MaximumAttempts = 10
	case activities.VerifyTargetName, activities.ReadBackDiskName, activities.RestoreFileName:
		// Read (and, for a file, write) a whole disk.
		opts.StartToCloseTimeout = 12 * time.Hour
		opts.HeartbeatTimeout = LongStepHeartbeatTimeout
		opts.RetryPolicy.MaximumAttempts = 3
	case activities.CreateRestoreVMName, activities.SetPowerName:
		// vCenter tasks: creating a VM with its disks, a guest shutting down.
		opts.StartToCloseTimeout = 30 * time.Minute
		opts.HeartbeatTimeout = LongStepHeartbeatTimeout
		opts.RetryPolicy.MaximumAttempts = 3
	case activities.DestroyRestoreVMName:
		// A VM left behind holds its datastore space and its name: try hard.
		opts.StartToCloseTimeout = 30 * time.Minute
		opts.HeartbeatTimeout = LongStepHeartbeatTimeout
		opts.RetryPolicy.MaximumAttempts = 10
	case activities.ApplyRetentionName:
		// Merges of whole disks on the hub: the heartbeat finds a dead hub worker fast, and
		// every step is idempotent, so a retry finishes what the lost attempt began.
		opts.RetryPolicy.NonRetryableErrorTypes = append(slices.Clone(nonRetryable), activities.ErrBusy)
		opts.StartToCloseTimeout = 24 * time.Hour
		opts.HeartbeatTimeout = LongStepHeartbeatTimeout
		opts.RetryPolicy.InitialInterval = 10 * time.Second
		opts.RetryPolicy.MaximumInterval = 5 * time.Minute
		opts.RetryPolicy.MaximumAttempts = 10
	case activities.PrepareTargetName, activities.StartExportName, activities.StopExportName,
		activities.DiscardTargetName, activities.EnsureTunnelName, activities.DropTunnelName,
		activities.InspectVMName, activities.ReadChangeIDsName:
		opts.StartToCloseTimeout = 5 * time.Minute
	}
	return opts
}
