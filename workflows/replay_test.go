package workflows

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
)

// recorded histories: one backup success per mode, a failure that compensates and a cancel
// mid-copy; a restore per destination, a restore whose write fails and one cancelled
// mid-write; a mount ended by unmount and one by cancel; a backup that starts its VM's
// retention (the backups above predate that step), that retention, a dry run, a run skipped
// because the chain is busy and one whose apply fails; a backup that waits for ports
// (portWaitChange: the older backups lease disk by disk).
var histories = []string{
	"backup_full.json",
	"backup_incremental.json",
	"backup_copy_failure.json",
	"backup_cancel_during_copy.json",
	"restore_new_vm.json",
	"restore_new_vm_write_failure.json",
	"restore_new_vm_cancel_during_write.json",
	"restore_in_place.json",
	"restore_file.json",
	"mount_unmount.json",
	"mount_cancel.json",
	"backup_starts_retention.json",
	"retention_apply.json",
	"retention_dry_run.json",
	"retention_skipped_busy.json",
	"retention_apply_failure.json",
	"backup_port_wait.json",
}

func historyPath(name string) string { return filepath.Join("testdata", name) }

// TestReplayRecordedHistories replays every recorded history against the current workflow
// code: a change that is not replay-safe (a step added, removed or reordered without
// workflow.GetVersion) fails here before it can break running backups.
//
// Every testdata/*.json replays, so histories kept from older workflow versions are covered too.
func TestReplayRecordedHistories(t *testing.T) {
	files, err := filepath.Glob(historyPath("*.json"))
	require.NoError(t, err)
	for _, name := range histories {
		require.Contains(t, files, historyPath(name), "recorded history missing")
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			replayer := worker.NewWorkflowReplayer()
			Register(replayer)
			require.NoError(t, replayer.ReplayWorkflowHistoryFromJSONFile(testLogger(t), file))
		})
	}
}

// preCheckName is a made-up activity that a "new version" of the workflow runs first.
const preCheckName = "PreCheck"

// unguardedChange is BackupWorkflow with a step added up front, shipped carelessly.
func unguardedChange(ctx workflow.Context, in BackupInput) (BackupResult, error) {
	ctx = workflow.WithActivityOptions(ctx, workflow.ActivityOptions{TaskQueue: activities.HubQueue, StartToCloseTimeout: time.Minute})
	if err := workflow.ExecuteActivity(ctx, preCheckName, in).Get(ctx, nil); err != nil {
		return BackupResult{}, err
	}
	return BackupWorkflow(ctx, in)
}

// guardedChange adds the same step behind workflow.GetVersion: runs that started before the
// change replay the old path, new runs take the new one.
func guardedChange(ctx workflow.Context, in BackupInput) (BackupResult, error) {
	if workflow.GetVersion(ctx, "pre-check", workflow.DefaultVersion, 1) == 1 {
		actx := workflow.WithActivityOptions(ctx, workflow.ActivityOptions{TaskQueue: activities.HubQueue, StartToCloseTimeout: time.Minute})
		if err := workflow.ExecuteActivity(actx, preCheckName, in).Get(actx, nil); err != nil {
			return BackupResult{}, err
		}
	}
	return BackupWorkflow(ctx, in)
}

// TestReplayCatchesUnversionedChange shows the replay test guards what docs/versioning.md
// promises: the unguarded change is rejected, the GetVersion one accepted.
func TestReplayCatchesUnversionedChange(t *testing.T) {
	for _, tc := range []struct {
		name     string
		workflow func(workflow.Context, BackupInput) (BackupResult, error)
		ok       bool
	}{
		{"unguarded", unguardedChange, false},
		{"guarded", guardedChange, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			replayer := worker.NewWorkflowReplayer()
			replayer.RegisterWorkflowWithOptions(tc.workflow, workflow.RegisterOptions{Name: BackupWorkflowName})
			err := replayer.ReplayWorkflowHistoryFromJSONFile(testLogger(t), historyPath("backup_full.json"))
			if tc.ok {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			// TMPRL1100 is the SDK's code for a nondeterministic replay.
			assert.Contains(t, err.Error(), "TMPRL1100")
		})
	}
}

// startWorkers polls the hub, hub host and SNA queues with the fakes until the test ends.
func startWorkers(t *testing.T, c client.Client, f *fakeActivities) {
	t.Helper()
	for _, queue := range []string{activities.HubQueue, activities.HubHostQueue(testHubID), activities.SNAQueue(testSite)} {
		// A short throttle lets a heartbeat deliver the cancel at once.
		w := worker.New(c, queue, worker.Options{MaxHeartbeatThrottleInterval: 50 * time.Millisecond})
		if queue == activities.HubQueue {
			Register(w)
		}
		f.register(w)
		require.NoError(t, w.Start())
		t.Cleanup(w.Stop)
	}
}

