package workflows

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/mock"
	"github.com/stretchr/testify/require"
	sdkpb "go.temporal.io/api/sdk/v1"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/log"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/diskferry/diskferry/activities"
)

// run is one BackupWorkflow execution in the test environment with fake activities.
type run struct {
	env   *testsuite.TestWorkflowEnvironment
	fakes *fakeActivities

	mu       sync.Mutex
	statuses []string          // BackupStatus values in upsert order
	attrs    map[string]string // last value of each keyword search attribute
	// retentions are the inputs of the RetentionWorkflow children the backup started; the
	// children themselves are mocked (retention_test.go tests RetentionWorkflow).
	retentions []RetentionInput
}

func newRun(t *testing.T, planMode string) *run {
	t.Helper()
	r := newUnmockedRun(t, planMode)
	r.env.OnWorkflow(RetentionWorkflowName, mock.Anything, mock.Anything).Run(func(args mock.Arguments) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.retentions = append(r.retentions, args.Get(1).(RetentionInput))
	}).Return(RetentionOutcome{}, nil)
	return r
}

// newUnmockedRun is a run whose workflows all run for real.
func newUnmockedRun(t *testing.T, planMode string) *run {
	t.Helper()
	var suite testsuite.WorkflowTestSuite
	suite.SetLogger(testLogger(t))
	r := &run{env: suite.NewTestWorkflowEnvironment(), fakes: newFakeActivities(planMode), attrs: map[string]string{}}
	t.Cleanup(func() { close(r.fakes.release) })
	r.env.SetStartWorkflowOptions(StartBackupOptions(BackupInput{VM: "web01"}))
	Register(r.env)
	r.fakes.register(r.env)
	r.env.OnUpsertTypedSearchAttributes(mock.Anything).Run(func(args mock.Arguments) {
		sa := args.Get(0).(temporal.SearchAttributes)
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, key := range SearchAttributeKeys() {
			kw := key.(temporal.SearchAttributeKeyKeyword)
			if v, ok := sa.GetKeyword(kw); ok {
				r.attrs[kw.GetName()] = v
				if kw.GetName() == BackupStatusKey.GetName() {
					r.statuses = append(r.statuses, v)
				}
			}
		}
	}).Return()
	return r
}

// testLogger keeps the SDK's log in memory and prints it only when the test failed: injected
// failures make it noisy, and activities the test environment abandoned may still log after
// the test ended, when writing to t is no longer allowed.
func testLogger(t *testing.T) log.Logger {
	buf := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("SDK log:\n%s", buf.String())
		}
	})
	return log.NewStructuredLogger(slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelWarn})))
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (r *run) execute(in BackupInput) (BackupResult, error) {
	r.env.ExecuteWorkflow(BackupWorkflowName, in)
	if !r.env.IsWorkflowCompleted() {
		return BackupResult{}, errors.New("workflow did not complete")
	}
	if err := r.env.GetWorkflowError(); err != nil {
		return BackupResult{}, err
	}
	var res BackupResult
	err := r.env.GetWorkflowResult(&res)
	return res, err
}

func (r *run) progress(t *testing.T) Progress {
	t.Helper()
	v, err := r.env.QueryWorkflow(ProgressQueryName)
	require.NoError(t, err)
	var p Progress
	require.NoError(t, v.Get(&p))
	return p
}

func validInput() BackupInput { return BackupInput{VM: "web01", Site: testSite} }

// forward lists the calls of a successful two-disk backup, in order (copies sorted).
var forward = []string{
	"InspectVM", "PlanBackup",
	"AllocatePorts", "PrepareTarget 2000", "StartExport 2000",
	"PrepareTarget 2001", "StartExport 2001",
	"EnsureTunnel", "CreateSnapshot", "CopyDisk 2000", "CopyDisk 2001",
	"ReadChangeIDs", "RemoveSnapshot", "DropTunnel",
	"StopExport 2000", "StopExport 2001", "VerifyTarget 2000", "VerifyTarget 2001",
	"CommitPoint", "ReleasePorts",
}

// callsUntil returns the forward calls up to and including step.
func callsUntil(t *testing.T, step string) []string {
	t.Helper()
	for i, c := range forward {
		if c == step {
			return append([]string(nil), forward[:i+1]...)
		}
	}
	t.Fatalf("unknown step %q", step)
	return nil
}

