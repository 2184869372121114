package catalog

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRecordHubUpsertsLivenessAndSpace(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)

	// A hub named only by a lease has a row but was never seen.
	ports, err := NewPorts(s, PortRange{First: 10100, Last: 10101})
	require.NoError(t, err)
	_, err = ports.Allocate(ctx, "hub-b", "wf-1", 2000)
	require.NoError(t, err)

	before := now()
	require.NoError(t, s.RecordHub(ctx, Hub{ID: "hub-a", FreeBytes: 100, UsedBytes: 50, Ports: PortRange{First: 20100, Last: 20101}}))
	require.NoError(t, s.RecordHub(ctx, Hub{ID: "hub-a", FreeBytes: 80, UsedBytes: 70, Ports: PortRange{First: 20100, Last: 20103}}),
		"a second heartbeat updates the row")

	hubs, err := s.ListHubs(ctx)
	require.NoError(t, err)
	require.Len(t, hubs, 2)
	a, b := hubs[0], hubs[1]
	assert.Equal(t, "hub-a", a.ID)
	assert.Equal(t, int64(80), a.FreeBytes)
	assert.Equal(t, int64(70), a.UsedBytes)
	assert.Equal(t, PortRange{First: 20100, Last: 20103}, a.Ports)
	assert.False(t, a.LastSeen.Before(before), "last seen %s is before the heartbeat at %s", a.LastSeen, before)
	assert.True(t, a.Alive(a.LastSeen, 0))
	assert.False(t, a.Alive(a.LastSeen.Add(31*time.Second), 30*time.Second))

	assert.Equal(t, "hub-b", b.ID)
	assert.True(t, b.LastSeen.IsZero())
	assert.Equal(t, PortRange{}, b.Ports)
	assert.False(t, b.Alive(time.Now(), time.Hour), "a hub never seen is not alive")

	require.ErrorIs(t, s.RecordHub(ctx, Hub{FreeBytes: 1, Ports: PortRange{First: 1, Last: 1}}), ErrInvalid)
	require.ErrorIs(t, s.RecordHub(ctx, Hub{ID: "hub-a"}), ErrInvalid, "a hub has a port range")
}

// Any hub worker leases a hub's ports from the range that hub recorded, not its own, and
// exhaustion names that hub and range.
func TestAllocateUsesTheHubsRecordedRange(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	mine, err := NewPorts(s, PortRange{First: 10100, Last: 10200})
	require.NoError(t, err)
	require.NoError(t, s.RecordHub(ctx, Hub{ID: "hub-b", FreeBytes: 1, Ports: PortRange{First: 20100, Last: 20101}}))

	for i, want := range []int{20100, 20101} {
		port, err := mine.Allocate(ctx, "hub-b", "wf-1", int32(2000+i))
		require.NoError(t, err)
		assert.Equal(t, want, port)
	}
	_, err = mine.Allocate(ctx, "hub-b", "wf-2", 2000)
	var exhausted *PortsExhaustedError
	require.ErrorAs(t, err, &exhausted)
	require.ErrorIs(t, err, ErrPortsExhausted)
	assert.Equal(t, PortsExhaustedError{Hub: "hub-b", Range: PortRange{First: 20100, Last: 20101}, Needed: 1}, *exhausted)
	assert.Contains(t, err.Error(), "all 2 ports 20100-20101 of hub hub-b are leased")

	port, err := mine.Allocate(ctx, "hub-c", "wf-1", 2000)
	require.NoError(t, err)
	assert.Equal(t, 10100, port, "a hub that recorded no range gets the allocator's")
}

// A placement waits for the hubs' lock a bounded time, then fails with ErrPlaceBusy saying
// so; once the lock is free it places, and its retry gets the same point and hub back
// without choosing again.
func TestOpenPointPlacementWaitIsBounded(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")
	require.NoError(t, s.RecordHub(ctx, Hub{ID: "hub-a", FreeBytes: 100, Ports: PortRange{First: 20100, Last: 20101}}))
	chosen := 0
	req := OpenPointRequest{WorkflowID: "wf-1", RunID: "run-1", Site: "site-a", VMID: vm.ID, Mode: ModeFull, PlaceWait: time.Second,
		Choose: func(hubs []Hub) (string, error) {
			chosen++
			return hubs[0].ID, nil
		}}

	// Another placement, stuck between its choice and its commit.
	other, err := s.DB().BeginTx(ctx, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = other.Rollback() })
	require.NoError(t, lockHubs(ctx, other))
	_, err = s.OpenPoint(ctx, req)
	require.ErrorIs(t, err, ErrPlaceBusy)
	assert.Contains(t, err.Error(), "placing the point of workflow wf-1 did not finish within 1s: other placements held the hubs' lock")
	assert.Zero(t, chosen, "nothing is chosen without the lock")
	_, err = s.RunningPointForVM(ctx, vm.ID)
	require.ErrorIs(t, err, ErrNotFound, "no point was opened")

	require.NoError(t, other.Rollback())
	p, err := s.OpenPoint(ctx, req)
	require.NoError(t, err)
	assert.Equal(t, "hub-a", p.Hub)
	require.NoError(t, s.RecordHub(ctx, Hub{ID: "hub-b", FreeBytes: 1 << 40, Ports: PortRange{First: 20100, Last: 20101}}))
	again, err := s.OpenPoint(ctx, req)
	require.NoError(t, err)
	assert.Equal(t, p.ID, again.ID)
	assert.Equal(t, "hub-a", again.Hub, "a retry keeps the hub its point was placed on")
	assert.Equal(t, 1, chosen)

	req.Hub = "hub-a"
	_, err = s.OpenPoint(ctx, req)
	require.ErrorIs(t, err, ErrInvalid, "a hub named and a placement")
}
