package hub

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/converter"
	sdklog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/nbd"
	"github.com/diskferry/diskferry/internal/outfile"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/testenv"
)

// pointChain makes a complete full point of disk A holding 0x11 in its first MiB and a
// complete incremental on it adding 0x22 in its third MiB; it returns both points' files.
func (r *rig) pointChain(t *testing.T) (full, incr activities.Plan, fullPath, incrPath string) {
	t.Helper()
	full, target := r.fullTarget(t, "wf-full")
	qemuIO(t, "qcow2", target.Path, "write -P 0x11 0 1M")
	r.commit(t, full, map[int32]string{diskA: target.Path}, map[int32]string{diskA: "52aa 01/11"})

	incr, err := r.plan(t, "wf-incr", testVM(), activities.ModeAuto, diskA)
	require.NoError(t, err)
	require.Equal(t, activities.ModeIncremental, incr.Disks[0].Mode)
	var overlay activities.Target
	require.NoError(t, r.run(t, activities.PrepareTargetName,
		activities.PrepareTargetInput{PointID: incr.PointID, VM: testVM(), Disk: incr.Disks[0]}, &overlay))
	qemuIO(t, "qcow2", overlay.Path, "write -P 0x22 2M 1M")
	r.commit(t, incr, map[int32]string{diskA: overlay.Path}, map[int32]string{diskA: "52aa 01/12"})
	return full, incr, target.Path, overlay.Path
}

func (r *rig) resolve(t *testing.T, in activities.ResolvePointInput) (activities.RestoreSource, error) {
	t.Helper()
	var src activities.RestoreSource
	err := r.run(t, activities.ResolvePointName, in, &src)
	return src, err
}