func TestBackupFull(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	in := validInput()
	in.Quiesce = true
	res, err := r.execute(in)
	require.NoError(t, err)

	assert.Equal(t, forward, r.fakes.recorded())
	assert.Equal(t, "p1", res.PointID)
	assert.Equal(t, testHubID, res.HubID)
	assert.Equal(t, "web01", res.VMName)
	assert.Equal(t, activities.ModeFull, res.Mode)
	assert.Empty(t, res.Warnings)
	require.Len(t, res.Disks, 2)
	assert.Equal(t, activities.DiskResult{
		Key: 2000, Path: testTargetPath(2000), Mode: activities.ModeFull, ChangeID: "52 bb/2000",
		CapacityBytes: 64 * gib, BytesRead: gib, BytesWritten: gib, BytesZeroed: gib / 2,
		Duration: 2 * time.Second, Digest: "sha256:2000", AllocatedBytes: gib,
	}, res.Disks[0], "the allocated size comes from the verification")
	assert.Equal(t, int32(2001), res.Disks[1].Key)
	assert.Equal(t, "52 bb/2001", res.Disks[1].ChangeID)

	require.Len(t, r.fakes.commits, 1)
	assert.Equal(t, res.Disks, r.fakes.commits[0].Disks)
	assert.Empty(t, r.fakes.failPoints)
}

// The VM's shape InspectVM reports reaches PlanBackup, which keeps it with the point, and
// PrepareTarget unchanged.
func TestBackupPassesVMConfig(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	_, err := r.execute(validInput())
	require.NoError(t, err)
	want := testVM().Config
	require.Len(t, r.fakes.plans, 1)
	assert.Equal(t, want, r.fakes.plans[0].VM.Config)
	require.NotEmpty(t, r.fakes.prepares)
	for _, p := range r.fakes.prepares {
		assert.Equal(t, want, p.VM.Config)
	}
}

func TestBackupIncremental(t *testing.T) {
	r := newRun(t, activities.ModeIncremental)
	in := validInput()
	in.Mode = activities.ModeIncremental
	res, err := r.execute(in)
	require.NoError(t, err)

	assert.Equal(t, forward, r.fakes.recorded())
	assert.Equal(t, activities.ModeIncremental, res.Mode)
	require.Len(t, res.Disks, 2)
	for _, d := range res.Disks {
		assert.Equal(t, activities.ModeIncremental, d.Mode)
		assert.Equal(t, fmt.Sprintf("/srv/diskferry/web01/p0/%d.qcow2", d.Key), d.ParentPath)
		assert.Equal(t, d.CapacityBytes/1024, d.BytesRead)
	}
	assert.Equal(t, activities.ModeIncremental, r.attrs[BackupModeKey.GetName()])
}

func TestBackupSelectedDisk(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	in := validInput()
	in.Disks = []int32{2001}
	res, err := r.execute(in)
	require.NoError(t, err)
	require.Len(t, res.Disks, 1)
	assert.Equal(t, int32(2001), res.Disks[0].Key)
	assert.NotContains(t, r.fakes.recorded(), "CopyDisk 2000")
}

