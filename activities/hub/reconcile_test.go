package hub

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/testenv"
)

const (
	reconcileQueue = "reconcile-test"
	finishSignal   = "finish"
)

// waitForFinish stands in for a backup: it runs until signalled.
func waitForFinish(ctx workflow.Context) error {
	workflow.GetSignalChannel(ctx, finishSignal).Receive(ctx, nil)
	return nil
}

// qemuNBDUnder lists the qemu-nbd processes whose arguments mention dir.
func qemuNBDUnder(t *testing.T, dir string) []string {
	t.Helper()
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	require.NoError(t, err)
	var found []string
	for _, p := range procs {
		raw, err := os.ReadFile(p)
		if err != nil || len(raw) == 0 {
			continue
		}
		args := strings.Split(strings.TrimSuffix(string(raw), "\x00"), "\x00")
		if filepath.Base(args[0]) == "qemu-nbd" && strings.Contains(string(raw), dir) {
			found = append(found, strings.Join(args, " "))
		}
	}
	return found
}

func TestReconcileAfterWorkerRestart(t *testing.T) {
	testenv.Integration(t)
	srv := testenv.StartTemporal(t)
	ctx := context.Background()

	w := worker.New(srv.Client, reconcileQueue, worker.Options{})
	w.RegisterWorkflowWithOptions(waitForFinish, workflow.RegisterOptions{Name: "WaitForFinish"})
	require.NoError(t, w.Start())
	t.Cleanup(w.Stop)
	start := func(id string) client.WorkflowRun {
		run, err := srv.Client.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: id, TaskQueue: reconcileQueue}, "WaitForFinish")
		require.NoError(t, err)
		return run
	}
	running, closing := start("wf-running"), start("wf-closed")
	t.Cleanup(func() { _ = srv.Client.TerminateWorkflow(context.Background(), running.GetID(), "", "test over") })

	store := newStore(t)
	runDir := filepath.Join(testenv.ShortTempDir(t), "run")
	root := filepath.Join(t.TempDir(), "repo")
	rng := exportPorts(t, 4)
	settings := Settings{WorkflowClosed: WorkflowClosedFunc(srv.Client)}
	before := newRig(t, store, rng, runDir, root, settings)

	exportFor := func(wf, moref string) activities.Export {
		vm := testVM()
		vm.Moref = moref
		plan, err := before.plan(t, wf, vm, activities.ModeAuto, diskA)
		require.NoError(t, err)
		var target activities.Target
		require.NoError(t, before.run(t, activities.PrepareTargetName, activities.PrepareTargetInput{PointID: plan.PointID, VM: vm, Disk: plan.Disks[0]}, &target))
		return before.export(t, wf, target)
	}
	live, stray := exportFor("wf-running", "vm-1"), exportFor("wf-closed", "vm-2")

	// The crash: one export never made it into the catalog, and a row outlived its process.
	require.NoError(t, store.RemoveExport(ctx, hubID, live.Port))
	deadPort := rng.Last
	require.NoError(t, store.RecordExport(ctx, catalog.Export{Hub: hubID, Port: deadPort, PID: 4194000, Path: live.Path, WorkflowID: "wf-gone", DiskKey: diskB}))
	// A verification export the crashed worker left behind.
	verifyDir, err := os.MkdirTemp(runDir, verifyDirPrefix)
	require.NoError(t, err)
	verifier, err := qemu.Start(ctx, qemu.ExportOptions{
		Path: testenv.CreateQcow2(t, mib), Socket: filepath.Join(verifyDir, "nbd.sock"), Name: "verify",
		PidFile: filepath.Join(verifyDir, "nbd.pid"), ReadOnly: true,
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = verifier.Stop(context.Background(), time.Second) })

	require.NoError(t, srv.Client.SignalWorkflow(ctx, closing.GetID(), "", finishSignal, nil))
	require.NoError(t, closing.Get(ctx, nil))

	isClosed := WorkflowClosedFunc(srv.Client)
	for id, want := range map[string]bool{"wf-running": false, "wf-closed": true, "wf-never-started": true} {
		closed, err := isClosed(ctx, id)
		require.NoError(t, err)
		assert.Equal(t, want, closed, id)
	}

	after := newRig(t, store, rng, runDir, root, settings) // the restarted worker
	report, err := after.acts.Reconcile(ctx)
	require.NoError(t, err)
	require.Len(t, report.Reaped, 1)
	assert.Equal(t, "wf-closed", report.Reaped[0].WorkflowID)
	assert.Equal(t, []int{stray.Port}, report.Stopped)
	assert.Equal(t, []int{live.Port}, report.Registered)
	assert.Equal(t, []int{deadPort}, report.Forgotten)
	assert.Equal(t, 1, report.Verifiers)

	require.NoError(t, handshake(live.Port), "the running workflow's export still serves")
	assert.True(t, processAlive(live.PID))
	assert.False(t, processAlive(stray.PID), "the closed workflow's export is stopped")
	assert.Error(t, handshake(stray.Port))
	assert.False(t, processAlive(verifier.PID), "the leftover verification export is stopped")
	assert.NoDirExists(t, verifyDir)

	rows, err := store.ListExports(ctx, hubID)
	require.NoError(t, err)
	require.Len(t, rows, 1)
	assert.Equal(t, live.Port, rows[0].Port)
	assert.Equal(t, live.PID, rows[0].PID)
	assert.Equal(t, "wf-running", rows[0].WorkflowID)
	assert.Equal(t, diskA, rows[0].DiskKey)
	leases, err := after.ports.ListLeases(ctx, hubID)
	require.NoError(t, err)
	require.Len(t, leases, 1)
	assert.Equal(t, "wf-running", leases[0].WorkflowID)
	procs := qemuNBDUnder(t, runDir)
	require.Len(t, procs, 1, "qemu-nbd processes: %v", procs)
	assert.Contains(t, procs[0], live.Path)

	again, err := after.acts.Reconcile(ctx)
	require.NoError(t, err)
	assert.Equal(t, ReconcileReport{}, again, "a second reconcile changes nothing")

	// The closed workflow left its point running; the next backup of its VM takes over.
	vm := testVM()
	vm.Moref = "vm-2"
	_, err = after.plan(t, "wf-next", vm, activities.ModeAuto, diskA)
	require.NoError(t, err)

	require.NoError(t, after.run(t, activities.StopExportName, activities.StopExportInput{Port: live.Port, Path: live.Path}, nil))
	assert.Empty(t, qemuNBDUnder(t, runDir))
}