func TestResolvePoint(t *testing.T) {
	r := setup(t)
	ctx := context.Background()
	full, incr, fullPath, incrPath := r.pointChain(t)

	src, err := r.resolve(t, activities.ResolvePointInput{PointID: incr.PointID})
	require.NoError(t, err)
	assert.Equal(t, incr.PointID, src.PointID)
	assert.Equal(t, hubID, src.HubID)
	assert.Equal(t, "site-1", src.Site)
	assert.Equal(t, testVM().Name, src.VMName)
	assert.Equal(t, "vm-42", src.VMMoref)
	assert.Equal(t, "vc-0001", src.InstanceUUID)
	assert.Equal(t, activities.ModeIncremental, src.Mode)
	assert.False(t, src.FinishedAt.IsZero())
	assert.Equal(t, []activities.SourceDisk{{Key: diskA, CapacityBytes: capacity, Path: incrPath, Chain: 2}}, src.Disks)

	src, err = r.resolve(t, activities.ResolvePointInput{PointID: full.PointID, Disks: []int32{diskA}})
	require.NoError(t, err)
	assert.Equal(t, []activities.SourceDisk{{Key: diskA, CapacityBytes: capacity, Path: fullPath, Chain: 1}}, src.Disks)

	for _, vm := range []string{testVM().Name, "vm-42"} {
		src, err = r.resolve(t, activities.ResolvePointInput{VM: vm})
		require.NoError(t, err)
		assert.Equal(t, incr.PointID, src.PointID, "the latest complete point of %s", vm)
	}

	// A point with the VM's shape gives it back.
	vm := testVM()
	vm.Moref, vm.Config = "vm-cfg", &activities.VMConfig{NumCPUs: 4, MemoryMB: 2048}
	cfgPlan, err := r.plan(t, "wf-cfg", vm, activities.ModeAuto, diskA)
	require.NoError(t, err)
	r.commit(t, cfgPlan, map[int32]string{diskA: "/repo/cfg.qcow2"}, nil)
	src, err = r.resolve(t, activities.ResolvePointInput{PointID: cfgPlan.PointID})
	require.NoError(t, err)
	require.NotNil(t, src.Config)
	assert.Equal(t, 4, int(src.Config.NumCPUs))

	// Bad input: a failed point, a running one, a VM of the same name without points.
	failedVM := testVM()
	failedVM.Moref = "vm-failed"
	failed, err := r.plan(t, "wf-failed", failedVM, activities.ModeAuto)
	require.NoError(t, err)
	require.NoError(t, r.run(t, activities.FailPointName, activities.FailPointInput{PointID: failed.PointID, Error: "copy failed"}, nil))
	runningVM := testVM()
	runningVM.Moref, runningVM.Name = "vm-running", "other"
	running, err := r.plan(t, "wf-running", runningVM, activities.ModeAuto)
	require.NoError(t, err)
	_, err = r.store.UpsertVM(ctx, catalog.VM{InstanceUUID: "vc-0001", Moref: "vm-empty", Name: "empty"}, nil)
	require.NoError(t, err)
	name := testVM().Name

	for _, tc := range []struct {
		name    string
		in      activities.ResolvePointInput
		errType string
		msg     string
	}{
		{"unknown point", activities.ResolvePointInput{PointID: "nope"}, activities.ErrNotFound,
			"point: no restore point nope"},
		{"failed point", activities.ResolvePointInput{PointID: failed.PointID}, activities.ErrBadInput,
			fmt.Sprintf("point: %s is failed (error copy failed); only complete points can be restored", failed.PointID)},
		{"running point", activities.ResolvePointInput{PointID: running.PointID}, activities.ErrBadInput,
			fmt.Sprintf("point: %s is running (workflow wf-running); only complete points can be restored", running.PointID)},
		{"disk the point lacks", activities.ResolvePointInput{PointID: incr.PointID, Disks: []int32{diskA, diskB}}, activities.ErrBadInput,
			fmt.Sprintf("disks: point %s has no disk 2001 (it has 2000)", incr.PointID)},
		{"disk twice", activities.ResolvePointInput{PointID: incr.PointID, Disks: []int32{diskA, diskA}}, activities.ErrBadInput,
			"disks: disk 2000 is listed twice"},
		{"unknown VM", activities.ResolvePointInput{VM: "ghost"}, activities.ErrNotFound,
			"vm: no VM ghost in the catalog"},
		{"ambiguous VM name", activities.ResolvePointInput{VM: name}, activities.ErrBadInput, ""},
		{"VM without complete points", activities.ResolvePointInput{VM: "empty"}, activities.ErrNotFound,
			"vm: VM empty (vm-empty) has no complete restore point"},
		{"point of another VM", activities.ResolvePointInput{PointID: incr.PointID, VM: "other"}, activities.ErrBadInput,
			fmt.Sprintf("vm: point %s is of VM %s (vm-42), not other", incr.PointID, name)},
		{"nothing named", activities.ResolvePointInput{}, activities.ErrBadInput,
			"point: name a restore point or a VM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := r.resolve(t, tc.in)
			appErr := requireAppError(t, err, tc.errType, true)
			if tc.msg != "" {
				assert.Contains(t, appErr.Error(), tc.msg)
			}
		})
	}
	// Three VMs share the name now (vm-42, vm-cfg, vm-failed): each is listed by moref.
	_, err = r.resolve(t, activities.ResolvePointInput{VM: name})
	assert.ErrorContains(t, err, fmt.Sprintf("vm: %s names 3 VMs (%s vm-42 of vCenter vc-0001, %s vm-cfg of vCenter vc-0001, %s vm-failed of vCenter vc-0001); give the moref or a point ID",
		name, name, name, name))
}

