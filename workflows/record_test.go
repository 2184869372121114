//go:build record

// The recorder rewrites testdata/*.json; it is built only with -tags record, so a normal
// test run never touches the recorded histories.

package workflows

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/api/temporalproto"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/testenv"
)

// TestRecordHistories runs the recorded scenarios on a real Temporal dev server, with the fake
// activities on real workers under the contract's names and queues, and writes their
// histories to testdata. Run it after an intended, versioned change of the workflow:
//
//	go test -tags record ./workflows -run TestRecordHistories
func TestRecordHistories(t *testing.T) {
	srv := testenv.StartTemporal(t)
	scenarios := []struct {
		file    string
		mode    string
		prepare func(f *fakeActivities, cancel func())
		wantErr bool
	}{
		{file: "backup_full.json", mode: activities.ModeFull},
		{file: "backup_incremental.json", mode: activities.ModeIncremental},
		{file: "backup_copy_failure.json", mode: activities.ModeFull, wantErr: true,
			prepare: func(f *fakeActivities, _ func()) { f.fail["CopyDisk 2001"] = injected("CopyDisk 2001") }},
		{file: "backup_cancel_during_copy.json", mode: activities.ModeFull, wantErr: true,
			prepare: func(f *fakeActivities, cancel func()) { f.blockAt, f.onBlock = "CopyDisk 2001", cancel }},
	}
	for _, sc := range scenarios {
		t.Run(sc.file, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			in := validInput()
			in.Mode = sc.mode
			opts := StartBackupOptions(in)
			f := newFakeActivities(sc.mode)
			t.Cleanup(func() { close(f.release) })
			if sc.prepare != nil {
				sc.prepare(f, func() {
					go func() {
						if err := srv.Client.CancelWorkflow(ctx, opts.ID, ""); err != nil {
							t.Errorf("cancel %s: %v", opts.ID, err)
						}
					}()
				})
			}
			startWorkers(t, srv.Client, f)

			run, err := srv.Client.ExecuteWorkflow(ctx, opts, BackupWorkflowName, in)
			require.NoError(t, err)
			var res BackupResult
			err = run.Get(ctx, &res)
			if sc.wantErr {
				require.Error(t, err)
			} else {
				require.NoError(t, err)
				require.Equal(t, "p1", res.PointID)
			}
			writeHistory(ctx, t, srv.Client, run, historyPath(sc.file))
		})
	}
}

func writeHistory(ctx context.Context, t *testing.T, c client.Client, run client.WorkflowRun, path string) {
	t.Helper()
	var hist historypb.History
	iter := c.GetWorkflowHistory(ctx, run.GetID(), run.GetRunID(), false, 0)
	for iter.HasNext() {
		event, err := iter.Next()
		require.NoError(t, err)
		hist.Events = append(hist.Events, event)
	}
	data, err := temporalproto.CustomJSONMarshalOptions{Indent: "  "}.Marshal(&hist)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, append(data, '\n'), 0o644))
	t.Logf("recorded %d events into %s", len(hist.Events), path)
}

