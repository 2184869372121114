package hub

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/testenv"
)

// backupPoint takes a point of disk A through the backup activities, writing 1 MiB of
// pattern at offset into its target, and returns its ID and file.
func (r *rig) backupPoint(t *testing.T, wf string, pattern int, offset int64) (string, string) {
	t.Helper()
	testenv.RequireCommand(t, "qemu-io")
	plan, err := r.plan(t, wf, testVM(), activities.ModeAuto, diskA)
	require.NoError(t, err)
	var target activities.Target
	require.NoError(t, r.run(t, activities.PrepareTargetName,
		activities.PrepareTargetInput{PointID: plan.PointID, VM: testVM(), Disk: plan.Disks[0]}, &target))
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P %d %d 1M", pattern, offset), target.Path).CombinedOutput()
	require.NoError(t, err, "%s", out)
	r.commit(t, plan, map[int32]string{diskA: target.Path}, map[int32]string{diskA: "52aa 01/10"})
	return plan.PointID, target.Path
}

// snapshot saves what a point's file reads now as raw.
func snapshot(t *testing.T, path string) string {
	t.Helper()
	raw := filepath.Join(t.TempDir(), filepath.Base(filepath.Dir(path))+".raw")
	require.NoError(t, qemu.Convert(t.Context(), qemu.QCOW2(path), qemu.Raw(raw), qemu.ConvertOptions{}))
	return raw
}

func (r *rig) retentionPlan(t *testing.T, keep map[string]bool, order ...string) activities.RetentionPlan {
	t.Helper()
	vm, err := r.store.FindVM(t.Context(), testVM().InstanceUUID, testVM().Moref)
	require.NoError(t, err)
	plan := activities.RetentionPlan{VMID: vm.ID, VMName: vm.Name, HubID: hubID}
	for _, id := range order {
		plan.Points = append(plan.Points, activities.PointDecision{PointID: id, Keep: keep[id]})
	}
	return plan
}

func TestApplyRetentionMergesTheOldestFull(t *testing.T) {
	r := setup(t)
	full, fullPath := r.backupPoint(t, "wf-1", 1, 0)
	inc1, inc1Path := r.backupPoint(t, "wf-2", 2, 1<<20)
	inc2, inc2Path := r.backupPoint(t, "wf-3", 3, 0)
	raws := map[string]string{inc1: snapshot(t, inc1Path), inc2: snapshot(t, inc2Path)}
	freed := chainAllocated(inc1Path)
	plan := r.retentionPlan(t, map[string]bool{inc1: true, inc2: true}, full, inc1, inc2)

	var res activities.RetentionResult
	require.NoError(t, r.run(t, activities.ApplyRetentionName, activities.ApplyRetentionInput{Plan: plan}, &res))
	assert.Equal(t, []string{full}, res.Deleted)
	assert.Equal(t, freed, res.BytesFreed, "the incremental's file went; the full's file now holds it")
	for id, raw := range raws {
		p, err := r.store.GetPoint(t.Context(), id)
		require.NoError(t, err)
		cmp, err := qemu.Compare(t.Context(), qemu.QCOW2(p.Disks[0].Path), qemu.Raw(raw))
		require.NoError(t, err)
		assert.True(t, cmp.Equal, "point %s: %s", id, cmp.Message)
	}
	p, err := r.store.GetPoint(t.Context(), inc1)
	require.NoError(t, err)
	assert.Equal(t, fullPath, p.Disks[0].Path, "the kept point lives in the full's file")
	assert.Equal(t, catalog.ModeFull, p.Mode)
	info, err := qemu.Info(t.Context(), fullPath)
	require.NoError(t, err)
	assert.Equal(t, info.ActualSize, p.Disks[0].AllocatedBytes, "the catalog holds the merged file's size, not the backup's")
	_, err = os.Stat(inc1Path)
	assert.ErrorIs(t, err, os.ErrNotExist)
	err = r.run(t, activities.ResolvePointName, activities.ResolvePointInput{PointID: full}, nil)
	requireAppError(t, err, activities.ErrNotFound, true)

	// A retry after a lost reply finds the work done.
	require.NoError(t, r.run(t, activities.ApplyRetentionName, activities.ApplyRetentionInput{Plan: plan}, &res))
	assert.Equal(t, []string{full}, res.Deleted)
	assert.Zero(t, res.BytesFreed)
}