// After an in-place restore the VM's next backup is full, every disk with the mark's
// reason; committing it clears the mark and the one after is incremental again.
func TestMarkRestoredInPlaceMakesNextBackupFull(t *testing.T) {
	r := guardRig(t, map[string]bool{testActivityWorkflowID: true})
	ctx := context.Background()
	vm := testVM()
	commit := func(plan activities.Plan) {
		t.Helper()
		in := activities.CommitPointInput{PointID: plan.PointID}
		for _, d := range plan.Disks {
			in.Disks = append(in.Disks, activities.DiskResult{Key: d.Key, Path: fmt.Sprintf("/repo/%s/%d.qcow2", plan.PointID, d.Key),
				ParentPath: d.ParentPath, Mode: d.Mode, Reason: d.Reason, ChangeID: "52aa 01/20", CapacityBytes: d.CapacityBytes})
		}
		require.NoError(t, r.run(t, activities.CommitPointName, in, nil))
	}
	first, err := r.plan(t, "wf-1", vm, activities.ModeAuto)
	require.NoError(t, err)
	commit(first)
	vm.Disks[0].ChangeID, vm.Disks[1].ChangeID = "52aa 01/20", "52aa 01/20"

	reason := "restored in place from point " + first.PointID + " at 2026-12-02T01:00:00Z"
	mark := activities.MarkRestoredInPlaceInput{InstanceUUID: vm.InstanceUUID, VMMoref: vm.Moref, Reason: reason}
	require.NoError(t, r.run(t, activities.MarkRestoredInPlaceName, mark, nil))
	require.NoError(t, r.run(t, activities.MarkRestoredInPlaceName, mark, nil), "idempotent")

	forced, err := r.plan(t, "wf-2", vm, activities.ModeAuto)
	require.NoError(t, err)
	assert.Equal(t, activities.ModeFull, forced.Mode)
	require.Len(t, forced.Disks, 2)
	for _, d := range forced.Disks {
		assert.Equal(t, activities.ModeFull, d.Mode)
		assert.Equal(t, reason, d.Reason)
		assert.Empty(t, d.ParentPath)
	}
	commit(forced)
	point, err := r.store.GetPoint(ctx, forced.PointID)
	require.NoError(t, err)
	for _, d := range point.Disks {
		assert.Equal(t, reason, d.Reason, "point_disks.reason of disk %d", d.Key)
	}

	next, err := r.plan(t, "wf-3", vm, activities.ModeAuto)
	require.NoError(t, err)
	assert.Equal(t, activities.ModeIncremental, next.Mode, "the full point cleared the mark")
	for _, d := range next.Disks {
		assert.Equal(t, activities.ModeIncremental, d.Mode)
		assert.Empty(t, d.Reason)
	}

	for _, tc := range []struct {
		in      activities.MarkRestoredInPlaceInput
		errType string
		msg     string
	}{
		{activities.MarkRestoredInPlaceInput{InstanceUUID: "vc-0001", VMMoref: "vm-404", Reason: "x"}, activities.ErrNotFound,
			"vmMoref: no VM vm-404 of vCenter vc-0001 in the catalog"},
		{activities.MarkRestoredInPlaceInput{InstanceUUID: "vc-0001", VMMoref: "vm-42"}, activities.ErrBadInput, "reason: empty"},
		{activities.MarkRestoredInPlaceInput{VMMoref: "vm-42", Reason: "x"}, activities.ErrBadInput, "instanceUuid: empty"},
	} {
		err := r.run(t, activities.MarkRestoredInPlaceName, tc.in, nil)
		appErr := requireAppError(t, err, tc.errType, true)
		assert.Contains(t, appErr.Error(), tc.msg)
	}
}

// testActivityWorkflowID is the workflow ID the test activity environment gives every
// activity: the in-place restore that marks the VM in these tests.
const testActivityWorkflowID = "default-test-workflow-id"

// guardRig is a rig whose Temporal says the workflows in closed are closed.
func guardRig(t *testing.T, closed map[string]bool) *rig {
	t.Helper()
	testenv.Integration(t)
	return newRig(t, newStore(t), exportPorts(t, 1), filepath.Join(testenv.ShortTempDir(t), "run"), filepath.Join(t.TempDir(), "repo"),
		Settings{WorkflowClosed: func(_ context.Context, id string) (bool, error) { return closed[id], nil }})
}