// undosAfter is what must run, in this order, when the step fails or is cancelled.
var undosAfter = map[string][]string{
	"InspectVM":          nil,
	"PlanBackup":         nil,
	"AllocatePorts":      {"ReleasePorts", "FailPoint"},
	"PrepareTarget 2000": {"DiscardTarget 2000", "ReleasePorts", "FailPoint"},
	"StartExport 2000":   {"StopExport 2000", "DiscardTarget 2000", "ReleasePorts", "FailPoint"},
	"PrepareTarget 2001": {"DiscardTarget 2001", "StopExport 2000", "DiscardTarget 2000", "ReleasePorts", "FailPoint"},
	"StartExport 2001": {"StopExport 2001", "DiscardTarget 2001", "StopExport 2000", "DiscardTarget 2000",
		"ReleasePorts", "FailPoint"},
	"EnsureTunnel": {"DropTunnel", "StopExport 2001", "DiscardTarget 2001", "StopExport 2000", "DiscardTarget 2000",
		"ReleasePorts", "FailPoint"},
	"CreateSnapshot": {"RemoveSnapshot", "DropTunnel", "StopExport 2001", "DiscardTarget 2001", "StopExport 2000",
		"DiscardTarget 2000", "ReleasePorts", "FailPoint"},
	"CopyDisk 2001": {"RemoveSnapshot", "DropTunnel", "StopExport 2001", "DiscardTarget 2001",
		"StopExport 2000", "DiscardTarget 2000", "ReleasePorts", "FailPoint"},
	"ReadChangeIDs": {"RemoveSnapshot", "DropTunnel", "StopExport 2001", "DiscardTarget 2001",
		"StopExport 2000", "DiscardTarget 2000", "ReleasePorts", "FailPoint"},
	"RemoveSnapshot": {"DropTunnel", "StopExport 2001", "DiscardTarget 2001", "StopExport 2000",
		"DiscardTarget 2000", "ReleasePorts", "FailPoint"},
	"DropTunnel": {"StopExport 2001", "DiscardTarget 2001", "StopExport 2000", "DiscardTarget 2000",
		"ReleasePorts", "FailPoint"},
	"StopExport 2000":   {"StopExport 2001", "DiscardTarget 2001", "DiscardTarget 2000", "ReleasePorts", "FailPoint"},
	"StopExport 2001":   {"DiscardTarget 2001", "DiscardTarget 2000", "ReleasePorts", "FailPoint"},
	"VerifyTarget 2000": {"DiscardTarget 2001", "DiscardTarget 2000", "ReleasePorts", "FailPoint"},
	"VerifyTarget 2001": {"DiscardTarget 2001", "DiscardTarget 2000", "ReleasePorts", "FailPoint"},
	"CommitPoint":       {"DiscardTarget 2001", "DiscardTarget 2000", "ReleasePorts", "FailPoint"},
}

// undosAfterCancelledTeardown: a teardown step of the success path that is cancelled may not
// have run, so its undo stays registered and the compensation runs it.
var undosAfterCancelledTeardown = map[string][]string{
	"RemoveSnapshot":  undosAfter["CopyDisk 2001"],
	"DropTunnel":      undosAfter["EnsureTunnel"],
	"StopExport 2000": undosAfter["DropTunnel"],
	"StopExport 2001": undosAfter["StopExport 2000"],
}

// stepsInOrder are the steps of undosAfter in forward order, so subtests read like the flow.
func stepsInOrder() []string {
	var out []string
	for _, c := range forward {
		if _, ok := undosAfter[c]; ok {
			out = append(out, c)
		}
	}
	return out
}

func TestBackupFailureCompensates(t *testing.T) {
	for _, step := range stepsInOrder() {
		t.Run(step, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			r.fakes.fail[step] = injected(step)
			_, err := r.execute(validInput())

			var appErr *temporal.ApplicationError
			require.ErrorAs(t, err, &appErr)
			assert.Equal(t, "Injected", appErr.Type(), "the original error is returned")
			assert.Contains(t, err.Error(), "injected failure at "+step)

			want := append(callsUntil(t, step), undosAfter[step]...)
			assert.Equal(t, want, r.fakes.recorded())
			r.assertFailed(t, StatusFailed, "injected failure at "+step)
		})
	}
}

func TestBackupCancelCompensates(t *testing.T) {
	for _, step := range stepsInOrder() {
		t.Run(step, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			r.fakes.blockAt = step
			r.fakes.onBlock = r.env.CancelWorkflow
			_, err := r.execute(validInput())

			var canceled *temporal.CanceledError
			require.ErrorAs(t, err, &canceled)
			undos := undosAfter[step]
			if u, ok := undosAfterCancelledTeardown[step]; ok {
				undos = u
			}
			want := append(callsUntil(t, step), undos...)
			assert.Equal(t, want, r.fakes.recorded())
			r.assertFailed(t, StatusCancelled, "canceled")
		})
	}
}

// assertFailed checks what an operator sees of a failed or cancelled run.
func (r *run) assertFailed(t *testing.T, status, errText string) {
	t.Helper()
	assert.Equal(t, status, r.attrs[BackupStatusKey.GetName()])
	assert.Empty(t, r.fakes.commits)
	p := r.progress(t)
	assert.Equal(t, status, p.Status)
	assert.Contains(t, p.Error, errText)
	for _, d := range p.Disks {
		assert.Equal(t, PhaseFailed, d.Phase, "disk %d", d.Key)
	}
	if p.PointID == "" {
		assert.Empty(t, r.fakes.failPoints, "no point was opened")
		return
	}
	require.Len(t, r.fakes.failPoints, 1)
	assert.Equal(t, "p1", r.fakes.failPoints[0].PointID)
	assert.Contains(t, r.fakes.failPoints[0].Error, errText)
}