// TestRecordRestoreHistories records RestoreWorkflow and MountWorkflow the same way:
//
//	go test -tags record ./workflows -run TestRecordRestoreHistories
func TestRecordRestoreHistories(t *testing.T) {
	srv := testenv.StartTemporal(t)
	inPlace := RestoreInput{Point: testPointID, Destination: activities.DestinationInPlace, PowerOff: true}
	file := RestoreInput{Point: testPointID, Destination: activities.DestinationFile, Format: activities.FormatQCOW2, Output: "/srv/restored"}
	scenarios := []struct {
		file     string
		workflow string
		id       string
		in       any
		prepare  func(f *fakeActivities, cancel func())
		// whileMounted ends a mount: unmount sends the signal, cancel cancels the run.
		whileMounted func(ctx context.Context, c client.Client, id string, cancel func()) error
		wantErr      bool
	}{
		{file: "restore_new_vm.json", workflow: RestoreWorkflowName, id: RestoreWorkflowID(activities.DestinationNewVM, "web01-restore-p1"),
			in: RestoreInput{Point: testPointID, PowerOn: true}},
		{file: "restore_new_vm_write_failure.json", workflow: RestoreWorkflowName, id: RestoreWorkflowID(activities.DestinationNewVM, "web01-restore-p1"),
			in: RestoreInput{Point: testPointID}, wantErr: true,
			prepare: func(f *fakeActivities, _ func()) { f.fail["WriteDisk 2101"] = injected("WriteDisk 2101") }},
		{file: "restore_new_vm_cancel_during_write.json", workflow: RestoreWorkflowName, id: RestoreWorkflowID(activities.DestinationNewVM, "web01-restore-p1"),
			in: RestoreInput{Point: testPointID}, wantErr: true,
			prepare: func(f *fakeActivities, cancel func()) { f.blockAt, f.onBlock = "WriteDisk 2101", cancel }},
		{file: "restore_in_place.json", workflow: RestoreWorkflowName, id: RestoreWorkflowID(activities.DestinationInPlace, "web01"), in: inPlace},
		{file: "restore_file.json", workflow: RestoreWorkflowName, id: RestoreWorkflowID(activities.DestinationFile, file.Output), in: file},
		{file: "mount_unmount.json", workflow: MountWorkflowName, id: MountWorkflowID(testPointID),
			in: MountInput{Point: testPointID, Site: testSite},
			whileMounted: func(ctx context.Context, c client.Client, id string, _ func()) error {
				return c.SignalWorkflow(ctx, id, "", UnmountSignalName, nil)
			}},
		{file: "mount_cancel.json", workflow: MountWorkflowName, id: MountWorkflowID(testPointID), in: MountInput{Point: testPointID}, wantErr: true,
			whileMounted: func(_ context.Context, _ client.Client, _ string, cancel func()) error { cancel(); return nil }},
	}
	for _, sc := range scenarios {
		t.Run(sc.file, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			opts := client.StartWorkflowOptions{ID: sc.id, TaskQueue: activities.HubQueue}
			f := newFakeActivities(activities.ModeFull)
			f.changeVM = func(vm *activities.VM) { vm.PowerState = activities.PowerOn }
			t.Cleanup(func() { close(f.release) })
			cancelRun := func() {
				go func() {
					if err := srv.Client.CancelWorkflow(ctx, opts.ID, ""); err != nil {
						t.Errorf("cancel %s: %v", opts.ID, err)
					}
				}()
			}
			if sc.prepare != nil {
				sc.prepare(f, cancelRun)
			}
			startWorkers(t, srv.Client, f)

			run, err := srv.Client.ExecuteWorkflow(ctx, opts, sc.workflow, sc.in)
			require.NoError(t, err)
			if sc.whileMounted != nil {
				require.Eventually(t, func() bool {
					v, err := srv.Client.QueryWorkflow(ctx, run.GetID(), run.GetRunID(), MountQueryName)
					require.NoError(t, err)
					var info MountInfo
					require.NoError(t, v.Get(&info))
					return info.Status == MountMounted
				}, 30*time.Second, 50*time.Millisecond, "the mount never served")
				require.NoError(t, sc.whileMounted(ctx, srv.Client, run.GetID(), cancelRun))
			}
			err = run.Get(ctx, nil)
			if sc.wantErr {
				require.Error(t, err)
			} else {
				require.NoError(t, err)
			}
			writeHistory(ctx, t, srv.Client, run, historyPath(sc.file))
		})
	}
}