// While a backup of the VM runs, an in-place restore may not mark it (it would write under
// the backup's snapshot): refused, nothing marked. Once the backup's workflow closed without
// finishing, its point is abandoned and the mark goes through.
func TestMarkRestoredInPlaceRefusedWhileBackupRuns(t *testing.T) {
	closed := map[string]bool{}
	r := guardRig(t, closed)
	ctx := context.Background()
	vm := testVM()
	backup, err := r.plan(t, "wf-backup", vm, activities.ModeAuto)
	require.NoError(t, err)

	mark := activities.MarkRestoredInPlaceInput{InstanceUUID: vm.InstanceUUID, VMMoref: vm.Moref, Reason: "restored in place"}
	err = r.run(t, activities.MarkRestoredInPlaceName, mark, nil)
	appErr := requireAppError(t, err, activities.ErrBackupRunning, true)
	assert.Contains(t, appErr.Error(), "vmMoref: a backup of VM vm-42 is running (workflow wf-backup); wait for it or cancel it")
	got, err := r.store.FindVM(ctx, vm.InstanceUUID, vm.Moref)
	require.NoError(t, err)
	assert.Empty(t, got.NextFullReason, "a refused mark marks nothing")
	assert.Empty(t, got.RestoreWorkflowID)
	p, err := r.store.GetPoint(ctx, backup.PointID)
	require.NoError(t, err)
	assert.Equal(t, catalog.StatusRunning, p.Status, "the running backup is left alone")

	closed["wf-backup"] = true
	require.NoError(t, r.run(t, activities.MarkRestoredInPlaceName, mark, nil), "the backup's workflow closed")
	got, err = r.store.FindVM(ctx, vm.InstanceUUID, vm.Moref)
	require.NoError(t, err)
	assert.Equal(t, "restored in place", got.NextFullReason)
	assert.Equal(t, testActivityWorkflowID, got.RestoreWorkflowID, "the mark names the restore's workflow")
	p, err = r.store.GetPoint(ctx, backup.PointID)
	require.NoError(t, err)
	assert.Equal(t, catalog.StatusFailed, p.Status, "the closed workflow's point is abandoned")
}

// While the in-place restore that marked the VM is open, no backup of the VM starts (its
// snapshot would hold half-written disks): refused naming the restore's workflow, no point
// opened. Once the restore closed, the backup is planned full with the mark's reason.
func TestPlanBackupRefusedWhileInPlaceRestoreRuns(t *testing.T) {
	closed := map[string]bool{}
	r := guardRig(t, closed)
	ctx := context.Background()
	vm := testVM()
	first, err := r.plan(t, "wf-1", vm, activities.ModeAuto)
	require.NoError(t, err)
	r.commit(t, first, map[int32]string{diskA: "/repo/a.qcow2", diskB: "/repo/b.qcow2"}, map[int32]string{diskA: "52aa 01/20", diskB: "52bb 02/20"})
	vm.Disks[0].ChangeID, vm.Disks[1].ChangeID = "52aa 01/20", "52bb 02/20"

	mark := activities.MarkRestoredInPlaceInput{InstanceUUID: vm.InstanceUUID, VMMoref: vm.Moref, Reason: "restored in place from " + first.PointID}
	require.NoError(t, r.run(t, activities.MarkRestoredInPlaceName, mark, nil))

	_, err = r.plan(t, "wf-2", vm, activities.ModeAuto)
	appErr := requireAppError(t, err, activities.ErrBackupRunning, true)
	assert.Contains(t, appErr.Error(), "an in-place restore of VM web 01/../x is running (workflow "+testActivityWorkflowID+")")
	vmRow, err := r.store.FindVM(ctx, vm.InstanceUUID, vm.Moref)
	require.NoError(t, err)
	_, err = r.store.RunningPointForVM(ctx, vmRow.ID)
	assert.ErrorIs(t, err, catalog.ErrNotFound, "a refused backup opens no point")

	closed[testActivityWorkflowID] = true
	plan, err := r.plan(t, "wf-2", vm, activities.ModeAuto)
	require.NoError(t, err, "the restore's workflow closed")
	assert.Equal(t, activities.ModeFull, plan.Mode)
	for _, d := range plan.Disks {
		assert.Equal(t, activities.ModeFull, d.Mode)
		assert.Equal(t, mark.Reason, d.Reason)
	}
}

