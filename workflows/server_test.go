package workflows

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/testenv"
)

// TestBackupOnServer runs a backup on a real dev server with the fake activities, blocked in
// the copy of one disk, and checks what the CLI and an operator rely on: a second start for
// the same VM is refused, the progress query plus the copy heartbeat give live bytes, the
// search attributes find the run, and a cancel compensates.
func TestBackupOnServer(t *testing.T) {
	srv := testenv.StartTemporal(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	f, blocked := blockedFakes(t, "CopyDisk 2001")
	f.blockHeartbeat = activities.CopyProgress{Checkpoint: 3 * gib, BytesDone: 3 * gib, BytesTotal: 8 * gib}
	startWorkers(t, srv.Client, f)

	in := validInput()
	first, err := srv.Client.ExecuteWorkflow(ctx, StartBackupOptions(in), BackupWorkflowName, in)
	require.NoError(t, err)
	select {
	case <-blocked:
	case <-ctx.Done():
		t.Fatal("the copy of disk 2001 never started")
	}

	_, err = srv.Client.ExecuteWorkflow(ctx, StartBackupOptions(in), BackupWorkflowName, in)
	var running *serviceerror.WorkflowExecutionAlreadyStarted
	require.ErrorAs(t, err, &running, "a second backup of the VM must be refused while one runs")

	var live Progress
	require.Eventually(t, func() bool {
		desc, err := srv.Client.DescribeWorkflow(ctx, first.GetID(), first.GetRunID())
		require.NoError(t, err)
		copies, err := LiveCopies(desc.RawResponse.GetPendingActivities(), converter.GetDefaultDataConverter())
		require.NoError(t, err)
		if _, ok := copies[2001]; !ok {
			return false
		}
		v, err := srv.Client.QueryWorkflow(ctx, first.GetID(), first.GetRunID(), ProgressQueryName)
		require.NoError(t, err)
		var p Progress
		require.NoError(t, v.Get(&p))
		live = p.WithLiveCopies(copies, time.Now())
		return true
	}, 10*time.Second, 50*time.Millisecond, "no heartbeat of the copy of disk 2001")
	assert.Equal(t, StatusCopying, live.Status)
	d := live.disk(2001)
	require.NotNil(t, d)
	assert.Equal(t, PhaseCopying, d.Phase)
	assert.Equal(t, 3*gib, d.BytesDone)
	assert.Equal(t, 8*gib, d.BytesTotal)
	assert.Positive(t, d.Rate)

	assertVisible(ctx, t, srv, `VMName = "web01" AND Site = "lab" AND BackupMode = "full" AND BackupStatus = "copying"`)

	require.NoError(t, srv.Client.CancelWorkflow(ctx, first.GetID(), first.GetRunID()))
	err = first.Get(ctx, nil)
	var canceled *temporal.CanceledError
	require.ErrorAs(t, err, &canceled)
	assert.Equal(t, append(callsUntil(t, "CopyDisk 2001"), undosAfter["CopyDisk 2001"]...), f.recorded())
	assertVisible(ctx, t, srv, `VMName = "web01" AND BackupStatus = "cancelled"`)
}

// assertVisible waits until exactly one run matches the visibility query.
func assertVisible(ctx context.Context, t *testing.T, srv *testenv.TemporalServer, query string) {
	t.Helper()
	var found int
	assert.Eventually(t, func() bool {
		resp, err := srv.Client.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{Namespace: srv.Namespace, Query: query})
		require.NoError(t, err)
		found = len(resp.GetExecutions())
		return found == 1
	}, 10*time.Second, 50*time.Millisecond, fmt.Sprintf("runs matching %s: %d, want 1", query, found))
}

// On a real server: a backup for a site no SNA polls says what it waits for while it waits,
// a cancel then ends it cancelled, and with a short bound it fails at once naming the queue.
func TestBackupOnServerWithoutSNA(t *testing.T) {
	srv := testenv.StartTemporal(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f := newFakeActivities(activities.ModeFull)
	t.Cleanup(func() { close(f.release) })
	startWorkers(t, srv.Client, f)

	in := BackupInput{VM: "web01", Site: "nosuchsite", WorkerWaitSeconds: 600}
	waiting, err := srv.Client.ExecuteWorkflow(ctx, StartBackupOptions(in), BackupWorkflowName, in)
	require.NoError(t, err)
	var p Progress
	require.Eventually(t, func() bool {
		v, err := srv.Client.QueryWorkflow(ctx, waiting.GetID(), waiting.GetRunID(), ProgressQueryName)
		require.NoError(t, err)
		require.NoError(t, v.Get(&p))
		return p.WaitingFor != ""
	}, 10*time.Second, 50*time.Millisecond, "the run never said what it waits for")
	assert.Equal(t, "the SNA of site nosuchsite to run InspectVM (task queue diskferry-sna.nosuchsite; the backup fails if no worker takes it within 10m0s)", p.WaitingFor)
	require.NoError(t, srv.Client.CancelWorkflow(ctx, waiting.GetID(), waiting.GetRunID()))
	var canceled *temporal.CanceledError
	require.ErrorAs(t, waiting.Get(ctx, nil), &canceled)

	in.WorkerWaitSeconds = 1
	run, err := srv.Client.ExecuteWorkflow(ctx, StartBackupOptions(in), BackupWorkflowName, in)
	require.NoError(t, err)
	err = run.Get(ctx, nil)
	var appErr *temporal.ApplicationError
	require.ErrorAs(t, err, &appErr)
	assert.Equal(t, activities.ErrNoWorker, appErr.Type())
	assert.Contains(t, err.Error(), "no SNA is polling diskferry-sna.nosuchsite")
	assert.Empty(t, f.recorded(), "no step ran")
}

// On a real server: a copy that fails with an error of its own while it is being cancelled
// (as a copy whose nbdkit was still starting did) ends the run cancelled, not failed, and the
// undos run only after the copy returned.
func TestBackupOnServerCancelEndsCancelledWhenTheCopyFails(t *testing.T) {
	srv := testenv.StartTemporal(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f, blocked := blockedFakes(t, "CopyDisk 2001")
	f.cancelErr = temporal.NewNonRetryableApplicationError("nbdkit exited while starting", "Injected", nil)
	startWorkers(t, srv.Client, f)

	in := validInput()
	run, err := srv.Client.ExecuteWorkflow(ctx, StartBackupOptions(in), BackupWorkflowName, in)
	require.NoError(t, err)
	select {
	case <-blocked:
	case <-ctx.Done():
		t.Fatal("the copy of disk 2001 never started")
	}
	require.NoError(t, srv.Client.CancelWorkflow(ctx, run.GetID(), run.GetRunID()))
	err = run.Get(ctx, nil)
	var canceled *temporal.CanceledError
	require.ErrorAs(t, err, &canceled)
	assert.Equal(t, append(callsUntil(t, "CopyDisk 2001"), undosAfter["CopyDisk 2001"]...), f.recorded())
	assertVisible(ctx, t, srv, `VMName = "web01" AND BackupStatus = "cancelled"`)
}

// blockedFakes are fake activities that hold the named step until the test ends; blocked
// closes when that step is reached.
func blockedFakes(t *testing.T, step string) (*fakeActivities, <-chan struct{}) {
	t.Helper()
	f := newFakeActivities(activities.ModeFull)
	t.Cleanup(func() { close(f.release) })
	blocked := make(chan struct{})
	var once sync.Once
	f.blockAt = step
	f.onBlock = func() { once.Do(func() { close(blocked) }) }
	return f, blocked
}
