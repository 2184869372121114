package workflows

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
)

const portWaitText = "a port on hub hub1 for each of 2 disks (all 4 ports leased; retrying)"

// withoutRepeats drops the repeated attempts of step from calls.
func withoutRepeats(calls []string, step string) []string {
	out := make([]string, 0, len(calls))
	for i, c := range calls {
		if c == step && i > 0 && calls[i-1] == step {
			continue
		}
		out = append(out, c)
	}
	return out
}

// A hub with too few free ports is back-pressure: the backup waits, holding none of them,
// says so in its progress and job log while it waits, with pauses growing from a second, and
// clears it once every disk has its port.
func TestBackupWaitsForAPortAndSaysSo(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	const step = activities.AllocatePortsName
	r.fakes.exhaust[step] = 4
	var (
		starts  []time.Time
		waiting []string
		details []string
	)
	r.env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, args converter.EncodedValues) {
		var in activities.AllocatePortsInput
		if info.ActivityType.Name != step || args.Get(&in) != nil {
			return
		}
		assert.Equal(t, []int32{2000, 2001}, in.DiskKeys, "every disk's port in one lease")
		starts = append(starts, r.env.Now())
		waiting = append(waiting, r.progress(t).WaitingFor)
		details = append(details, r.details(t))
	})
	res, err := r.execute(validInput())
	require.NoError(t, err)
	assert.Equal(t, "p1", res.PointID)

	assert.Equal(t, 5, r.fakes.attempts[step], "four exhausted attempts, then the lease")
	assert.Equal(t, forward, withoutRepeats(r.fakes.recorded(), step))
	require.Len(t, starts, 5)
	var pauses []time.Duration
	for i := 1; i < len(starts); i++ {
		pauses = append(pauses, starts[i].Sub(starts[i-1]))
	}
	assert.Equal(t, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second}, pauses,
		"the pause doubles from a second")
	assert.Contains(t, waiting[0], "a hub worker to run AllocatePorts", "the first attempt waits for a worker")
	for i := 1; i < len(waiting); i++ {
		assert.Equal(t, portWaitText, waiting[i], "attempt %d", i+1)
		assert.Contains(t, details[i], "Waiting for: "+portWaitText, "attempt %d", i+1)
		assert.Contains(t, details[i], "disks 2000, 2001 wait for "+portWaitText, "attempt %d", i+1)
	}
	assert.Empty(t, r.progress(t).WaitingFor, "cleared once the port is leased")
	final := r.details(t)
	assert.NotContains(t, final, "Waiting for:")
	assert.Contains(t, final, "disks 2000, 2001 leased ports 12000, 12001 on hub hub1 after waiting 15s")
}

// The hub's wake-up (PortsFreeSignal, sent when a release made room for the run) ends the
// pause at once: the run asks again then, not at its timer, and its pauses keep growing as
// before. Its place in the hub's line shows in its progress.
func TestBackupWokenByTheHubAsksAgainAtOnce(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	const step = activities.AllocatePortsName
	r.fakes.exhaust[step] = 5
	r.fakes.portsAhead = 2
	var (
		starts  []time.Time
		waiting []string
	)
	r.env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, _ converter.EncodedValues) {
		if info.ActivityType.Name != step {
			return
		}
		starts = append(starts, r.env.Now())
		waiting = append(waiting, r.progress(t).WaitingFor)
		if len(starts) == 4 { // the pause after this attempt is 8 s: the hub wakes the run after 3
			r.env.RegisterDelayedCallback(func() { r.env.SignalWorkflow(activities.PortsFreeSignal, nil) }, 3*time.Second)
		}
	})
	res, err := r.execute(validInput())
	require.NoError(t, err)
	assert.Equal(t, "p1", res.PointID)

	require.Len(t, starts, 6)
	var pauses []time.Duration
	for i := 1; i < len(starts); i++ {
		pauses = append(pauses, starts[i].Sub(starts[i-1]))
	}
	assert.Equal(t, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 3 * time.Second, 16 * time.Second}, pauses,
		"the wake-up cut the fourth pause short; the next one still doubled")
	assert.Equal(t, "a port on hub hub1 for each of 2 disks (all 4 ports leased, 2 jobs ahead in line; retrying)", waiting[1])
	assert.Contains(t, r.details(t), "leased ports 12000, 12001 on hub hub1 after waiting 26s")
}