// startReadOnly leases a port to the workflow for disk A and serves path read-only on it.
func (r *rig) startReadOnly(t *testing.T, wf, path string) activities.Export {
	t.Helper()
	var port int
	require.NoError(t, r.run(t, activities.AllocatePortName, activities.AllocatePortInput{HubID: hubID, WorkflowID: wf, DiskKey: diskA}, &port))
	var exp activities.Export
	require.NoError(t, r.run(t, activities.StartExportName, activities.StartExportInput{
		WorkflowID: wf, DiskKey: diskA, Path: path, Port: port, Connections: 2, ReadOnly: true,
	}, &exp))
	t.Cleanup(func() { _ = qemu.StopPidFile(context.Background(), r.acts.pidFile(port), time.Second) })
	return exp
}

// assertServesChainReadOnly reads the chain's content through the export, and a write
// and a zero request through libnbd get errors.
func assertServesChainReadOnly(t *testing.T, exp activities.Export) {
	t.Helper()
	readPatterns(t, exportURI(exp), "read -P 0x11 0 1M", "read -P 0 1M 1M", "read -P 0x22 2M 1M")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h, err := nbd.Connect(ctx, exportURI(exp), nbd.Options{CommandTimeout: time.Minute})
	require.NoError(t, err)
	defer h.Close()
	ro, err := h.ReadOnly()
	require.NoError(t, err)
	assert.True(t, ro, "the export advertises read-only")
	buf, err := nbd.NewBuffer(64 << 10)
	require.NoError(t, err)
	defer buf.Free()
	copy(buf.Bytes(), fillBytes(0x77, 64<<10))
	assert.Error(t, h.Pwrite(ctx, buf, 0, buf.Len(), 0, 0), "a write through the read-only export succeeded")
	assert.Error(t, h.Zero(ctx, mib, 0, 0), "a zero request through the read-only export succeeded")
	readPatterns(t, exportURI(exp), "read -P 0x11 0 1M")
}

// readPatterns runs qemu-io's pattern-checking reads on an NBD URI, opened read-only.
func readPatterns(t *testing.T, uri string, reads ...string) {
	t.Helper()
	args := []string{"-r", "-f", "raw"}
	for _, c := range reads {
		args = append(args, "-c", c)
	}
	out, err := exec.Command(testenv.RequireCommand(t, "qemu-io"), append(args, uri)...).CombinedOutput()
	require.NoError(t, err, "qemu-io %v: %s", reads, out)
	assert.NotContains(t, string(out), "Pattern verification failed")
}