// TestRecordRetentionHistories records a backup that starts its VM's retention, that
// retention, and retention runs that only plan, are skipped or fail:
//
//	go test -tags record ./workflows -run TestRecordRetentionHistories
func TestRecordRetentionHistories(t *testing.T) {
	srv := testenv.StartTemporal(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	t.Run("backup_starts_retention.json", func(t *testing.T) {
		f := newFakeActivities(activities.ModeFull)
		t.Cleanup(func() { close(f.release) })
		startWorkers(t, srv.Client, f)
		in := validInput()
		run, err := srv.Client.ExecuteWorkflow(ctx, StartBackupOptions(in), BackupWorkflowName, in)
		require.NoError(t, err)
		var res BackupResult
		require.NoError(t, run.Get(ctx, &res))
		require.Equal(t, RetentionWorkflowID("web01"), res.Retention)
		require.Empty(t, res.Warnings)
		writeHistory(ctx, t, srv.Client, run, historyPath("backup_starts_retention.json"))
		retention := srv.Client.GetWorkflow(ctx, res.Retention, "")
		require.NoError(t, retention.Get(ctx, nil))
		writeHistory(ctx, t, srv.Client, retention, historyPath("retention_apply.json"))
	})
	for _, sc := range []struct {
		file    string
		in      RetentionInput
		prepare func(f *fakeActivities)
		wantErr bool
	}{
		{file: "retention_dry_run.json", in: RetentionInput{VM: "web01", DryRun: true}},
		{file: "retention_skipped_busy.json", in: RetentionInput{VM: "web01"}, prepare: func(f *fakeActivities) {
			f.fail[activities.PlanRetentionName] = temporal.NewApplicationError("backup backup-web01 of VM web01 is running", activities.ErrBusy)
		}},
		{file: "retention_apply_failure.json", in: RetentionInput{VM: "web01", Delete: []string{"p2"}}, wantErr: true, prepare: func(f *fakeActivities) {
			f.fail[activities.ApplyRetentionName] = injected(activities.ApplyRetentionName)
		}},
	} {
		t.Run(sc.file, func(t *testing.T) {
			f := newFakeActivities(activities.ModeFull)
			t.Cleanup(func() { close(f.release) })
			if sc.prepare != nil {
				sc.prepare(f)
			}
			startWorkers(t, srv.Client, f)
			opts := client.StartWorkflowOptions{ID: RetentionWorkflowID(sc.in.VM), TaskQueue: activities.HubQueue}
			run, err := srv.Client.ExecuteWorkflow(ctx, opts, RetentionWorkflowName, sc.in)
			require.NoError(t, err)
			err = run.Get(ctx, nil)
			if sc.wantErr {
				require.Error(t, err)
			} else {
				require.NoError(t, err)
			}
			writeHistory(ctx, t, srv.Client, run, historyPath(sc.file))
		})
	}
}

// TestRecordPortWaitHistory records a backup that waits for ports and is woken by its hub
// (leasePorts, changes portWaitChange and portQueueChange): the hub has too few free ports
// three times; during the third pause the hub's PortsFreeSignal ends the wait and the next
// attempt leases them. testdata/backup_port_wait.json, recorded before portQueueChange, is
// the history of runs that only wake at their timer and stays as it was recorded.
//
//	go test -tags record ./workflows -run TestRecordPortWaitHistory
func TestRecordPortWaitHistory(t *testing.T) {
	srv := testenv.StartTemporal(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f := newFakeActivities(activities.ModeFull)
	t.Cleanup(func() { close(f.release) })
	f.exhaust[activities.AllocatePortsName] = 3
	f.portsAhead = 1
	startWorkers(t, srv.Client, f)
	in := validInput()
	run, err := srv.Client.ExecuteWorkflow(ctx, StartBackupOptions(in), BackupWorkflowName, in)
	require.NoError(t, err)
	// The third pause is 4 s: signal once its timer is in the history.
	for timers := 0; timers < 3; {
		timers = 0
		iter := srv.Client.GetWorkflowHistory(ctx, run.GetID(), run.GetRunID(), false, 0)
		for iter.HasNext() {
			event, err := iter.Next()
			require.NoError(t, err)
			if event.GetTimerStartedEventAttributes() != nil {
				timers++
			}
		}
		if timers < 3 {
			require.NoError(t, ctx.Err(), "the third pause never began")
			time.Sleep(50 * time.Millisecond) // polling the history, not synchronising on time
		}
	}
	require.NoError(t, srv.Client.SignalWorkflow(ctx, run.GetID(), run.GetRunID(), activities.PortsFreeSignal, nil))
	var res BackupResult
	require.NoError(t, run.Get(ctx, &res))
	require.Equal(t, "p1", res.PointID)
	f.mu.Lock()
	attempts := f.attempts[activities.AllocatePortsName]
	f.mu.Unlock()
	require.Equal(t, 4, attempts, "three exhausted attempts, then the lease")
	writeHistory(ctx, t, srv.Client, run, historyPath("backup_port_queue.json"))
}
