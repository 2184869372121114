package catalog

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/chain"
)

// chainOf makes n complete points of vm, each an incremental on the previous, disk 1 in
// /repo/<i>.qcow2.
func chainOf(t *testing.T, s *Store, vm VM, n int) []string {
	t.Helper()
	ctx := testCtx(t)
	var ids []string
	for i := range n {
		req := fullRequest(vm, fmt.Sprintf("wf-%d", i))
		d := PointDisk{Key: 1, Path: fmt.Sprintf("/repo/%d.qcow2", i), Mode: ModeFull, CapacityBytes: 1}
		if i > 0 {
			req.Mode, req.ParentID = ModeIncremental, ids[i-1]
			d.Mode, d.ParentPath = ModeIncremental, fmt.Sprintf("/repo/%d.qcow2", i-1)
		}
		p, err := s.OpenPoint(ctx, req)
		require.NoError(t, err)
		require.NoError(t, s.AddPointDisk(ctx, p.ID, d))
		_, err = s.CompletePoint(ctx, p.ID, []PointDisk{d})
		require.NoError(t, err)
		ids = append(ids, p.ID)
	}
	return ids
}

func TestChainSurgery(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")
	other := newVM(t, s, "vm-2")
	ids := chainOf(t, s, vm, 3)

	require.ErrorIs(t, s.MarkDeleting(ctx, other.ID, ids[:1]), ErrInvalid, "a point of another VM")
	require.ErrorIs(t, s.RemovePointDisk(ctx, vm.ID, ids[0], 1), ErrInvalid, "a complete point's disk")
	require.NoError(t, s.MarkDeleting(ctx, vm.ID, []string{ids[0], "no-such-point"}))
	require.NoError(t, s.MarkDeleting(ctx, vm.ID, ids[:1]), "again")
	p, err := s.GetPoint(ctx, ids[0])
	require.NoError(t, err)
	assert.Equal(t, StatusDeleting, p.Status)
	last, err := s.LastCompletePoint(ctx, vm.ID)
	require.NoError(t, err)
	assert.Equal(t, ids[2], last.ID)

	// The commit swap: point 1 now lives in 0.qcow2, the deleting point 0 names 1.qcow2.
	require.NoError(t, s.RepointDisks(ctx, vm.ID, []chain.DiskChange{
		{PointID: ids[1], Key: 1, Path: "/repo/0.qcow2"},
		{PointID: ids[0], Key: 1, Path: "/repo/1.qcow2", ParentPath: "/repo/0.qcow2"},
		{PointID: ids[2], Key: 1, Path: "/repo/2.qcow2", ParentPath: "/repo/0.qcow2"},
	}))
	p1, err := s.GetPoint(ctx, ids[1])
	require.NoError(t, err)
	assert.Equal(t, ModeFull, p1.Mode, "every disk stands alone")
	assert.Empty(t, p1.ParentID)
	assert.Equal(t, ModeFull, p1.Disks[0].Mode)
	p2, err := s.GetPoint(ctx, ids[2])
	require.NoError(t, err)
	assert.Equal(t, ids[1], p2.ParentID, "the point holding its backing file")

	require.ErrorIs(t, s.RemoveDeletedPoint(ctx, vm.ID, ids[0]), ErrInvalid, "disks left")
	require.NoError(t, s.RemovePointDisk(ctx, vm.ID, ids[0], 1))
	require.NoError(t, s.RemoveDeletedPoint(ctx, vm.ID, ids[0]))
	require.NoError(t, s.RemoveDeletedPoint(ctx, vm.ID, ids[0]), "again")
	points, err := s.ChainPoints(ctx, vm.ID)
	require.NoError(t, err)
	require.Len(t, points, 2)
	assert.Equal(t, ids[1:], []string{points[0].ID, points[1].ID}, "oldest first")

	// A running backup's parent cannot be deleted, and a running point is never touched.
	running, err := s.OpenPoint(ctx, OpenPointRequest{WorkflowID: "wf-run", RunID: "r", Site: "site-a", Hub: "hub-1",
		VMID: vm.ID, Mode: ModeIncremental, ParentID: ids[2]})
	require.NoError(t, err)
	require.ErrorIs(t, s.MarkDeleting(ctx, vm.ID, ids[2:]), ErrBackupRunning)
	require.ErrorIs(t, s.MarkDeleting(ctx, vm.ID, []string{running.ID}), ErrInvalid)
	require.ErrorIs(t, s.RepointDisks(ctx, vm.ID, []chain.DiskChange{{PointID: running.ID, Key: 1, Path: "/x"}}), ErrInvalid)
}
