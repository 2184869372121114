package catalog

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newPorts(t *testing.T, s *Store) *Ports {
	t.Helper()
	ports, err := NewPorts(s, DefaultPortRange)
	require.NoError(t, err)
	require.Equal(t, 101, ports.Range().Size())
	return ports
}

func TestAllocateConcurrentCallersNeverCollideAndExhaustCleanly(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	ports := newPorts(t, s)

	// Every port of the range, each to a distinct (workflow, disk), all at once.
	const callers = 101
	got := make([]int, callers)
	errs := make([]error, callers)
	var wg sync.WaitGroup
	for i := range callers {
		wg.Go(func() { got[i], errs[i] = ports.Allocate(ctx, "hub-1", fmt.Sprintf("wf-%d", i/2), int32(2000+i%2)) })
	}
	wg.Wait()
	owner := map[int]int{}
	for i := range callers {
		require.NoError(t, errs[i], "caller %d", i)
		require.GreaterOrEqual(t, got[i], 10100)
		require.LessOrEqual(t, got[i], 10200)
		if prev, dup := owner[got[i]]; dup {
			t.Fatalf("port %d leased to callers %d and %d", got[i], prev, i)
		}
		owner[got[i]] = i
	}

	// The same pairs get the same ports back, also concurrently.
	for i := range callers {
		wg.Go(func() {
			port, err := ports.Allocate(ctx, "hub-1", fmt.Sprintf("wf-%d", i/2), int32(2000+i%2))
			errs[i] = err
			if err == nil && port != got[i] {
				errs[i] = fmt.Errorf("re-allocation gave %d, first time %d", port, got[i])
			}
		})
	}
	wg.Wait()
	require.NoError(t, errors.Join(errs...))

	_, err := ports.Allocate(ctx, "hub-1", "wf-late", 2000)
	require.ErrorIs(t, err, ErrPortsExhausted, "the 102nd distinct caller")

	leases, err := ports.ListLeases(ctx, "hub-1")
	require.NoError(t, err)
	assert.Len(t, leases, callers)

	other, err := ports.Allocate(ctx, "hub-2", "wf-late", 2000)
	require.NoError(t, err)
	assert.Equal(t, 10100, other, "hubs have their own ranges")

	released, err := ports.ReleaseWorkflow(ctx, "hub-1", "wf-7")
	require.NoError(t, err)
	require.Len(t, released, 2)
	port, err := ports.Allocate(ctx, "hub-1", "wf-late", 2000)
	require.NoError(t, err)
	assert.Equal(t, released[0].Port, port, "the lowest freed port is reused")
}

func TestReleaseWorkflowIsIdempotent(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	ports := newPorts(t, s)

	a, err := ports.Allocate(ctx, "hub-1", "wf-a", 1)
	require.NoError(t, err)
	b, err := ports.Allocate(ctx, "hub-1", "wf-a", 2)
	require.NoError(t, err)
	keep, err := ports.Allocate(ctx, "hub-1", "wf-b", 1)
	require.NoError(t, err)
	assert.Equal(t, []int{10100, 10101, 10102}, []int{a, b, keep})

	released, err := ports.ReleaseWorkflow(ctx, "hub-1", "wf-a")
	require.NoError(t, err)
	assert.Len(t, released, 2)
	released, err = ports.ReleaseWorkflow(ctx, "hub-1", "wf-a")
	require.NoError(t, err)
	assert.Empty(t, released)
	released, err = ports.ReleaseWorkflow(ctx, "hub-2", "wf-b")
	require.NoError(t, err)
	assert.Empty(t, released, "another hub's release leaves hub-1 alone")

	leases, err := ports.ListLeases(ctx, "hub-1")
	require.NoError(t, err)
	require.Len(t, leases, 1)
	assert.Equal(t, Lease{Hub: "hub-1", Port: 10102, WorkflowID: "wf-b", DiskKey: 1, LeasedAt: leases[0].LeasedAt}, leases[0])
}

