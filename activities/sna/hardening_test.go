package sna_test

import (
	"context"
	"errors"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/sna"
	"github.com/diskferry/diskferry/internal/nbdkit"
	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
	"github.com/diskferry/diskferry/workflows"
)

func requireAppError(t *testing.T, err error, errType string) *temporal.ApplicationError {
	t.Helper()
	require.Error(t, err)
	var appErr *temporal.ApplicationError
	require.True(t, errors.As(err, &appErr), "error %v is an application error", err)
	require.Equal(t, errType, appErr.Type(), "%v", err)
	require.True(t, appErr.NonRetryable(), "%v", err)
	return appErr
}

// A target that answers every write with ENOSPC, as qemu-nbd does on a full repository
// (here nbdkit's error filter over an in-memory disk, reached through the real tunnel),
// fails the copy at once with a non-retryable NoSpace error instead of ten retries.
func TestCopyToFullRepositoryFailsAtOnce(t *testing.T) {
	r := newRig(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize, CBT: true, Seed: 21})
	port := r.nextPort
	r.nextPort++
	sock := r.sshd.ExportSocket(port)
	testenv.StartNbdkitSocket(t, sock, "memory", testenv.NbdkitOptions{
		Filters: []string{"error"},
		Params: []string{"size=64M", "error-pwrite=ENOSPC", "error-pwrite-rate=100%",
			"error-zero=ENOSPC", "error-zero-rate=100%"},
	})
	env := r.env(r.activities("", nil))
	vm := execute[activities.VM](t, env, activities.InspectVMName, activities.InspectVMInput{VM: r.lab.VMMoref})
	snap := r.snapshot(env, vm, "diskferry-wf-enospc")
	_, err := env.ExecuteActivity(activities.CopyDiskName, activities.CopyDiskInput{
		Snapshot: snap, DiskKey: vm.Disks[0].Key, CapacityBytes: diskSize,
		TargetPort: port, HubID: hubID, TargetSocket: sock, ExportName: "disk", Mode: activities.ModeFull, Connections: 2,
	})
	appErr := requireAppError(t, err, activities.ErrNoSpace)
	require.Contains(t, appErr.Error(), "repository is full")
	require.Contains(t, appErr.Error(), "space left on device")
}

// vCenter refusing the previous changeId (CBT was reset after it) makes an incremental copy
// fail at once with the typed ChangeIDRefused, which the workflow answers with a full copy;
// the copy heartbeated from its first moment, carrying the previous attempt's checkpoint.
func TestIncrementalCopyRefusedChangeID(t *testing.T) {
	r := newRig(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize, CBT: true, Seed: 22})
	a := r.activities("", nil)
	env := r.env(a)
	vm := execute[activities.VM](t, env, activities.InspectVMName, activities.InspectVMInput{VM: r.lab.VMMoref})
	key := vm.Disks[0].Key
	first := r.snapshot(env, vm, "diskferry-wf-before")
	ids := execute[map[int32]string](t, env, activities.ReadChangeIDsName, activities.ReadChangeIDsInput{Snapshot: first})
	require.NotEmpty(t, ids[key])
	require.NoError(t, r.lab.ResetCBT(key))
	second := r.snapshot(env, vm, "diskferry-wf-after")

	var mu sync.Mutex
	var beats []activities.CopyProgress
	tap := &heartbeatTap{record: func(p activities.CopyProgress) {
		mu.Lock()
		defer mu.Unlock()
		beats = append(beats, p)
	}}
	copyEnv := r.suite.NewTestActivityEnvironment()
	copyEnv.SetWorkerOptions(worker.Options{Interceptors: []interceptor.WorkerInterceptor{tap}})
	a.Register(copyEnv)
	previous := activities.CopyProgress{Checkpoint: 1 << 20, BytesDone: 1 << 20, BytesTotal: diskSize}
	copyEnv.SetHeartbeatDetails(previous)
	_, err := copyEnv.ExecuteActivity(activities.CopyDiskName, activities.CopyDiskInput{
		Snapshot: second, DiskKey: key, CapacityBytes: diskSize, TargetPort: r.nextPort, HubID: hubID, TargetSocket: r.sshd.ExportSocket(r.nextPort), ExportName: "disk",
		Mode: activities.ModeIncremental, PrevChangeID: ids[key], Connections: 1,
	})
	appErr := requireAppError(t, err, activities.ErrChangeIDRefused)
	require.Contains(t, appErr.Error(), ids[key])
	mu.Lock()
	defer mu.Unlock()
	require.NotEmpty(t, beats, "the copy heartbeats before it has any progress of its own")
	require.Equal(t, previous, beats[0], "an early heartbeat keeps the previous attempt's checkpoint")
}