// A step that failed may have done its work anyway (a timed-out create whose vCenter task ran
// on, a qemu-nbd started before a lost reply): its undo runs with what the workflow knows.
func TestBackupFailedStepIsUndoneWithoutItsResult(t *testing.T) {
	t.Run("CreateSnapshot", func(t *testing.T) {
		r := newRun(t, activities.ModeFull)
		r.fakes.fail["CreateSnapshot"] = injected("CreateSnapshot")
		_, err := r.execute(validInput())
		require.Error(t, err)
		require.Len(t, r.fakes.removed, 1)
		assert.Equal(t, activities.Snapshot{VMMoref: "vm-42", Name: SnapshotName("backup-web01", "default-test-run-id")}, r.fakes.removed[0],
			"without a moref the snapshot is removed by its name")
	})
	t.Run("StartExport", func(t *testing.T) {
		r := newRun(t, activities.ModeFull)
		r.fakes.fail["StartExport 2000"] = injected("StartExport 2000")
		_, err := r.execute(validInput())
		require.Error(t, err)
		require.Len(t, r.fakes.stops, 1)
		assert.Equal(t, activities.StopExportInput{Port: testPort(2000), Path: testTargetPath(2000)}, r.fakes.stops[0])
	})
}

func TestBackupUndoFailureContinues(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.fail["CopyDisk 2001"] = injected("CopyDisk 2001")
	r.fakes.fail["DropTunnel"] = injected("DropTunnel")
	r.fakes.fail["DiscardTarget 2000"] = injected("DiscardTarget 2000")
	_, err := r.execute(validInput())

	assert.Contains(t, err.Error(), "injected failure at CopyDisk 2001", "the original error is returned")
	assert.NotContains(t, err.Error(), "DropTunnel")
	want := append(callsUntil(t, "CopyDisk 2001"), undosAfter["CopyDisk 2001"]...)
	assert.Equal(t, want, r.fakes.recorded(), "every undo runs despite the failing ones")
	p := r.progress(t)
	require.Len(t, p.UndoErrors, 2)
	assert.Contains(t, p.UndoErrors[0], "undo tunnel")
	assert.Contains(t, p.UndoErrors[1], "undo discard-target-2000")
	require.Len(t, r.fakes.failPoints, 1)
	assert.Contains(t, r.fakes.failPoints[0].Error, "injected failure at CopyDisk 2001")
}

func TestBackupRetriesTransientCopyFailure(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.flaky["CopyDisk 2000"] = 2
	res, err := r.execute(validInput())
	require.NoError(t, err)
	assert.Equal(t, "p1", res.PointID)
	assert.Equal(t, 3, r.fakes.attempts["CopyDisk 2000"])
	assert.NotContains(t, r.fakes.recorded(), "FailPoint")
}

func TestBackupReleaseFailureAfterCommitIsWarning(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.fail["ReleasePorts"] = injected("ReleasePorts")
	res, err := r.execute(validInput())
	require.NoError(t, err)
	require.Len(t, res.Warnings, 1)
	assert.Contains(t, res.Warnings[0], "injected failure at ReleasePorts")
	assert.Equal(t, forward, r.fakes.recorded(), "nothing of the committed point is undone")
	assert.Equal(t, StatusComplete, r.attrs[BackupStatusKey.GetName()])
}

func TestBackupRunningElsewhereIsSurfaced(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.fail["PlanBackup"] = temporal.NewNonRetryableApplicationError(
		"web01 is being backed up by workflow backup-vm-42", activities.ErrBackupRunning, nil)
	_, err := r.execute(validInput())
	assert.True(t, IsBackupRunning(err))
	assert.Contains(t, err.Error(), "being backed up by workflow backup-vm-42")
	assert.Equal(t, []string{"InspectVM", "PlanBackup"}, r.fakes.recorded())
}

