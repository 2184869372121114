package hub

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/retention"
	"github.com/diskferry/diskferry/internal/testenv"
)

// backups commits n points of disk A of vm in the catalog (a full, then incrementals),
// the i-th allocating (i+1) MiB; it returns their IDs, oldest first.
func (r *rig) backups(t *testing.T, vm activities.VM, n int) []string {
	t.Helper()
	var ids []string
	for i := range n {
		wf := fmt.Sprintf("wf-%s-%d", vm.Moref, i)
		plan, err := r.plan(t, wf, vm, activities.ModeAuto, diskA)
		require.NoError(t, err)
		d := plan.Disks[0]
		path, err := r.layout.TargetPath(vm.Name, vm.Moref, plan.PointID, diskA)
		require.NoError(t, err)
		require.NoError(t, r.run(t, activities.CommitPointName, activities.CommitPointInput{PointID: plan.PointID, Disks: []activities.DiskResult{{
			Key: diskA, Path: path, ParentPath: d.ParentPath, Mode: d.Mode, ChangeID: fmt.Sprintf("52aa 01/%d", 20+i),
			CapacityBytes: d.CapacityBytes, Digest: "d", AllocatedBytes: int64(i+1) * mib,
		}}}, nil))
		ids = append(ids, plan.PointID)
	}
	return ids
}

func (r *rig) planRetention(t *testing.T, in activities.PlanRetentionInput) (activities.RetentionPlan, error) {
	t.Helper()
	var plan activities.RetentionPlan
	err := r.run(t, activities.PlanRetentionName, in, &plan)
	return plan, err
}

func keptIDs(plan activities.RetentionPlan) (kept, flattened []string) {
	for _, p := range plan.Points {
		if p.Keep {
			kept = append(kept, p.PointID)
		}
		if p.Flatten {
			flattened = append(flattened, p.PointID)
		}
	}
	return kept, flattened
}

func TestPlanRetention(t *testing.T) {
	testenv.Integration(t)
	r := newRig(t, newStore(t), exportPorts(t, 1), filepath.Join(testenv.ShortTempDir(t), "run"), filepath.Join(t.TempDir(), "repo"), Settings{})
	ctx := context.Background()
	vm := testVM()
	ids := r.backups(t, vm, 5)

	// No policy anywhere: everything stays, with each point's bytes.
	plan, err := r.planRetention(t, activities.PlanRetentionInput{VM: vm.Moref, ScheduleID: "nightly"})
	require.NoError(t, err)
	assert.Equal(t, catalog.PolicyNone, plan.PolicySource)
	assert.Equal(t, vm.Name, plan.VMName)
	assert.Equal(t, hubID, plan.HubID)
	require.Len(t, plan.Points, 5)
	for i, p := range plan.Points {
		assert.Equal(t, ids[i], p.PointID, "oldest first")
		assert.True(t, p.Keep)
		assert.Equal(t, int64(i+1)*mib, p.Bytes)
	}

	// The schedule's default applies to a VM without a policy of its own.
	require.NoError(t, r.store.SetSchedulePolicy(ctx, "nightly", retention.Policy{KeepLast: 2}))
	plan, err = r.planRetention(t, activities.PlanRetentionInput{VM: vm.Name, ScheduleID: "nightly"})
	require.NoError(t, err)
	assert.Equal(t, "schedule nightly", plan.PolicySource)
	assert.Equal(t, activities.RetentionPolicy{KeepLast: 2}, plan.Policy)
	kept, _ := keptIDs(plan)
	assert.Equal(t, ids[3:], kept)
	assert.Equal(t, []string{"not kept by the policy"}, plan.Points[0].Reasons)

	// The VM's own wins; the chain bound counts the kept points only.
	require.NoError(t, r.store.SetVMPolicy(ctx, plan.VMID, retention.Policy{KeepLast: 4, MaxChain: 2}))
	plan, err = r.planRetention(t, activities.PlanRetentionInput{VM: vm.Moref, ScheduleID: "nightly"})
	require.NoError(t, err)
	assert.Equal(t, catalog.PolicyFromVM, plan.PolicySource)
	kept, flattened := keptIDs(plan)
	assert.Equal(t, ids[1:], kept)
	assert.Equal(t, []string{ids[4]}, flattened, "points 1-3 read 3 files after point 0 merges into 1; point 4 would read 4")

	// The operator's deletions go on top, the newest point too; the chain is bounded over what stays.
	plan, err = r.planRetention(t, activities.PlanRetentionInput{VM: vm.Moref, Delete: []string{ids[2], ids[4]}})
	require.NoError(t, err)
	kept, flattened = keptIDs(plan)
	assert.Equal(t, []string{ids[1], ids[3]}, kept)
	assert.Empty(t, flattened)
	assert.Equal(t, []string{"deleted by operator"}, plan.Points[4].Reasons)
}

