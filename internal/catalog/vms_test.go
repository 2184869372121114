package catalog

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// After an in-place restore the VM is marked for a full backup. A full point opened before
// the mark (planned without it) does not clear it; a full point opened after it does; an
// incremental one never does.
func TestMarkNextFullClearedByFullPointOpenedAfter(t *testing.T) {
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
	require.NoError(t, s.MarkNextFull(ctx, "vc-1", "vm-1", "restored in place from point P"))
	require.NoError(t, s.MarkNextFull(ctx, "vc-1", "vm-1", "restored in place from point P"), "idempotent")
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	assert.Equal(t, "restored in place from point P", got.NextFullReason)
	assert.False(t, got.NextFullSince.IsZero())
	complete(before, ModeFull, "")
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	assert.Equal(t, "restored in place from point P", got.NextFullReason, "a point planned before the mark leaves it")

	req := fullRequest(vm, "wf-incr")
	req.Mode, req.ParentID = ModeIncremental, before.ID
	incr, err := s.OpenPoint(ctx, req)
	require.NoError(t, err)
	complete(incr, ModeIncremental, "/r/vm/"+before.ID+"/disk-2000.qcow2")
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	assert.NotEmpty(t, got.NextFullReason, "an incremental point leaves the mark")

	after, err := s.OpenPoint(ctx, fullRequest(vm, "wf-after"))
	require.NoError(t, err)
	complete(after, ModeFull, "")
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	assert.Empty(t, got.NextFullReason, "the full point after the mark clears it")
	assert.True(t, got.NextFullSince.IsZero())

	assert.ErrorIs(t, s.MarkNextFull(ctx, "vc-1", "vm-404", "x"), ErrNotFound)
	assert.ErrorIs(t, s.MarkNextFull(ctx, "vc-1", "vm-1", ""), ErrInvalid)
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