// The wait is bounded: past 30 minutes the backup fails naming the hub and its range, every
// undo runs, and the catalog was asked no more than every 30 s once the backoff grew.
func TestBackupPortWaitIsBounded(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	const step = activities.AllocatePortsName
	r.fakes.exhaust[step] = 1 << 30
	_, err := r.execute(validInput())

	var appErr *temporal.ApplicationError
	require.ErrorAs(t, err, &appErr)
	assert.Equal(t, activities.ErrPortsExhausted, appErr.Type())
	assert.True(t, appErr.NonRetryable())
	assert.Contains(t, err.Error(), "no free export ports on hub hub1 for disks 2000, 2001: all 4 ports (20100-20103) stayed leased for 30m0s")
	r.assertFailed(t, StatusFailed, "all 4 ports (20100-20103) stayed leased")
	assert.Equal(t, append(callsUntil(t, step), undosAfter[step]...), withoutRepeats(r.fakes.recorded(), step))
	// 1+2+4+8+16 s, then every 30 s until 30 min: 5 + 59 pauses, one attempt after each.
	assert.Equal(t, 65, r.fakes.attempts[step])
	assert.Empty(t, r.progress(t).WaitingFor)
}

// A cancel while the backup waits for ports ends the wait at once and runs the undos of what
// the run had set up (the release of its leases, should an attempt have written one).
func TestBackupCancelWhileWaitingForAPortReleases(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	const step = activities.AllocatePortsName
	r.fakes.exhaust[step] = 1 << 30
	r.env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, args converter.EncodedValues) {
		if info.ActivityType.Name != step {
			return
		}
		r.fakes.mu.Lock()
		defer r.fakes.mu.Unlock()
		if r.fakes.attempts[step] == 2 { // the third attempt starts: the run has waited twice
			r.env.RegisterDelayedCallback(r.env.CancelWorkflow, time.Second)
		}
	})
	_, err := r.execute(validInput())

	var canceled *temporal.CanceledError
	require.ErrorAs(t, err, &canceled)
	calls := r.fakes.recorded()
	assert.Equal(t, append(callsUntil(t, step), undosAfter[step]...), withoutRepeats(calls, step))
	assert.Equal(t, 3, r.fakes.attempts[step], "the wait ended with the cancel")
	assert.True(t, slices.Contains(calls, "ReleasePorts"), "the leases are released")
	r.assertFailed(t, StatusCancelled, "canceled")
	assert.Empty(t, r.progress(t).WaitingFor)
}

// The plan's note (the VM's chain is on a hub whose worker was not seen lately) goes to the
// job log, where the operator sees why the backup waits for that hub.
func TestBackupLogsThePlansNote(t *testing.T) {
	r := newRun(t, activities.ModeIncremental)
	note := "hub hub1 holding VM web01's chain was last seen 5m0s ago; waiting for its worker"
	r.fakes.planNote = note
	_, err := r.execute(validInput())
	require.NoError(t, err)
	assert.Contains(t, r.details(t), escapeMarkdown(note))
}

// A mount (and a restore: the same job core) waits for a port the same way; its job log
// says so (a mount has no progress query).
func TestMountWaitsForAPort(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	const step = activities.AllocatePortsName
	r.fakes.exhaust[step] = 2
	var waiting []string
	r.env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, _ converter.EncodedValues) {
		if info.ActivityType.Name == step {
			waiting = append(waiting, r.details(t))
		}
	})
	r.whileMounted(t, func(MountInfo) {
		assert.Equal(t, mountForward, withoutRepeats(r.fakes.recorded(), step))
		r.env.SignalWorkflow(UnmountSignalName, nil)
	})
	_, err := r.executeMount(MountInput{Point: testPointID})
	require.NoError(t, err)
	assert.Equal(t, 3, r.fakes.attempts[step])
	require.Len(t, waiting, 3)
	assert.NotContains(t, waiting[0], portWaitText)
	for _, d := range waiting[1:] {
		assert.Contains(t, d, "Waiting for: "+portWaitText)
	}
	assert.NotContains(t, r.details(t), "Waiting for:")
}

// No hub alive for a VM's first chain: PlanBackup's NoHub is retried like a catalog outage,
// for a bounded time, then the backup fails with its message, naming the hubs.
func TestBackupWithoutAliveHubFailsNamingTheHubs(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	msg := "plan backup of web01: no hub is alive to start its chain (hub hub1 last seen 5m0s ago; ...); start a hub worker"
	r.fakes.fail["PlanBackup"] = temporal.NewApplicationError(msg, activities.ErrNoHub)
	_, err := r.execute(validInput())
	require.ErrorContains(t, err, msg)
	assert.Equal(t, catalogAttempts, r.fakes.attempts["PlanBackup"], "retried as a catalog step, then given up")
	assert.Equal(t, []string{"InspectVM", "PlanBackup"}, slices.Compact(r.fakes.recorded()))
	r.assertFailed(t, StatusFailed, "no hub is alive")
}
