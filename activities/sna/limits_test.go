package sna_test

import (
	"context"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/worker"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/sna"
	"github.com/diskferry/diskferry/internal/nbdkit"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
)

// With one copy slot (DISKFERRY_MAX_COPIES=1) a second copy waits, heartbeating what it
// waits for, and runs only once the first gives its slot back (here by being cancelled);
// a copy that fails gives its slot back too.
func TestCopySlotsCapConcurrentCopies(t *testing.T) {
	r := newRig(t, vcsimtest.Options{Disks: 2, DiskSize: diskSize, CBT: true, Seed: 21})
	first, second := r.lab.Disks[0].Key, r.lab.Disks[1].Key
	// Every read takes 1.5 s: the first copy (two 1 MiB reads in flight on its one
	// connection) needs many seconds for its disk's data, long after the second copy asked
	// for the slot, and its cancel waits for one read at most.
	reads := (allocatedBytes(r.lab, first) + 1<<20 - 1) >> 20
	require.GreaterOrEqual(t, reads, int64(8), "the first disk holds too little data to keep its copy busy")
	a := r.activities("", func(s *sna.Settings) {
		s.MaxCopies = 1
		s.RequestSize = 1 << 20
		s.SourceFilters = []nbdkit.Filter{{Name: "delay", Params: map[string]string{"rdelay": "1500ms"}}}
	})
	env := r.env(a)
	vm := execute[activities.VM](t, env, activities.InspectVMName, activities.InspectVMInput{VM: r.lab.VMMoref})
	snap := r.snapshot(env, vm, "diskferry-wf-slots")
	expA := r.startExport(filepath.Join(r.dir, "a.qcow2"), "a", diskSize)
	expB := r.startExport(filepath.Join(r.dir, "b.qcow2"), "b", diskSize)
	execute[struct{}](t, env, activities.EnsureTunnelName, tunnelInput(expA, expB))
	input := func(key int32, exp export) activities.CopyDiskInput {
		return activities.CopyDiskInput{Snapshot: snap, DiskKey: key, CapacityBytes: diskSize, TargetPort: exp.Port,
			HubID: hubID, TargetSocket: exp.Socket, ExportName: exp.Name, Mode: activities.ModeFull, Connections: 1}
	}

	// The first copy takes the slot: it is copying once it reports bytes to do.
	ctxA, cancelA := context.WithCancel(context.Background())
	defer cancelA()
	copying := make(chan struct{})
	var copyingOnce sync.Once
	tapA := &heartbeatTap{record: func(p activities.CopyProgress) {
		if p.BytesTotal > 0 {
			copyingOnce.Do(func() { close(copying) })
		}
	}}
	envA := r.suite.NewTestActivityEnvironment()
	envA.SetTestTimeout(2 * time.Minute)
	envA.SetWorkerOptions(worker.Options{BackgroundActivityContext: ctxA, Interceptors: []interceptor.WorkerInterceptor{tapA}})
	a.Register(envA)
	doneA := make(chan error, 1)
	go func() {
		_, err := envA.ExecuteActivity(activities.CopyDiskName, input(first, expA))
		doneA <- err
	}()
	<-copying

	// The second copy waits and says so; it is cancelled free of the first only by us.
	var cancelledA atomic.Bool
	var mu sync.Mutex
	var waitingFor string
	var told []activities.CopyWait
	ranBeforeRelease := false
	sna.SetRunSignaler(a, signalTap(func(w activities.CopyWait) {
		mu.Lock()
		defer mu.Unlock()
		told = append(told, w)
	}))
	tapB := &heartbeatTap{record: func(p activities.CopyProgress) {
		mu.Lock()
		defer mu.Unlock()
		if p.WaitingFor != "" && waitingFor == "" {
			waitingFor = p.WaitingFor
			go func() {
				cancelledA.Store(true)
				cancelA()
			}()
		}
		if p.BytesTotal > 0 && !cancelledA.Load() {
			ranBeforeRelease = true
		}
	}}
	// Bounded: a slot the first copy never gave back would hold the second forever.
	ctxB, cancelB := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancelB()
	envB := r.suite.NewTestActivityEnvironment()
	envB.SetTestTimeout(2 * time.Minute)
	envB.SetWorkerOptions(worker.Options{BackgroundActivityContext: ctxB, Interceptors: []interceptor.WorkerInterceptor{tapB}})
	a.Register(envB)
	res := execute[activities.CopyDiskResult](t, envB, activities.CopyDiskName, input(second, expB))
	require.Error(t, <-doneA, "the first copy was cancelled")
	mu.Lock()
	require.True(t, strings.HasPrefix(waitingFor, "a copy slot on the SNA of site "), "the waiting copy's heartbeat said %q", waitingFor)
	require.False(t, ranBeforeRelease, "the second copy ran while the first held the only slot")
	require.Equal(t, []activities.CopyWait{{DiskKey: second, WaitingFor: waitingFor}, {DiskKey: second}}, told,
		"the run was told what the copy waited for, then that it runs")
	mu.Unlock()
	require.Equal(t, second, res.DiskKey)
	requireDigest(t, expB, res)

	// A copy failing after it took the slot (its hub is unknown here) gives the slot back:
	// the next one does not wait (one that does is stopped at once and fails the test).
	for i := range 2 {
		var waited atomic.Bool
		ctxF, cancelF := context.WithCancel(context.Background())
		defer cancelF()
		tap := &heartbeatTap{record: func(p activities.CopyProgress) {
			if p.WaitingFor != "" {
				waited.Store(true)
				cancelF()
			}
		}}
		envF := r.suite.NewTestActivityEnvironment()
		envF.SetTestTimeout(2 * time.Minute)
		envF.SetWorkerOptions(worker.Options{BackgroundActivityContext: ctxF, Interceptors: []interceptor.WorkerInterceptor{tap}})
		a.Register(envF)
		bad := input(second, expB)
		bad.HubID = "no-such-hub"
		_, err := envF.ExecuteActivity(activities.CopyDiskName, bad)
		require.False(t, waited.Load(), "failing copy %d waited for a slot: a failed copy kept its slot", i)
		require.ErrorContains(t, err, "no-such-hub", "failing copy %d", i)
	}
}

// signalTap takes what the activities tell their runs (CopyWaitSignal): the test
// environment has no server to signal.
type signalTap func(activities.CopyWait)

func (s signalTap) SignalWorkflow(_ context.Context, _, _ string, name string, arg any) error {
	if w, ok := arg.(activities.CopyWait); ok && name == activities.CopyWaitSignal {
		s(w)
	}
	return nil
}