func TestBackupBadInput(t *testing.T) {
	for _, tc := range []struct {
		in    BackupInput
		field string
	}{
		{BackupInput{Site: testSite}, "vm"},
		{BackupInput{VM: "web01"}, "site"},
		{BackupInput{VM: "web01", Site: "lab/../x"}, "site"},
		{BackupInput{VM: "web01", Site: testSite, Mode: "differential"}, "mode"},
		{BackupInput{VM: "web01", Site: testSite, Connections: 99}, "connections"},
		{BackupInput{VM: "web01", Site: testSite, Disks: []int32{2000, 2000}}, "disks"},
	} {
		t.Run(tc.field, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			_, err := r.execute(tc.in)
			var appErr *temporal.ApplicationError
			require.ErrorAs(t, err, &appErr)
			assert.Equal(t, activities.ErrBadInput, appErr.Type())
			assert.True(t, appErr.NonRetryable())
			assert.Contains(t, appErr.Error(), tc.field+":")
			assert.Empty(t, r.fakes.recorded(), "no activity runs on bad input")
			assert.Equal(t, StatusFailed, r.attrs[BackupStatusKey.GetName()])
		})
	}
}

func TestBackupSearchAttributes(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	_, err := r.execute(validInput())
	require.NoError(t, err)
	assert.Equal(t, map[string]string{
		"VMName": "web01", "Site": testSite, "BackupMode": activities.ModeFull, "BackupStatus": StatusComplete,
	}, r.attrs)
	assert.Equal(t, []string{StatusRunning, StatusCopying, StatusVerifying, StatusComplete}, r.statuses)
}

func TestBackupProgressQuery(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	var during []Progress
	r.env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, _ converter.EncodedValues) {
		switch info.ActivityType.Name {
		case activities.StartExportName, activities.ReadChangeIDsName, activities.VerifyTargetName:
			during = append(during, r.progress(t))
		}
	})
	_, err := r.execute(validInput())
	require.NoError(t, err)
	require.Len(t, during, 5)

	exporting := during[0]
	assert.Equal(t, StatusRunning, exporting.Status)
	assert.Equal(t, "p1", exporting.PointID)
	assert.Equal(t, PhaseExporting, exporting.Disks[0].Phase)
	assert.Equal(t, PhaseWaiting, exporting.Disks[1].Phase)
	assert.Equal(t, 8*gib, exporting.Disks[1].BytesTotal)

	copied := during[2]
	assert.Equal(t, StatusCopying, copied.Status)
	for _, d := range copied.Disks {
		assert.Equal(t, PhaseCopying, d.Phase)
		assert.Equal(t, d.CapacityBytes/64, d.BytesDone)
		assert.InDelta(t, float64(d.CapacityBytes/64)/2, d.Rate, 1)
		assert.False(t, d.CopyStarted.IsZero())
	}

	verifying := during[3]
	assert.Equal(t, StatusVerifying, verifying.Status)
	assert.Equal(t, "verifying disk 2000", verifying.Step)

	final := r.progress(t)
	assert.Equal(t, StatusComplete, final.Status)
	for _, d := range final.Disks {
		assert.Equal(t, PhaseDone, d.Phase)
	}
}

func TestBackupCurrentDetails(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	_, err := r.execute(validInput())
	require.NoError(t, err)
	v, err := r.env.QueryWorkflow("__temporal_workflow_metadata")
	require.NoError(t, err)
	var meta sdkpb.WorkflowMetadata
	require.NoError(t, v.Get(&meta))
	for _, line := range []string{
		"**Backup of web01 (site lab)**",
		"planned full backup as point p1 on hub hub1: disk 2000 full 64 GiB, disk 2001 full 8 GiB",
		"disk 2000 copied: 1 GiB read",
		`snapshot diskferry-backup-web01\@default-test-run-id (snapshot-7) created`, // the @ escaped: no e-mail autolink
		"point p1 complete: 2 disk(s), 1.1 GiB read",
	} {
		assert.True(t, strings.Contains(meta.GetCurrentDetails(), line), "details lack %q:\n%s", line, meta.GetCurrentDetails())
	}
}

func TestSnapshotNameNamesTheRun(t *testing.T) {
	name := SnapshotName("backup-db@prod-01", "0192-run")
	wf, run, ok := ParseSnapshotName(name)
	require.True(t, ok)
	assert.Equal(t, "backup-db@prod-01", wf)
	assert.Equal(t, "0192-run", run)
	assert.NotEqual(t, name, SnapshotName("backup-db@prod-01", "0193-run"), "each run has its own snapshot")
	for _, other := range []string{"operator snapshot", "diskferry-", "diskferry-wf", "diskferry-@run", "diskferry-wf@"} {
		_, _, ok := ParseSnapshotName(other)
		assert.False(t, ok, other)
	}
}