// A mount's read-only export of a complete point refuses writes, keeps serving read-only
// after its qemu-nbd is killed and the hub worker restarts (reconcile), is never swept, and
// stops on StopExport.
func TestReadOnlyExportSurvivesWorkerRestart(t *testing.T) {
	r := setup(t)
	ctx := context.Background()
	_, _, fullPath, incrPath := r.pointChain(t)
	exp := r.startReadOnly(t, "wf-mount", incrPath)
	assertServesChainReadOnly(t, exp)
	rows, err := r.store.ListExports(ctx, hubID)
	require.NoError(t, err)
	require.Len(t, rows, 1)
	assert.True(t, rows[0].ReadOnly, "the catalog remembers the export read-only")

	var again activities.Export
	require.NoError(t, r.run(t, activities.StartExportName, activities.StartExportInput{
		WorkflowID: "wf-mount", DiskKey: diskA, Path: incrPath, Port: exp.Port, Connections: 2, ReadOnly: true,
	}, &again))
	assert.Equal(t, exp, again, "a retried start returns the running export")
	err = r.run(t, activities.StartExportName, activities.StartExportInput{
		WorkflowID: "wf-mount", DiskKey: diskA, Path: incrPath, Port: exp.Port, Connections: 2,
	}, nil)
	require.Error(t, err, "a writable start on the read-only export's port")
	assert.Contains(t, err.Error(), "read-only true")

	require.NoError(t, syscall.Kill(exp.PID, syscall.SIGKILL))
	waitExited(t, exp.PID)
	after := newRig(t, r.store, r.acts.ports.Range(), r.settings.RunDir, r.layout.Root, Settings{}) // the restarted worker
	report, err := after.acts.Reconcile(ctx)
	require.NoError(t, err)
	assert.Equal(t, ReconcileReport{Restarted: []int{exp.Port}}, report)
	restarted, err := qemu.Find(after.acts.pidFile(exp.Port))
	require.NoError(t, err)
	assert.True(t, restarted.ReadOnly, "restarted read-only")
	assert.Equal(t, incrPath, restarted.Path)
	assertServesChainReadOnly(t, exp)

	// A live export whose row was lost is recorded again, read-only.
	require.NoError(t, r.store.RemoveExport(ctx, hubID, exp.Port))
	report, err = after.acts.Reconcile(ctx)
	require.NoError(t, err)
	assert.Equal(t, ReconcileReport{Registered: []int{exp.Port}}, report)
	rows, err = r.store.ListExports(ctx, hubID)
	require.NoError(t, err)
	require.Len(t, rows, 1)
	assert.True(t, rows[0].ReadOnly)
	assert.Equal(t, restarted.PID, rows[0].PID)
	assert.FileExists(t, fullPath, "a served complete point is never swept")
	assert.FileExists(t, incrPath)

	require.NoError(t, after.run(t, activities.StopExportName, activities.StopExportInput{Port: exp.Port, Path: incrPath}, nil))
	assert.False(t, processAlive(restarted.PID))
	assert.Empty(t, qemuNBDUnder(t, r.settings.RunDir))
	rows, err = r.store.ListExports(ctx, hubID)
	require.NoError(t, err)
	assert.Empty(t, rows)
	report, err = after.acts.Reconcile(ctx)
	require.NoError(t, err)
	assert.Equal(t, ReconcileReport{}, report, "a stopped export is not brought back")
	for _, p := range []string{fullPath, incrPath} {
		_, err := qemu.Check(ctx, p)
		require.NoError(t, err, "the point's files are intact")
	}
}

func (r *rig) restoreFile(t *testing.T, in activities.RestoreFileInput) (activities.RestoreFileResult, error) {
	t.Helper()
	var res activities.RestoreFileResult
	err := r.run(t, activities.RestoreFileName, in, &res)
	return res, err
}