func TestReapFreesOnlyClosedWorkflows(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	ports := newPorts(t, s)

	for _, wf := range []string{"wf-open", "wf-closed", "wf-unknown"} {
		for _, key := range []int32{1, 2} {
			_, err := ports.Allocate(ctx, "hub-1", wf, key)
			require.NoError(t, err)
		}
	}
	_, err := ports.Allocate(ctx, "hub-2", "wf-closed", 1)
	require.NoError(t, err)

	asked := map[string]int{}
	isClosed := func(_ context.Context, wf string) (bool, error) {
		asked[wf]++
		switch wf {
		case "wf-closed":
			return true, nil
		case "wf-unknown":
			return false, errors.New("temporal unavailable")
		}
		return false, nil
	}
	reaped, err := ports.Reap(ctx, "hub-1", isClosed)
	require.Error(t, err, "the unreadable workflow is reported")
	assert.Contains(t, err.Error(), "wf-unknown")
	require.Len(t, reaped, 2)
	for _, l := range reaped {
		assert.Equal(t, "wf-closed", l.WorkflowID)
	}
	assert.Equal(t, map[string]int{"wf-open": 1, "wf-closed": 1, "wf-unknown": 1}, asked, "each workflow asked once")

	leases, err := ports.ListLeases(ctx, "hub-1")
	require.NoError(t, err)
	assert.Len(t, leases, 4, "open and unreadable workflows keep their leases")
	other, err := ports.ListLeases(ctx, "hub-2")
	require.NoError(t, err)
	assert.Len(t, other, 1, "reaping hub-1 leaves hub-2 alone")
}

func TestNewPortsRejectsBadRange(t *testing.T) {
	for _, r := range []PortRange{{First: 10200, Last: 10100}, {First: 0, Last: 10}, {First: 1, Last: 70000}} {
		_, err := NewPorts(nil, r)
		assert.ErrorIs(t, err, ErrInvalid, "%+v", r)
	}
}

func TestAllocateRejectsEmptyWorkflow(t *testing.T) {
	s := newStore(t)
	_, err := newPorts(t, s).Allocate(testCtx(t), "hub-1", "", 1)
	assert.ErrorIs(t, err, ErrInvalid)
}

// AllocateAll leases a workflow's ports all or none: with too few free ports nothing is
// leased (so no two workflows each hold part of what they need and wait for the rest), a
// retry after a release gets them all, a pair already holding a port keeps it, and more
// disks than the range has ports is an error no retry clears.
func TestAllocateAllIsAllOrNothing(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	ports, err := NewPorts(s, PortRange{First: 20100, Last: 20103})
	require.NoError(t, err)

	first, err := ports.AllocateAll(ctx, "hub-1", "wf-a", []int32{2000, 2001, 2002})
	require.NoError(t, err)
	assert.Equal(t, []int{20100, 20101, 20102}, first)

	_, err = ports.AllocateAll(ctx, "hub-1", "wf-b", []int32{2000, 2001})
	var exhausted *PortsExhaustedError
	require.ErrorAs(t, err, &exhausted)
	assert.ErrorIs(t, err, ErrPortsExhausted)
	assert.Equal(t, PortsExhaustedError{Hub: "hub-1", Range: PortRange{First: 20100, Last: 20103}, Needed: 2, Free: 1}, *exhausted)
	leases, err := ports.ListLeases(ctx, "hub-1")
	require.NoError(t, err)
	assert.Len(t, leases, 3, "the refused workflow holds nothing")

	// The holder asking again with one more disk keeps its ports and takes the last one.
	again, err := ports.AllocateAll(ctx, "hub-1", "wf-a", []int32{2002, 2003, 2000, 2001})
	require.NoError(t, err)
	assert.Equal(t, []int{20102, 20103, 20100, 20101}, again)

	_, err = ports.ReleaseWorkflow(ctx, "hub-1", "wf-a")
	require.NoError(t, err)
	second, err := ports.AllocateAll(ctx, "hub-1", "wf-b", []int32{2000, 2001})
	require.NoError(t, err)
	assert.Equal(t, []int{20100, 20101}, second)

	_, err = ports.AllocateAll(ctx, "hub-1", "wf-c", []int32{1, 2, 3, 4, 5})
	require.ErrorIs(t, err, ErrInvalid)
	assert.NotErrorIs(t, err, ErrPortsExhausted)
	assert.ErrorContains(t, err, "5 disks need a port each and hub hub-1 has 4 (20100-20103)")
}

