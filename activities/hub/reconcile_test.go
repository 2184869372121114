package hub

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
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

	targetFor := func(wf, moref string) (activities.Plan, activities.Target) {
		vm := testVM()
		vm.Moref = moref
		plan, err := before.plan(t, wf, vm, activities.ModeAuto, diskA)
		require.NoError(t, err)
		var target activities.Target
		require.NoError(t, before.run(t, activities.PrepareTargetName, activities.PrepareTargetInput{PointID: plan.PointID, VM: vm, Disk: plan.Disks[0]}, &target))
		return plan, target
	}
	exportFor := func(wf, moref string) (activities.Plan, activities.Export) {
		plan, target := targetFor(wf, moref)
		return plan, before.export(t, wf, target)
	}
	_, live := exportFor("wf-running", "vm-1")
	// The closed workflow's compensation could not reach the catalog: its point stayed
	// running, its lease, export row and export process and its target stayed too.
	strayPlan, stray := exportFor("wf-closed", "vm-2")
	// Points of workflows Temporal no longer knows (closed) that must stay or go: a
	// complete one, a failed one; and a directory the catalog does not know.
	completePlan, complete := targetFor("wf-old-complete", "vm-3")
	before.commit(t, completePlan, map[int32]string{diskA: complete.Path}, map[int32]string{diskA: "52aa 01/11"})
	failedPlan, failed := targetFor("wf-old-failed", "vm-4")
	require.NoError(t, before.run(t, activities.FailPointName, activities.FailPointInput{PointID: failedPlan.PointID, Error: "copy failed"}, nil))
	unknown := filepath.Join(filepath.Dir(filepath.Dir(complete.Path)), "no-such-point")
	require.NoError(t, os.Mkdir(unknown, 0o750))
	require.NoError(t, os.WriteFile(filepath.Join(unknown, "disk-1.qcow2"), []byte("kept"), 0o640))

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
	retentionRunning := RetentionRunningFunc(srv.Client, func(ref string) string { return "wf-" + ref })
	for ref, want := range map[string]string{"running": "wf-running", "closed": "", "never-started": ""} {
		id, err := retentionRunning(ctx, ref)
		require.NoError(t, err)
		assert.Equal(t, want, id, ref)
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
	assert.Equal(t, []string{strayPlan.PointID}, report.Abandoned)
	wantSwept := []string{filepath.Dir(stray.Path), filepath.Dir(failed.Path)}
	slices.Sort(wantSwept)
	assert.Equal(t, wantSwept, report.Swept)
	assert.NoDirExists(t, filepath.Dir(stray.Path), "the abandoned point's files are removed")
	assert.NoDirExists(t, filepath.Dir(failed.Path), "the failed point's files are removed")
	assert.FileExists(t, complete.Path, "a complete point is never swept")
	assert.FileExists(t, live.Path, "a running backup's target is never swept")
	assert.FileExists(t, filepath.Join(unknown, "disk-1.qcow2"), "what the catalog does not know is left alone")
	abandoned, err := store.GetPoint(ctx, strayPlan.PointID)
	require.NoError(t, err)
	assert.Equal(t, catalog.StatusFailed, abandoned.Status)
	assert.Contains(t, abandoned.Error, "closed without finishing")

	require.NoError(t, handshake(live), "the running workflow's export still serves")
	assert.True(t, processAlive(live.PID))
	assert.False(t, processAlive(stray.PID), "the closed workflow's export is stopped")
	assert.Error(t, handshake(stray))
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

	// The closed workflow's point is failed now; the next backup of its VM starts afresh.
	vm := testVM()
	vm.Moref = "vm-2"
	_, err = after.plan(t, "wf-next", vm, activities.ModeAuto, diskA)
	require.NoError(t, err)

	require.NoError(t, after.run(t, activities.StopExportName, activities.StopExportInput{Port: live.Port, Path: live.Path}, nil))
	assert.Empty(t, qemuNBDUnder(t, runDir))
}

