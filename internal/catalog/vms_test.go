package catalog

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// After an in-place restore the VM is marked for a full backup, by the restore's workflow.
// The mark is refused while a point of the VM runs; while it is set no point opens unless
// the caller names the marking workflow as closed; an incremental point leaves it, a full
// point opened after it clears it.
func TestMarkNextFullGuardsAndIsClearedByFullPoint(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")
	got, err := s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	assert.Empty(t, got.NextFullReason)

	complete := func(p Point, mode, parentPath string) {
		t.Helper()
		d := diskResult(2000, "/r/vm/"+p.ID+"/disk-2000.qcow2", parentPath, mode, "52 a/1")
		require.NoError(t, s.AddPointDisk(ctx, p.ID, d))
		_, err := s.CompletePoint(ctx, p.ID, []PointDisk{d})
		require.NoError(t, err)
	}
	before, err := s.OpenPoint(ctx, fullRequest(vm, "wf-before"))
	require.NoError(t, err)
	err = s.MarkNextFull(ctx, "vc-1", "vm-1", "restored in place from point P", "wf-restore")
	var running *BackupRunningError
	require.ErrorAs(t, err, &running, "a mark while a backup runs")
	assert.Equal(t, "wf-before", running.WorkflowID)
	assert.Equal(t, before.ID, running.PointID)
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	assert.Empty(t, got.NextFullReason, "a refused mark marks nothing")
	assert.Empty(t, got.RestoreWorkflowID)
	complete(before, ModeFull, "")

	require.NoError(t, s.MarkNextFull(ctx, "vc-1", "vm-1", "restored in place from point P", "wf-restore"))
	require.NoError(t, s.MarkNextFull(ctx, "vc-1", "vm-1", "restored in place from point P", "wf-restore"), "idempotent")
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	assert.Equal(t, "restored in place from point P", got.NextFullReason)
	assert.Equal(t, "wf-restore", got.RestoreWorkflowID)
	assert.False(t, got.NextFullSince.IsZero())

	for _, closed := range []string{"", "wf-other-restore"} {
		req := fullRequest(vm, "wf-during")
		req.RestoreClosed = closed
		_, err = s.OpenPoint(ctx, req)
		var restoring *RestoreRunningError
		require.ErrorAs(t, err, &restoring, "a point while the VM is marked by a restore not known closed (%q)", closed)
		assert.ErrorIs(t, err, ErrRestoreRunning)
		assert.Equal(t, "wf-restore", restoring.WorkflowID)
	}
	_, err = s.RunningPointForVM(ctx, vm.ID)
	assert.ErrorIs(t, err, ErrNotFound, "a refused open opens nothing")

	req := fullRequest(vm, "wf-incr")
	req.Mode, req.ParentID, req.RestoreClosed = ModeIncremental, before.ID, "wf-restore"
	incr, err := s.OpenPoint(ctx, req)
	require.NoError(t, err)
	complete(incr, ModeIncremental, "/r/vm/"+before.ID+"/disk-2000.qcow2")
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	assert.NotEmpty(t, got.NextFullReason, "an incremental point leaves the mark")
	assert.Equal(t, "wf-restore", got.RestoreWorkflowID)

	req = fullRequest(vm, "wf-after")
	req.RestoreClosed = "wf-restore"
	after, err := s.OpenPoint(ctx, req)
	require.NoError(t, err)
	complete(after, ModeFull, "")
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	assert.Empty(t, got.NextFullReason, "the full point after the mark clears it")
	assert.Empty(t, got.RestoreWorkflowID)
	assert.True(t, got.NextFullSince.IsZero())
	_, err = s.OpenPoint(ctx, fullRequest(vm, "wf-next"))
	require.NoError(t, err, "a cleared mark guards nothing")

	assert.ErrorIs(t, s.MarkNextFull(ctx, "vc-1", "vm-404", "x", "wf-restore"), ErrNotFound)
	assert.ErrorIs(t, s.MarkNextFull(ctx, "vc-1", "vm-1", "", "wf-restore"), ErrInvalid)
	assert.ErrorIs(t, s.MarkNextFull(ctx, "vc-1", "vm-1", "x", ""), ErrInvalid)
}

func TestFindVMsByNameOrMoref(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	a, err := s.UpsertVM(ctx, VM{InstanceUUID: "vc-1", Moref: "vm-1", Name: "web"}, nil)
	require.NoError(t, err)
	b, err := s.UpsertVM(ctx, VM{InstanceUUID: "vc-2", Moref: "vm-1", Name: "db"}, nil)
	require.NoError(t, err)
	c, err := s.UpsertVM(ctx, VM{InstanceUUID: "vc-1", Moref: "vm-2", Name: "web"}, nil)
	require.NoError(t, err)

	ids := func(name string) []int64 {
		vms, err := s.FindVMs(ctx, name)
		require.NoError(t, err)
		var out []int64
		for _, v := range vms {
			out = append(out, v.ID)
		}
		return out
	}
	assert.Equal(t, []int64{a.ID, c.ID}, ids("web"))
	assert.Equal(t, []int64{a.ID, b.ID}, ids("vm-1"))
	assert.Equal(t, []int64{c.ID}, ids("vm-2"))
	assert.Empty(t, ids("nope"))
}