func chainAllocated(path string) int64 {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return -1
	}
	return st.Blocks * 512
}

func TestApplyRetentionBusyWhileABackupRuns(t *testing.T) {
	r := setup(t)
	full, _ := r.backupPoint(t, "wf-1", 1, 0)
	inc, _ := r.backupPoint(t, "wf-2", 2, 0)
	_, err := r.plan(t, "wf-running", testVM(), activities.ModeAuto, diskA)
	require.NoError(t, err)
	plan := r.retentionPlan(t, map[string]bool{inc: true}, full, inc)
	err = r.run(t, activities.ApplyRetentionName, activities.ApplyRetentionInput{Plan: plan}, nil)
	appErr := requireAppError(t, err, activities.ErrBusy, true)
	assert.Contains(t, appErr.Error(), "wf-running")
	p, err := r.store.GetPoint(t.Context(), full)
	require.NoError(t, err)
	assert.Equal(t, catalog.StatusComplete, p.Status, "nothing marked deleting")
}

// A merge that may not fit is refused before anything changes, naming free and needed.
func TestApplyRetentionRefusesAMergeThatMayNotFit(t *testing.T) {
	testenv.Integration(t)
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=24m,mode=0700"); err != nil {
		testenv.Missing(t, "mount a tmpfs (needs root): %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	root := filepath.Join(dir, "repo")
	require.NoError(t, os.Mkdir(root, 0o750))
	r := newRig(t, newStore(t), exportPorts(t, 4), filepath.Join(testenv.ShortTempDir(t), "run"), root, Settings{})
	full, _ := r.backupPoint(t, "wf-1", 1, 0)
	inc1, _ := r.backupPoint(t, "wf-2", 2, 1<<20)
	inc2, _ := r.backupPoint(t, "wf-3", 3, 2<<20)
	filler, err := os.Create(filepath.Join(dir, "filler"))
	require.NoError(t, err)
	defer filler.Close()
	chunk := make([]byte, 64<<10)
	for {
		if _, err := filler.Write(chunk); err != nil {
			require.ErrorIs(t, err, syscall.ENOSPC)
			break
		}
	}
	plan := r.retentionPlan(t, map[string]bool{inc2: true}, full, inc1, inc2)
	err = r.run(t, activities.ApplyRetentionName, activities.ApplyRetentionInput{Plan: plan}, nil)
	appErr := requireAppError(t, err, activities.ErrNoSpace, true)
	assert.Contains(t, appErr.Error(), "for the merges")
	for _, id := range []string{full, inc1, inc2} {
		p, err := r.store.GetPoint(t.Context(), id)
		require.NoError(t, err)
		assert.Equal(t, catalog.StatusComplete, p.Status, "point %s untouched", id)
	}
}

// A deleting point's directory may hold a kept point's file after a merge: reconcile must
// leave it to retention, even though its backup workflow closed long ago.
func TestReconcileLeavesDeletingPoints(t *testing.T) {
	testenv.Integration(t)
	settings := Settings{WorkflowClosed: func(context.Context, string) (bool, error) { return true, nil }}
	r := newRig(t, newStore(t), exportPorts(t, 4), filepath.Join(testenv.ShortTempDir(t), "run"),
		filepath.Join(t.TempDir(), "repo"), settings)
	full, fullPath := r.backupPoint(t, "wf-1", 1, 0)
	r.backupPoint(t, "wf-2", 2, 0)
	vm, err := r.store.FindVM(t.Context(), testVM().InstanceUUID, testVM().Moref)
	require.NoError(t, err)
	require.NoError(t, r.store.MarkDeleting(t.Context(), vm.ID, []string{full}))
	var report ReconcileReport
	require.NoError(t, r.acts.sweepPoints(t.Context(), &report))
	assert.Empty(t, report.Swept)
	assert.FileExists(t, fullPath)
}