// TestRecordedHistoriesShowCompensation checks the recorded failure histories contain what
// they are kept for, so a re-recording cannot silently lose the compensation path.
func TestRecordedHistoriesShowCompensation(t *testing.T) {
	for name, want := range map[string][]string{
		"backup_copy_failure.json":                {"RemoveSnapshot", "DropTunnel", "StopExport", "DiscardTarget", "ReleasePorts", "FailPoint"},
		"backup_cancel_during_copy.json":          {"RemoveSnapshot", "DropTunnel", "StopExport", "DiscardTarget", "ReleasePorts", "FailPoint"},
		"backup_full.json":                        {"CommitPoint", "ReleasePorts"},
		"restore_new_vm.json":                     {"CreateRestoreVM", "WriteDisk", "ReadBackDisk", "SetPower"},
		"restore_new_vm_write_failure.json":       {"DropTunnel", "StopExport", "ReleasePorts", "DestroyRestoreVM"},
		"restore_new_vm_cancel_during_write.json": {"DropTunnel", "StopExport", "ReleasePorts", "DestroyRestoreVM"},
		"restore_in_place.json":                   {"InspectVM", "SetPower", "MarkRestoredInPlace", "WriteDisk", "ReadBackDisk"},
		"restore_file.json":                       {"ResolvePoint", "RestoreFile"},
		"mount_unmount.json":                      {"EnsureTunnel", "DropTunnel", "StopExport", "ReleasePorts"},
		"mount_cancel.json":                       {"StartExport", "StopExport", "ReleasePorts"},
		"backup_starts_retention.json":            {"CommitPoint", "ReleasePorts"},
		"retention_apply.json":                    {"PlanRetention", "ApplyRetention"},
		"retention_dry_run.json":                  {"PlanRetention"},
		"retention_skipped_busy.json":             {"PlanRetention"},
		"retention_apply_failure.json":            {"PlanRetention", "ApplyRetention"},
	} {
		t.Run(name, func(t *testing.T) {
			f, err := os.Open(historyPath(name))
			require.NoError(t, err)
			defer f.Close()
			hist, err := client.HistoryFromJSON(f, client.HistoryJSONOptions{})
			require.NoError(t, err)
			var scheduled []string
			for _, e := range hist.GetEvents() {
				if a := e.GetActivityTaskScheduledEventAttributes(); a != nil {
					scheduled = append(scheduled, a.GetActivityType().GetName())
				}
			}
			for _, activity := range want {
				assert.Contains(t, scheduled, activity)
			}
			switch name {
			case "backup_copy_failure.json", "backup_cancel_during_copy.json":
				assert.NotContains(t, scheduled, activities.CommitPointName)
			case "restore_new_vm.json", "restore_in_place.json":
				assert.NotContains(t, scheduled, activities.DestroyRestoreVMName)
			case "retention_dry_run.json", "retention_skipped_busy.json":
				assert.NotContains(t, scheduled, activities.ApplyRetentionName)
			}
		})
	}
}

// TestRecordedBackupStartsRetention checks the new backup history holds what the change is
// about: the version marker, then the retention started as an abandoned child under the VM's
// retention ID after the point was committed; the older backup histories hold neither.
func TestRecordedBackupStartsRetention(t *testing.T) {
	children := func(name string) (markers int, started []*historypb.StartChildWorkflowExecutionInitiatedEventAttributes, afterCommit bool) {
		f, err := os.Open(historyPath(name))
		require.NoError(t, err)
		defer f.Close()
		hist, err := client.HistoryFromJSON(f, client.HistoryJSONOptions{})
		require.NoError(t, err)
		committed := false
		afterCommit = true
		for _, e := range hist.GetEvents() {
			if a := e.GetActivityTaskScheduledEventAttributes(); a != nil && a.GetActivityType().GetName() == activities.CommitPointName {
				committed = true
			}
			if e.GetMarkerRecordedEventAttributes() != nil {
				markers++
			}
			if a := e.GetStartChildWorkflowExecutionInitiatedEventAttributes(); a != nil {
				started = append(started, a)
				afterCommit = afterCommit && committed
			}
		}
		return markers, started, afterCommit
	}
	markers, started, afterCommit := children("backup_starts_retention.json")
	assert.Equal(t, 1, markers)
	require.Len(t, started, 1)
	assert.True(t, afterCommit)
	assert.Equal(t, RetentionWorkflowID("web01"), started[0].GetWorkflowId())
	assert.Equal(t, RetentionWorkflowName, started[0].GetWorkflowType().GetName())
	assert.Equal(t, enumspb.PARENT_CLOSE_POLICY_ABANDON, started[0].GetParentClosePolicy())
	for _, old := range []string{"backup_full.json", "backup_incremental.json"} {
		markers, started, _ := children(old)
		assert.Zero(t, markers, old)
		assert.Empty(t, started, old)
	}
}

