package sna_test

import (
	"errors"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
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
	full := testenv.StartNbdkitTCP(t, hubHost, "memory", testenv.NbdkitOptions{
		Filters: []string{"error"},
		Params: []string{"size=64M", "error-pwrite=ENOSPC", "error-pwrite-rate=100%",
			"error-zero=ENOSPC", "error-zero-rate=100%"},
	})
	env := r.env(r.activities("", nil))
	vm := execute[activities.VM](t, env, activities.InspectVMName, activities.InspectVMInput{VM: r.lab.VMMoref})
	snap := r.snapshot(env, vm, "diskferry-wf-enospc")
	_, err := env.ExecuteActivity(activities.CopyDiskName, activities.CopyDiskInput{
		Snapshot: snap, DiskKey: vm.Disks[0].Key, CapacityBytes: diskSize,
		TargetPort: full.Port, HubID: hubID, ExportName: "disk", Mode: activities.ModeFull, Connections: 2,
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
		Snapshot: second, DiskKey: key, CapacityBytes: diskSize, TargetPort: testenv.FreePort(t), ExportName: "disk",
		Mode: activities.ModeIncremental, PrevChangeID: ids[key], Connections: 1,
	})
	appErr := requireAppError(t, err, activities.ErrChangeIDRefused)
	require.Contains(t, appErr.Error(), ids[key])
	mu.Lock()
	defer mu.Unlock()
	require.NotEmpty(t, beats, "the copy heartbeats before it has any progress of its own")
	require.Equal(t, previous, beats[0], "an early heartbeat keeps the previous attempt's checkpoint")
}