func TestRestoreFileEachFormat(t *testing.T) {
	r := setup(t)
	ctx := context.Background()
	_, _, _, incrPath := r.pointChain(t)
	var mu sync.Mutex
	var beats []activities.RestoreFileProgress
	r.env.SetOnActivityHeartbeatListener(func(_ *activity.Info, details converter.EncodedValues) {
		var p activities.RestoreFileProgress
		if details != nil && details.Get(&p) == nil {
			mu.Lock()
			beats = append(beats, p)
			mu.Unlock()
		}
	})
	dir := t.TempDir()
	for _, format := range []string{activities.FormatRaw, activities.FormatQCOW2, activities.FormatVMDK} {
		t.Run(format, func(t *testing.T) {
			out := filepath.Join(dir, "disk-2000."+format)
			res, err := r.restoreFile(t, activities.RestoreFileInput{Path: incrPath, Format: format, Output: out})
			require.NoError(t, err)
			assert.Equal(t, activities.RestoreFileResult{Output: out, Format: format, VirtualBytes: capacity, AllocatedBytes: res.AllocatedBytes}, res)
			assert.Positive(t, res.AllocatedBytes)
			st, err := os.Stat(out)
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o640), st.Mode().Perm())
			assert.NoFileExists(t, outfile.TempName(out))

			cmp, err := qemu.Compare(ctx, qemu.QCOW2(incrPath), qemu.Image{Path: out, Format: format})
			require.NoError(t, err)
			assert.True(t, cmp.Equal, cmp.Message)
			info, err := exec.Command("qemu-img", "info", "-f", format, out).CombinedOutput()
			require.NoError(t, err, string(info))
			assert.NotContains(t, string(info), "backing file", "standalone")
			if format == activities.FormatVMDK {
				assert.Contains(t, string(info), "create type: streamOptimized")
			}
		})
	}
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, entries, 3, "only the outputs, no temporary files")
	mu.Lock()
	defer mu.Unlock()
	require.NotEmpty(t, beats, "RestoreFile heartbeats its progress")
	for _, b := range beats {
		assert.Contains(t, []string{activities.RestoreFilePhaseConvert, activities.RestoreFilePhaseCompare}, b.Phase)
	}
}

func TestRestoreFileRefusesBadInput(t *testing.T) {
	r := setup(t)
	_, _, _, incrPath := r.pointChain(t)
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing.raw")
	require.NoError(t, os.WriteFile(existing, []byte("keep me"), 0o600))
	missingPoint := filepath.Join(filepath.Dir(incrPath), "disk-9.qcow2")
	inRepo := filepath.Join(filepath.Dir(incrPath), "out.raw")

	for _, tc := range []struct {
		name    string
		in      activities.RestoreFileInput
		errType string
		msg     string
	}{
		{"format", activities.RestoreFileInput{Path: incrPath, Format: "iso", Output: filepath.Join(dir, "a")}, activities.ErrBadInput,
			`format: "iso" is not raw, qcow2 or vmdk`},
		{"point file outside the repository", activities.RestoreFileInput{Path: "/etc/passwd", Format: "raw", Output: filepath.Join(dir, "a")},
			activities.ErrBadInput, `path: "/etc/passwd" is outside the repository`},
		{"point file missing", activities.RestoreFileInput{Path: missingPoint, Format: "raw", Output: filepath.Join(dir, "a")},
			activities.ErrNotFound, "path: " + missingPoint + " does not exist on hub " + hubID},
		{"relative output", activities.RestoreFileInput{Path: incrPath, Format: "raw", Output: "disk.raw"}, activities.ErrBadInput,
			"output: disk.raw: not an absolute path"},
		{"existing output", activities.RestoreFileInput{Path: incrPath, Format: "raw", Output: existing}, activities.ErrBadInput,
			"output: " + existing + " exists; refusing to overwrite"},
		{"no directory", activities.RestoreFileInput{Path: incrPath, Format: "raw", Output: filepath.Join(dir, "no", "a.raw")},
			activities.ErrBadInput, "output: " + filepath.Join(dir, "no") + ": directory does not exist"},
		{"inside the repository", activities.RestoreFileInput{Path: incrPath, Format: "raw", Output: inRepo}, activities.ErrBadInput,
			"output: " + inRepo + " is inside the repository " + r.layout.Root},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := r.restoreFile(t, tc.in)
			appErr := requireAppError(t, err, tc.errType, true)
			assert.Contains(t, appErr.Error(), tc.msg)
		})
	}
	data, err := os.ReadFile(existing)
	require.NoError(t, err)
	assert.Equal(t, "keep me", string(data), "an existing file is never touched")
	assert.NoFileExists(t, inRepo)
}