// TestRecordedBackupWaitsForPorts checks the port-wait history holds the path it is kept for,
// so a re-recording cannot silently lose it: the portWaitChange marker, then every disk's
// ports asked in one AllocatePorts, twice refused with PortsExhausted and each time followed
// by a timer, then leased, before the first export; no disk-by-disk AllocatePort.
func TestRecordedBackupWaitsForPorts(t *testing.T) {
	steps := portWaitSteps(t, "backup_port_wait.json")
	start := slices.Index(steps, "marker "+portWaitChange)
	require.GreaterOrEqual(t, start, 0, "the port-wait marker: %v", steps)
	assert.Equal(t, []string{
		"marker " + portWaitChange,
		activities.AllocatePortsName, activities.AllocatePortsName + " failed " + activities.ErrPortsExhausted, "timer", "timer fired",
		activities.AllocatePortsName, activities.AllocatePortsName + " failed " + activities.ErrPortsExhausted, "timer", "timer fired",
		activities.AllocatePortsName, activities.PrepareTargetName,
	}, steps[start:min(start+11, len(steps))])
	assert.NotContains(t, steps, "marker "+portQueueChange, "recorded before the wake-up")
	assert.NotContains(t, steps, activities.AllocatePortName)
}

// TestRecordedBackupIsWokenForPorts checks the port-queue history holds the wake-up it is
// kept for: after the first refusal the portQueueChange marker, two timers that fire, then a
// third cut short by the hub's PortsFreeSignal (the timer cancelled), and the lease at once.
func TestRecordedBackupIsWokenForPorts(t *testing.T) {
	steps := portWaitSteps(t, "backup_port_queue.json")
	start := slices.Index(steps, "marker "+portWaitChange)
	require.GreaterOrEqual(t, start, 0, "the port-wait marker: %v", steps)
	refused := activities.AllocatePortsName + " failed " + activities.ErrPortsExhausted
	assert.Equal(t, []string{
		"marker " + portWaitChange,
		activities.AllocatePortsName, refused, "marker " + portQueueChange, "timer", "timer fired",
		activities.AllocatePortsName, refused, "timer", "timer fired",
		activities.AllocatePortsName, refused, "timer", "signal " + activities.PortsFreeSignal, "timer canceled",
		activities.AllocatePortsName, activities.PrepareTargetName,
	}, steps[start:min(start+17, len(steps))])
}

// portWaitSteps reads a recorded history as the steps of its wait for ports: version
// markers, activities scheduled and failed (with the failure's type), timers, signals.
func portWaitSteps(t *testing.T, file string) []string {
	t.Helper()
	f, err := os.Open(historyPath(file))
	require.NoError(t, err)
	defer f.Close()
	hist, err := client.HistoryFromJSON(f, client.HistoryJSONOptions{})
	require.NoError(t, err)
	var (
		steps     []string
		scheduled = map[int64]string{}
	)
	for _, e := range hist.GetEvents() {
		switch {
		case e.GetMarkerRecordedEventAttributes() != nil:
			var change string
			require.NoError(t, converter.GetDefaultDataConverter().FromPayloads(e.GetMarkerRecordedEventAttributes().GetDetails()["change-id"], &change))
			steps = append(steps, "marker "+change)
		case e.GetActivityTaskScheduledEventAttributes() != nil:
			name := e.GetActivityTaskScheduledEventAttributes().GetActivityType().GetName()
			scheduled[e.GetEventId()] = name
			steps = append(steps, name)
		case e.GetActivityTaskFailedEventAttributes() != nil:
			a := e.GetActivityTaskFailedEventAttributes()
			steps = append(steps, scheduled[a.GetScheduledEventId()]+" failed "+a.GetFailure().GetApplicationFailureInfo().GetType())
		case e.GetTimerStartedEventAttributes() != nil:
			steps = append(steps, "timer")
		case e.GetTimerFiredEventAttributes() != nil:
			steps = append(steps, "timer fired")
		case e.GetTimerCanceledEventAttributes() != nil:
			steps = append(steps, "timer canceled")
		case e.GetWorkflowExecutionSignaledEventAttributes() != nil:
			steps = append(steps, "signal "+e.GetWorkflowExecutionSignaledEventAttributes().GetSignalName())
		}
	}
	return steps
}
