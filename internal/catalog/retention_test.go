package catalog

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/retention"
)

// The VM's own policy wins over its schedule's default; without either nothing applies.
func TestRetentionPolicyResolution(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")

	p, source, err := s.ResolvePolicy(ctx, vm.ID, "nightly")
	require.NoError(t, err)
	assert.Equal(t, PolicyNone, source)
	assert.Equal(t, retention.Policy{}, p)

	nightly := retention.Policy{KeepLast: 3, Daily: 7, MaxChain: 2}
	require.NoError(t, s.SetSchedulePolicy(ctx, "nightly", nightly))
	p, source, err = s.ResolvePolicy(ctx, vm.ID, "nightly")
	require.NoError(t, err)
	assert.Equal(t, "schedule nightly", source)
	assert.Equal(t, nightly, p)
	_, source, err = s.ResolvePolicy(ctx, vm.ID, "")
	require.NoError(t, err)
	assert.Equal(t, PolicyNone, source, "no schedule named: its default does not apply")

	own := retention.Policy{Weekly: 4, Monthly: 12, Yearly: 2}
	require.NoError(t, s.SetVMPolicy(ctx, vm.ID, own))
	p, source, err = s.ResolvePolicy(ctx, vm.ID, "nightly")
	require.NoError(t, err)
	assert.Equal(t, PolicyFromVM, source)
	assert.Equal(t, own, p)

	// Setting again replaces; all zero is a policy of its own (keep everything).
	require.NoError(t, s.SetVMPolicy(ctx, vm.ID, retention.Policy{}))
	p, source, err = s.ResolvePolicy(ctx, vm.ID, "nightly")
	require.NoError(t, err)
	assert.Equal(t, PolicyFromVM, source)
	assert.Equal(t, retention.Policy{}, p)

	entries, err := s.ListPolicies(ctx, "")
	require.NoError(t, err)
	require.Len(t, entries, 2)
	require.NotNil(t, entries[0].VM)
	assert.Equal(t, vm.ID, entries[0].VM.ID)
	assert.Equal(t, "nightly", entries[1].ScheduleID)
	assert.Equal(t, nightly, entries[1].Policy)
	entries, err = s.ListPolicies(ctx, vm.Moref)
	require.NoError(t, err)
	require.Len(t, entries, 1, "a VM's listing has no schedule defaults")
	entries, err = s.ListPolicies(ctx, "nobody")
	require.NoError(t, err)
	assert.Empty(t, entries)
}

func TestRetentionPolicyRefusesBadInput(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")
	err := s.SetVMPolicy(ctx, vm.ID, retention.Policy{Daily: -1})
	assert.ErrorIs(t, err, ErrInvalid)
	assert.ErrorContains(t, err, "daily -1")
	err = s.SetVMPolicy(ctx, vm.ID+1000, retention.Policy{KeepLast: 1})
	assert.ErrorIs(t, err, ErrNotFound)
	assert.ErrorIs(t, s.SetSchedulePolicy(ctx, "", retention.Policy{}), ErrInvalid)
	assert.ErrorIs(t, s.SetSchedulePolicy(ctx, "s", retention.Policy{MaxChain: retention.MaxChain + 1}), ErrInvalid)
	_, err = s.VMPolicy(ctx, vm.ID)
	assert.ErrorIs(t, err, ErrNotFound, "nothing was stored")
}

// A committed point keeps each file's allocated size.
func TestCompletePointRecordsAllocatedBytes(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")
	p, err := s.OpenPoint(ctx, fullRequest(vm, "wf-1"))
	require.NoError(t, err)
	d := diskResult(2000, "/repo/a.qcow2", "", ModeFull, "c/1")
	d.AllocatedBytes = 123 << 20
	_, err = s.CompletePoint(ctx, p.ID, []PointDisk{d})
	require.NoError(t, err)
	got, err := s.GetPoint(ctx, p.ID)
	require.NoError(t, err)
	require.Len(t, got.Disks, 1)
	assert.Equal(t, int64(123<<20), got.Disks[0].AllocatedBytes)
}

// The exports of a VM are those serving one of its points' files on the point's hub.
func TestVMExports(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm, other := newVM(t, s, "vm-1"), newVM(t, s, "vm-2")
	p, err := s.OpenPoint(ctx, fullRequest(vm, "wf-1"))
	require.NoError(t, err)
	_, err = s.CompletePoint(ctx, p.ID, []PointDisk{diskResult(2000, "/repo/vm-1/a.qcow2", "", ModeFull, "c/1")})
	require.NoError(t, err)
	q, err := s.OpenPoint(ctx, fullRequest(other, "wf-2"))
	require.NoError(t, err)
	_, err = s.CompletePoint(ctx, q.ID, []PointDisk{diskResult(2000, "/repo/vm-2/a.qcow2", "", ModeFull, "c/1")})
	require.NoError(t, err)

	exports, err := s.VMExports(ctx, vm.ID)
	require.NoError(t, err)
	assert.Empty(t, exports)
	require.NoError(t, s.RecordExport(ctx, Export{Hub: "hub-1", Port: 10100, PID: 1, Path: "/repo/vm-2/a.qcow2", WorkflowID: "restore-2", DiskKey: 2000, ReadOnly: true}))
	require.NoError(t, s.RecordExport(ctx, Export{Hub: "hub-2", Port: 10101, PID: 1, Path: "/repo/vm-1/a.qcow2", WorkflowID: "elsewhere", DiskKey: 2000}))
	exports, err = s.VMExports(ctx, vm.ID)
	require.NoError(t, err)
	assert.Empty(t, exports, "another VM's export, and the same path on another hub, are not the VM's")
	require.NoError(t, s.RecordExport(ctx, Export{Hub: "hub-1", Port: 10102, PID: 1, Path: "/repo/vm-1/a.qcow2", WorkflowID: "mount-1", DiskKey: 2000, ReadOnly: true}))
	exports, err = s.VMExports(ctx, vm.ID)
	require.NoError(t, err)
	require.Len(t, exports, 1)
	assert.Equal(t, "mount-1", exports[0].WorkflowID)
}