func TestPlanRetentionRefusesBadInput(t *testing.T) {
	testenv.Integration(t)
	r := newRig(t, newStore(t), exportPorts(t, 1), filepath.Join(testenv.ShortTempDir(t), "run"), filepath.Join(t.TempDir(), "repo"), Settings{})
	vm := testVM()
	r.backups(t, vm, 1)
	other := testVM()
	other.Moref, other.Name = "vm-77", "db"
	otherIDs := r.backups(t, other, 1)

	_, err := r.planRetention(t, activities.PlanRetentionInput{VM: "nobody"})
	assert.ErrorContains(t, requireAppError(t, err, activities.ErrNotFound, true), "vm: no VM nobody in the catalog")
	_, err = r.planRetention(t, activities.PlanRetentionInput{VM: vm.Moref, Delete: []string{"20261202T000000.000Z-00000000"}})
	assert.ErrorContains(t, requireAppError(t, err, activities.ErrBadInput, true), "delete: no restore point 20261202T000000.000Z-00000000")
	_, err = r.planRetention(t, activities.PlanRetentionInput{VM: vm.Moref, Delete: otherIDs})
	assert.ErrorContains(t, requireAppError(t, err, activities.ErrBadInput, true),
		fmt.Sprintf("delete: point %s is not a point of VM %s", otherIDs[0], vm.Name))

	// A failed point is not retention's.
	failed, err := r.plan(t, "wf-failed", vm, activities.ModeAuto, diskA)
	require.NoError(t, err)
	require.NoError(t, r.run(t, activities.FailPointName, activities.FailPointInput{PointID: failed.PointID, Error: "boom"}, nil))
	_, err = r.planRetention(t, activities.PlanRetentionInput{VM: vm.Moref, Delete: []string{failed.PointID}})
	assert.ErrorContains(t, requireAppError(t, err, activities.ErrBadInput, true),
		fmt.Sprintf("delete: point %s is failed; only complete points are deleted", failed.PointID))
	running, err := r.plan(t, "wf-running", other, activities.ModeAuto, diskA)
	require.NoError(t, err)
	_, err = r.planRetention(t, activities.PlanRetentionInput{VM: other.Moref, Delete: []string{running.PointID}})
	assert.Equal(t, "VM db is busy: backup workflow wf-running is writing point "+running.PointID,
		requireAppError(t, err, activities.ErrBusy, true).Message(), "a running backup makes the VM busy before anything else")
}

// Retention never plans while a backup of the VM runs or an export serves one of its
// points; the running point of a closed workflow does not count (it is failed).
func TestPlanRetentionRefusesBusyVM(t *testing.T) {
	testenv.Integration(t)
	closed := map[string]bool{}
	r := newRig(t, newStore(t), exportPorts(t, 1), filepath.Join(testenv.ShortTempDir(t), "run"), filepath.Join(t.TempDir(), "repo"),
		Settings{WorkflowClosed: func(_ context.Context, id string) (bool, error) { return closed[id], nil }})
	ctx := context.Background()
	vm := testVM()
	ids := r.backups(t, vm, 2)

	running, err := r.plan(t, "backup-web", vm, activities.ModeAuto, diskA)
	require.NoError(t, err)
	_, err = r.planRetention(t, activities.PlanRetentionInput{VM: vm.Moref})
	assert.Equal(t, requireAppError(t, err, activities.ErrBusy, true).Message(),
		fmt.Sprintf("VM %s is busy: backup workflow backup-web is writing point %s", vm.Name, running.PointID))

	closed["backup-web"] = true
	plan, err := r.planRetention(t, activities.PlanRetentionInput{VM: vm.Moref})
	require.NoError(t, err)
	assert.Len(t, plan.Points, 2)
	p, err := r.store.GetPoint(ctx, running.PointID)
	require.NoError(t, err)
	assert.Equal(t, catalog.StatusFailed, p.Status, "the abandoned point is failed")

	first, err := r.store.GetPoint(ctx, ids[0])
	require.NoError(t, err)
	require.NoError(t, r.store.RecordExport(ctx, catalog.Export{Hub: hubID, Port: 10100, PID: 1, Path: first.Disks[0].Path,
		WorkflowID: "mount-web", DiskKey: diskA, ReadOnly: true}))
	_, err = r.planRetention(t, activities.PlanRetentionInput{VM: vm.Moref})
	assert.Equal(t, requireAppError(t, err, activities.ErrBusy, true).Message(),
		fmt.Sprintf("VM %s is busy: workflow mount-web serves %s on hub %s (port 10100)", vm.Name, first.Disks[0].Path, hubID))
}