// A full file system ends the restore at once as NoSpace, with nothing left behind.
func TestRestoreFileOnFullFileSystem(t *testing.T) {
	r := setup(t)
	_, _, _, incrPath := r.pointChain(t)
	full := fullFS(t)
	out := filepath.Join(full, "disk.raw")
	_, err := r.restoreFile(t, activities.RestoreFileInput{Path: incrPath, Format: activities.FormatRaw, Output: out})
	appErr := requireAppError(t, err, activities.ErrNoSpace, true)
	assert.Contains(t, appErr.Error(), "output: the file system is full")
	assert.NoFileExists(t, out)
	assert.NoFileExists(t, outfile.TempName(out))
}

// A retry after a lost reply finds the output its predecessor wrote: identical to the point,
// it is the result; a different file there is still refused.
func TestRestoreFileRetryAfterLostReply(t *testing.T) {
	r := setup(t)
	_, _, _, incrPath := r.pointChain(t)
	dir := t.TempDir()
	run := func(out string, firstAttempt func(ctx context.Context, in activities.RestoreFileInput) error) (activities.RestoreFileResult, error, int32) {
		var suite testsuite.WorkflowTestSuite
		suite.SetLogger(sdklog.NewStructuredLogger(slog.New(slog.DiscardHandler)))
		env := suite.NewTestWorkflowEnvironment()
		var attempts atomic.Int32
		env.RegisterActivityWithOptions(func(ctx context.Context, in activities.RestoreFileInput) (activities.RestoreFileResult, error) {
			attempts.Add(1)
			if activity.GetInfo(ctx).Attempt == 1 {
				return activities.RestoreFileResult{}, firstAttempt(ctx, in)
			}
			return r.acts.RestoreFile(ctx, in)
		}, activity.RegisterOptions{Name: activities.RestoreFileName})
		env.RegisterWorkflowWithOptions(func(ctx workflow.Context) (activities.RestoreFileResult, error) {
			ctx = workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
				StartToCloseTimeout: time.Minute,
				RetryPolicy:         &temporal.RetryPolicy{InitialInterval: time.Second, MaximumAttempts: 2},
			})
			var res activities.RestoreFileResult
			err := workflow.ExecuteActivity(ctx, activities.RestoreFileName,
				activities.RestoreFileInput{Path: incrPath, Format: activities.FormatQCOW2, Output: out}).Get(ctx, &res)
			return res, err
		}, workflow.RegisterOptions{Name: "restore-file"})
		env.ExecuteWorkflow("restore-file")
		require.True(t, env.IsWorkflowCompleted())
		var res activities.RestoreFileResult
		err := env.GetWorkflowError()
		if err == nil {
			require.NoError(t, env.GetWorkflowResult(&res))
		}
		return res, err, attempts.Load()
	}

	lost := filepath.Join(dir, "lost.qcow2")
	res, err, attempts := run(lost, func(ctx context.Context, in activities.RestoreFileInput) error {
		if _, err := r.acts.RestoreFile(ctx, in); err != nil {
			return err
		}
		return errors.New("reply lost")
	})
	require.NoError(t, err)
	assert.Equal(t, int32(2), attempts)
	assert.Equal(t, lost, res.Output)
	assert.Equal(t, capacity, res.VirtualBytes)

	foreign := filepath.Join(dir, "foreign.qcow2")
	_, err, attempts = run(foreign, func(context.Context, activities.RestoreFileInput) error {
		if err := os.WriteFile(foreign, []byte("not the point"), 0o600); err != nil {
			return err
		}
		return errors.New("worker died")
	})
	require.Error(t, err)
	assert.Equal(t, int32(2), attempts)
	assert.ErrorContains(t, err, "output: "+foreign+" exists; refusing to overwrite")
	data, readErr := os.ReadFile(foreign)
	require.NoError(t, readErr)
	assert.Equal(t, "not the point", string(data))
}