// TestReconcileRestartsKilledExport: a running backup's qemu-nbd killed with SIGKILL
// comes back on the same socket, serving the same target with what was written before.
func TestReconcileRestartsKilledExport(t *testing.T) {
	r := setup(t)
	ctx := context.Background()
	qemuIO := testenv.RequireCommand(t, "qemu-io")
	_, target := r.fullTarget(t, "wf-1")
	exp := r.export(t, "wf-1", target)
	out, err := exec.Command(qemuIO, "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "flush", exportURI(exp)).CombinedOutput()
	require.NoError(t, err, string(out))

	require.NoError(t, syscall.Kill(exp.PID, syscall.SIGKILL))
	waitExited(t, exp.PID)
	require.Error(t, handshake(exp), "the killed export still answers")

	report, err := r.acts.Reconcile(ctx)
	require.NoError(t, err)
	assert.Equal(t, ReconcileReport{Restarted: []int{exp.Port}}, report)
	require.NoError(t, handshake(exp), "the export is back on its socket")
	rows, err := r.store.ListExports(ctx, hubID)
	require.NoError(t, err)
	require.Len(t, rows, 1)
	assert.NotEqual(t, exp.PID, rows[0].PID)
	assert.True(t, processAlive(rows[0].PID))
	assert.Equal(t, target.Path, rows[0].Path)
	out, err = exec.Command(qemuIO, "-f", "raw", "-c", "read -P 0x5a 0 1M", exportURI(exp)).CombinedOutput()
	require.NoError(t, err, string(out))
	assert.NotContains(t, string(out), "Pattern verification failed")

	again, err := r.acts.Reconcile(ctx)
	require.NoError(t, err)
	assert.Equal(t, ReconcileReport{}, again, "a second reconcile changes nothing")

	// Once the backup stopped its export, a dead process is not brought back.
	require.NoError(t, r.run(t, activities.StopExportName, activities.StopExportInput{Port: exp.Port, Path: target.Path}, nil))
	report, err = r.acts.Reconcile(ctx)
	require.NoError(t, err)
	assert.Equal(t, ReconcileReport{}, report)
	assert.Error(t, handshake(exp))
}

// TestExportIsPrivate: another local user cannot reach a running backup's export (the
// outside review wrote into one with qemu-io while a backup ran): no TCP listener, and
// the socket sits in a directory only the hub worker's user and group enter.
func TestExportIsPrivate(t *testing.T) {
	r := setup(t)
	qemuIO := testenv.RequireCommand(t, "qemu-io")
	// Everything above the exports directory open to all, so that it alone keeps others out.
	for dir := r.settings.RunDir; dir != filepath.Dir(filepath.Dir(r.settings.RunDir)); dir = filepath.Dir(dir) {
		require.NoError(t, os.Chmod(dir, 0o755))
	}
	_, target := r.fullTarget(t, "wf-1")
	exp := r.export(t, "wf-1", target)

	assert.Empty(t, testenv.TCPListenersOf(t, exp.PID), "qemu-nbd listens on TCP")
	dir, err := os.Stat(filepath.Dir(exp.Socket))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o750), dir.Mode().Perm(), "exports directory mode")
	sock, err := os.Stat(exp.Socket)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o660), sock.Mode().Perm(), "export socket mode")

	write := []string{"-f", "raw", "-c", "write -P 0xab 0 1M", exportURI(exp)}
	out, err := testenv.RunAs(t, "nobody", qemuIO, write...)
	require.Error(t, err, "user nobody wrote into a running backup's export:\n%s", out)
	assert.Contains(t, strings.ToLower(out), "permission denied")
	out2, err := exec.Command(qemuIO, write...).CombinedOutput()
	require.NoError(t, err, "the same write as the hub's user is the control: %s", out2)
}

// waitExited waits, bounded, until pid is gone or a zombie.
func waitExited(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for processAlive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d still alive after SIGKILL", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