// Jobs that cannot have their ports wait in line, first come first served: a job needing two
// ports is not passed over by a later job needing one while a single port is free, a release
// makes Ready name the jobs in line the free ports now fit (in order), a job that stops
// asking is passed over until it asks again, and a release takes a job out of the line.
func TestAllocateAllServesTheLineInOrder(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	rng := PortRange{First: 20200, Last: 20203}
	ports, err := NewPorts(s, rng)
	require.NoError(t, err)

	_, err = ports.AllocateAll(ctx, "hub-1", "wf-holder", []int32{1, 2, 3})
	require.NoError(t, err)
	ready, err := ports.Ready(ctx, "hub-1")
	require.NoError(t, err)
	assert.Empty(t, ready, "nobody waits")

	_, err = ports.AllocateAll(ctx, "hub-1", "wf-two", []int32{1, 2})
	var exhausted *PortsExhaustedError
	require.ErrorAs(t, err, &exhausted)
	assert.Equal(t, PortsExhaustedError{Hub: "hub-1", Range: rng, Needed: 2, Free: 1}, *exhausted)

	// One port is free, but wf-two came first and needs two: wf-one waits behind it.
	_, err = ports.AllocateAll(ctx, "hub-1", "wf-one", []int32{1})
	require.ErrorAs(t, err, &exhausted)
	assert.Equal(t, PortsExhaustedError{Hub: "hub-1", Range: rng, Needed: 1, Free: 1, Ahead: 1}, *exhausted)
	assert.ErrorContains(t, err, "1 ports needed, 1 of the 4 ports 20200-20203 of hub hub-1 free, 1 job ahead in line")
	_, err = ports.AllocateAll(ctx, "hub-1", "wf-last", []int32{1})
	require.ErrorAs(t, err, &exhausted)
	assert.Equal(t, 2, exhausted.Ahead)
	leases, err := ports.ListLeases(ctx, "hub-1")
	require.NoError(t, err)
	assert.Len(t, leases, 3, "the free port stayed free for the job first in line")
	ready, err = ports.Ready(ctx, "hub-1")
	require.NoError(t, err)
	assert.Empty(t, ready, "one free port does not fit the first in line")

	_, err = ports.ReleaseWorkflow(ctx, "hub-1", "wf-holder")
	require.NoError(t, err)
	ready, err = ports.Ready(ctx, "hub-1")
	require.NoError(t, err)
	assert.Equal(t, []string{"wf-two", "wf-one", "wf-last"}, ready, "four free ports fit all three, in line order")

	// The last in line asks first after the release: the four free ports fit everyone ahead
	// of it too, so it gets its port at once; then the others.
	got, err := ports.AllocateAll(ctx, "hub-1", "wf-last", []int32{1})
	require.NoError(t, err)
	assert.Equal(t, []int{20200}, got)
	got, err = ports.AllocateAll(ctx, "hub-1", "wf-one", []int32{1})
	require.NoError(t, err)
	assert.Equal(t, []int{20201}, got)
	got, err = ports.AllocateAll(ctx, "hub-1", "wf-two", []int32{1, 2})
	require.NoError(t, err)
	assert.Equal(t, []int{20202, 20203}, got)
	waiting, err := ports.Waiting(ctx, "hub-1")
	require.NoError(t, err)
	assert.Empty(t, waiting, "jobs leave the line with their ports")

	// A job in line that stops asking keeps its place but not its ports.
	_, err = ports.AllocateAll(ctx, "hub-1", "wf-silent", []int32{1, 2})
	require.ErrorAs(t, err, &exhausted)
	_, err = s.db.ExecContext(ctx, "UPDATE port_waits SET seen_at = ? WHERE workflow_id = 'wf-silent'", now().Add(-PortWaitStale-time.Second))
	require.NoError(t, err)
	_, err = ports.ReleaseWorkflow(ctx, "hub-1", "wf-two")
	require.NoError(t, err)
	ready, err = ports.Ready(ctx, "hub-1")
	require.NoError(t, err)
	assert.Empty(t, ready, "a silent job is not woken")
	got, err = ports.AllocateAll(ctx, "hub-1", "wf-later", []int32{1})
	require.NoError(t, err, "the silent job's ports are not kept for it")
	assert.Equal(t, []int{20202}, got)
	_, err = ports.AllocateAll(ctx, "hub-1", "wf-behind", []int32{1, 2})
	require.ErrorAs(t, err, &exhausted)
	assert.Equal(t, 0, exhausted.Ahead, "the silent job is passed over")
	_, err = ports.AllocateAll(ctx, "hub-1", "wf-silent", []int32{1, 2})
	require.ErrorAs(t, err, &exhausted, "one port left for two disks")
	assert.Equal(t, 0, exhausted.Ahead, "asking again, the silent job is first in line again at once")
	_, err = ports.AllocateAll(ctx, "hub-1", "wf-behind", []int32{1, 2})
	require.ErrorAs(t, err, &exhausted)
	assert.Equal(t, 1, exhausted.Ahead, "the job that joined while it was silent is behind it")

	// Its release takes it out of the line: once a second port is free, the job behind it fits.
	_, err = ports.ReleaseWorkflow(ctx, "hub-1", "wf-silent")
	require.NoError(t, err)
	_, err = ports.ReleaseWorkflow(ctx, "hub-1", "wf-later")
	require.NoError(t, err)
	ready, err = ports.Ready(ctx, "hub-1")
	require.NoError(t, err)
	assert.Equal(t, []string{"wf-behind"}, ready)
	got, err = ports.AllocateAll(ctx, "hub-1", "wf-behind", []int32{1, 2})
	require.NoError(t, err)
	assert.Equal(t, []int{20202, 20203}, got)
}