// copyWorkflow runs one CopyDisk with the copy's production heartbeat timeout and waits for
// it to acknowledge a cancel.
func copyWorkflow(ctx workflow.Context, in activities.CopyDiskInput) (activities.CopyDiskResult, error) {
	ctx = workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		StartToCloseTimeout: 5 * time.Minute,
		HeartbeatTimeout:    workflows.CopyHeartbeatTimeout,
		WaitForCancellation: true,
		RetryPolicy:         &temporal.RetryPolicy{MaximumAttempts: 1},
	})
	var res activities.CopyDiskResult
	err := workflow.ExecuteActivity(ctx, activities.CopyDiskName, in).Get(ctx, &res)
	return res, err
}

// A cancel reaches a running copy within its next heartbeat: on a real server, with the SNA
// worker's heartbeat throttle, a rate-limited copy cancelled a tenth of the way through stops
// there. With the SDK's default throttle (24 s for a 30 s heartbeat timeout) the cancel only
// arrived after the whole disk was copied.
func TestCancelStopsCopyMidWay(t *testing.T) {
	r := newRig(t, vcsimtest.Options{Disks: 1, DiskSize: resumeDiskSize, CBT: true, Seed: 23})
	srv := testenv.StartTemporal(t)
	key := r.lab.Disks[0].Key
	total := allocatedBytes(r.lab, key)
	// About 40 s for the disk's data, no initial burst: the cancel at a tenth of it has half a
	// minute to arrive before the end, and each request still gets its reply well within the
	// NBD command timeout (a slower source would time the reads out instead).
	slow := r.activities("", func(s *sna.Settings) {
		s.SourceFilters = []nbdkit.Filter{{Name: "rate", Params: map[string]string{
			"rate": strconv.FormatInt(total*8/40, 10), "burstiness": "0.1",
		}}}
	})
	setup := r.env(slow)
	vm := execute[activities.VM](t, setup, activities.InspectVMName, activities.InspectVMInput{VM: r.lab.VMMoref})
	snap := r.snapshot(setup, vm, "diskferry-wf-cancel")
	exp := r.startExport(filepath.Join(r.dir, "cancel.qcow2"), "cancel", resumeDiskSize)

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	var mu sync.Mutex
	var last activities.CopyProgress
	var cancelled bool
	var run client.WorkflowRun
	tap := &heartbeatTap{record: func(p activities.CopyProgress) {
		mu.Lock()
		defer mu.Unlock()
		last = p
		if !cancelled && run != nil && p.BytesDone >= total/10 {
			cancelled = true
			go func() { _ = srv.Client.CancelWorkflow(ctx, run.GetID(), run.GetRunID()) }()
		}
	}}
	queue := activities.SNAQueue("cancel-test")
	w := worker.New(srv.Client, queue, worker.Options{
		MaxHeartbeatThrottleInterval: sna.MaxHeartbeatThrottle,
		Interceptors:                 []interceptor.WorkerInterceptor{tap},
	})
	slow.Register(w)
	w.RegisterWorkflow(copyWorkflow)
	require.NoError(t, w.Start())
	t.Cleanup(w.Stop)

	mu.Lock()
	run, err := srv.Client.ExecuteWorkflow(ctx, client.StartWorkflowOptions{TaskQueue: queue}, copyWorkflow, activities.CopyDiskInput{
		Snapshot: snap, DiskKey: key, CapacityBytes: resumeDiskSize, TargetPort: exp.Port, HubID: hubID,
		TargetSocket: exp.Socket, ExportName: exp.Name, Mode: activities.ModeFull, Connections: 1,
	})
	mu.Unlock()
	require.NoError(t, err)
	err = run.Get(ctx, nil)
	var canceledErr *temporal.CanceledError
	require.True(t, errors.As(err, &canceledErr), "the copy acknowledged the cancel instead of finishing: %v", err)
	mu.Lock()
	defer mu.Unlock()
	require.True(t, cancelled)
	require.Less(t, last.BytesDone, total, "the copy stopped before the end of the disk")
	t.Logf("cancelled at %d of %d bytes; the copy stopped at %d", total/10, total, last.BytesDone)
}

// A VM reference no VM can have fails InspectVM at once as bad input (it was retried five
// times as a transient error).
func TestInspectVMRefusesInvalidReferences(t *testing.T) {
	r := newRig(t, vcsimtest.Options{Disks: 1, DiskSize: 1 << 20})
	env := r.env(r.activities("", nil))
	for _, ref := range []string{"../../etc", "a/b"} {
		_, err := env.ExecuteActivity(activities.InspectVMName, activities.InspectVMInput{VM: ref})
		requireAppError(t, err, activities.ErrBadInput)
	}
}