// A workflow already holding ports on the hub is not queued behind jobs waiting for them (a
// run leasing disk by disk would otherwise wait for itself), and Reap takes closed
// workflows out of the line.
func TestAllocateAllServesHoldersAndReapEmptiesTheLine(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	ports, err := NewPorts(s, PortRange{First: 20300, Last: 20302})
	require.NoError(t, err)

	_, err = ports.Allocate(ctx, "hub-1", "wf-diskwise", 1)
	require.NoError(t, err)
	_, err = ports.AllocateAll(ctx, "hub-1", "wf-big", []int32{1, 2, 3})
	require.ErrorIs(t, err, ErrPortsExhausted)
	port, err := ports.Allocate(ctx, "hub-1", "wf-diskwise", 2)
	require.NoError(t, err, "the holder's next disk is not queued behind wf-big")
	assert.Equal(t, 20301, port)

	_, err = ports.AllocateAll(ctx, "hub-1", "wf-gone", []int32{1})
	require.ErrorIs(t, err, ErrPortsExhausted)
	reaped, err := ports.Reap(ctx, "hub-1", func(_ context.Context, wf string) (bool, error) { return wf == "wf-gone", nil })
	require.NoError(t, err)
	assert.Empty(t, reaped, "the closed workflow held no lease")
	waiting, err := ports.Waiting(ctx, "hub-1")
	require.NoError(t, err)
	assert.Equal(t, []string{"wf-big"}, waiting)
}

// Many jobs of different sizes asking, waiting in line and releasing at once on a small
// range: every call ends in a lease or a refusal (no lock error survives the transaction's
// retries), no port is ever leased twice, every job is served, and the line ends empty.
func TestPortLineUnderContention(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	ports, err := NewPorts(s, PortRange{First: 20400, Last: 20403})
	require.NoError(t, err)

	const jobs = 12
	var wg sync.WaitGroup
	errs := make([]error, jobs)
	for i := range jobs {
		wg.Go(func() {
			wf := fmt.Sprintf("wf-%02d", i)
			keys := []int32{1, 2, 3}[:1+i%3]
			for ctx.Err() == nil {
				got, err := ports.AllocateAll(ctx, "hub-1", wf, keys)
				if errors.Is(err, ErrPortsExhausted) {
					continue // asking again at once: the heaviest load the line can get
				}
				if err != nil {
					errs[i] = err
					return
				}
				leases, err := ports.ListLeases(ctx, "hub-1")
				if err == nil && len(leases) > 4 {
					err = fmt.Errorf("%d leases on a range of 4", len(leases))
				}
				for _, port := range got {
					if err == nil && (port < 20400 || port > 20403) {
						err = fmt.Errorf("port %d outside the range", port)
					}
				}
				if err == nil {
					_, err = ports.ReleaseWorkflow(ctx, "hub-1", wf)
				}
				errs[i] = err
				return
			}
			errs[i] = fmt.Errorf("%s never served: %w", wf, ctx.Err())
		})
	}
	wg.Wait()
	require.NoError(t, errors.Join(errs...))
	waiting, err := ports.Waiting(ctx, "hub-1")
	require.NoError(t, err)
	assert.Empty(t, waiting)
	leases, err := ports.ListLeases(ctx, "hub-1")
	require.NoError(t, err)
	assert.Empty(t, leases)
}
