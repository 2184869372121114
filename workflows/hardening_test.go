package workflows

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	sdkpb "go.temporal.io/api/sdk/v1"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
)

// scheduleToStartTimeout is what a step gets when no worker took it from its queue in time.
func scheduleToStartTimeout() error {
	return temporal.NewTimeoutError(enumspb.TIMEOUT_TYPE_SCHEDULE_TO_START, nil)
}

// A step nobody takes from its queue (no SNA for the site) fails the backup at once with a
// message naming the queue, and the steps before it are undone.
func TestBackupNoWorkerFailsNamingTheQueue(t *testing.T) {
	for _, tc := range []struct {
		step, queue, who string
	}{
		{"InspectVM", activities.SNAQueue(testSite), "no SNA is polling diskferry-sna.lab"},
		{"PrepareTarget 2000", activities.HubHostQueue(testHubID), "no hub worker is polling diskferry-hub.hub1"},
		{"CopyDisk 2001", activities.SNAQueue(testSite), "no SNA is polling diskferry-sna.lab"},
	} {
		t.Run(tc.step, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			r.fakes.fail[tc.step] = scheduleToStartTimeout()
			_, err := r.execute(validInput())

			var appErr *temporal.ApplicationError
			require.ErrorAs(t, err, &appErr)
			assert.Equal(t, activities.ErrNoWorker, appErr.Type())
			assert.True(t, appErr.NonRetryable())
			assert.Contains(t, err.Error(), tc.who)
			assert.Contains(t, err.Error(), DefaultWorkerWait.String())
			assert.Equal(t, 1, r.fakes.attempts[tc.step], "a schedule-to-start timeout is not retried")
			want := append(callsUntil(t, tc.step), undosAfter[tc.step]...)
			assert.Equal(t, want, r.fakes.recorded())
			r.assertFailed(t, StatusFailed, tc.who)
		})
	}
}

// While a step waits, the progress and the job log say for which worker and queue.
func TestBackupSaysWhatItWaitsFor(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	in := validInput()
	in.WorkerWaitSeconds = 90
	waiting := map[string]string{}
	r.env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, _ converter.EncodedValues) {
		if _, seen := waiting[info.ActivityType.Name]; !seen {
			waiting[info.ActivityType.Name] = r.progress(t).WaitingFor
		}
		if info.ActivityType.Name == activities.InspectVMName {
			assert.Contains(t, r.details(t), `Waiting for: the SNA of site lab to run InspectVM (task queue diskferry-sna.lab;`)
		}
	})
	_, err := r.execute(in)
	require.NoError(t, err)
	assert.Equal(t, "the SNA of site lab to run InspectVM (task queue diskferry-sna.lab; the backup fails if no worker takes it within 1m30s)",
		waiting[activities.InspectVMName])
	assert.Contains(t, waiting[activities.PrepareTargetName], "the hub worker of host hub1 to run PrepareTarget (task queue diskferry-hub.hub1;")
	assert.Equal(t, "a hub worker to run PlanBackup (task queue diskferry-hub)", waiting[activities.PlanBackupName],
		"the shared hub queue has no worker-wait bound to announce")
	assert.Contains(t, waiting[activities.CopyDiskName], "the SNA of site lab to run CopyDisk")
	assert.Empty(t, r.progress(t).WaitingFor, "nothing is waited for once the run is over")
	assert.NotContains(t, r.details(t), "Waiting for:")
}

// A catalog outage of several minutes (each catalog step failing with a connection error
// for longer than the old 5 attempts, about 15 s) is waited out by the steps and the undos.
func TestBackupOutlastsCatalogOutage(t *testing.T) {
	t.Run("steps", func(t *testing.T) {
		r := newRun(t, activities.ModeFull)
		for _, step := range []string{"PlanBackup", "PrepareTarget 2000", "StopExport 2001", "CommitPoint"} {
			r.fakes.flaky[step] = 12
		}
		res, err := r.execute(validInput())
		require.NoError(t, err)
		assert.Equal(t, "p1", res.PointID)
		assert.Equal(t, 13, r.fakes.attempts["CommitPoint"])
	})
	t.Run("undos", func(t *testing.T) {
		r := newRun(t, activities.ModeFull)
		r.fakes.fail["VerifyTarget 2001"] = injected("VerifyTarget 2001")
		for _, step := range []string{"DiscardTarget 2000", "DiscardTarget 2001", "ReleasePorts", "FailPoint"} {
			r.fakes.flaky[step] = 12
		}
		_, err := r.execute(validInput())
		require.ErrorContains(t, err, "injected failure at VerifyTarget 2001")
		assert.Empty(t, r.progress(t).UndoErrors, "every undo outlasted the outage")
		assert.Equal(t, 13, r.fakes.attempts["FailPoint"])
	})
}

// Every step that needs the catalog retries for at least 5 minutes before it gives up.
func TestCatalogStepsRetryForFiveMinutes(t *testing.T) {
	b := &backup{}
	for name := range usesCatalog {
		opts := b.options(name, activities.HubQueue, name)
		p := opts.RetryPolicy
		if p.MaximumAttempts == 0 {
			assert.GreaterOrEqual(t, opts.ScheduleToCloseTimeout, 5*time.Minute, name)
			continue
		}
		var span time.Duration
		interval := p.InitialInterval
		for range p.MaximumAttempts - 1 {
			span += interval
			interval = min(time.Duration(float64(interval)*p.BackoffCoefficient), p.MaximumInterval)
		}
		assert.GreaterOrEqual(t, span, 5*time.Minute, name)
		assert.LessOrEqual(t, p.MaximumInterval, 30*time.Second, name)
		assert.Contains(t, p.NonRetryableErrorTypes, activities.ErrBadInput, name)
	}
}

// Every long step has a heartbeat timeout, so a dead worker is noticed in about a minute.
func TestLongStepsHaveHeartbeatTimeouts(t *testing.T) {
	b := &backup{}
	for _, name := range []string{activities.CopyDiskName, activities.VerifyTargetName, activities.CreateSnapshotName, activities.RemoveSnapshotName} {
		opts := b.options(name, activities.SNAQueue(testSite), name)
		assert.Positive(t, opts.HeartbeatTimeout, name)
		assert.LessOrEqual(t, opts.HeartbeatTimeout, time.Minute, name)
		assert.Equal(t, DefaultWorkerWait, opts.ScheduleToStartTimeout, name)
	}
}

// A full repository and a request vCenter refuses fail the backup on the first attempt.
func TestPermanentErrorsAreNotRetried(t *testing.T) {
	for _, tc := range []struct{ step, errType string }{
		{"CopyDisk 2001", activities.ErrNoSpace},
		{"CreateSnapshot", activities.ErrRefused},
		{"PrepareTarget 2000", activities.ErrNoSpace},
	} {
		t.Run(tc.errType+" "+tc.step, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			r.fakes.fail[tc.step] = temporal.NewApplicationError("permanent trouble at "+tc.step, tc.errType)
			_, err := r.execute(validInput())
			require.ErrorContains(t, err, "permanent trouble at "+tc.step)
			assert.Equal(t, 1, r.fakes.attempts[tc.step])
			want := append(callsUntil(t, tc.step), undosAfter[tc.step]...)
			assert.Equal(t, want, r.fakes.recorded(), "and everything is cleaned up")
		})
	}
}

// vCenter refusing the previous changeId of one disk: that disk's overlay is replaced by a
// fresh full target on the same port and the disk is copied in full, with a warning; the
// other disk stays incremental, and the point records why.
func TestBackupChangeIDRefusedCopiesTheDiskInFull(t *testing.T) {
	r := newRun(t, activities.ModeIncremental)
	r.fakes.refuseChangeID = map[int32]bool{2000: true}
	res, err := r.execute(validInput())
	require.NoError(t, err)

	want := append(callsUntil(t, "CopyDisk 2001"),
		"StopExport 2000", "PrepareTarget 2000", "StartExport 2000", "CopyDisk 2000")
	want = append(want, forward[len(callsUntil(t, "CopyDisk 2001")):]...)
	assert.Equal(t, want, r.fakes.recorded())

	require.Len(t, r.fakes.prepares, 3)
	again := r.fakes.prepares[2]
	assert.Equal(t, int32(2000), again.Disk.Key)
	assert.Equal(t, activities.ModeFull, again.Disk.Mode)
	assert.Empty(t, again.Disk.ParentPath)
	assert.Contains(t, again.Disk.Reason, `vCenter refused the previous changeId "52 aa/2000"`)
	last := r.fakes.copyInputs[len(r.fakes.copyInputs)-1]
	assert.Equal(t, activities.ModeFull, last.Mode)
	assert.Empty(t, last.PrevChangeID)

	assert.Equal(t, activities.ModeFull, res.Mode)
	require.Len(t, res.Disks, 2)
	assert.Equal(t, activities.ModeFull, res.Disks[0].Mode)
	assert.Empty(t, res.Disks[0].ParentPath)
	assert.Contains(t, res.Disks[0].Reason, "vCenter refused the previous changeId")
	assert.Equal(t, activities.ModeIncremental, res.Disks[1].Mode)
	require.Len(t, res.Warnings, 1)
	assert.Contains(t, res.Warnings[0], "disk 2000: vCenter refused the previous changeId")
	assert.Equal(t, activities.ModeFull, r.attrs[BackupModeKey.GetName()])
	require.Len(t, r.fakes.commits, 1)
	assert.Equal(t, res.Disks, r.fakes.commits[0].Disks)
	assert.Contains(t, r.details(t), "warning: disk 2000: vCenter refused the previous changeId")
}

// A failure after the fallback undoes the re-exported full target like any other.
func TestBackupChangeIDRefusedThenFailureCompensates(t *testing.T) {
	r := newRun(t, activities.ModeIncremental)
	r.fakes.refuseChangeID = map[int32]bool{2000: true}
	r.fakes.fail["ReadChangeIDs"] = injected("ReadChangeIDs")
	_, err := r.execute(validInput())
	require.ErrorContains(t, err, "injected failure at ReadChangeIDs")
	calls := r.fakes.recorded()
	assert.Equal(t, []string{"StopExport 2000", "RemoveSnapshot", "DropTunnel", "StopExport 2001", "DiscardTarget 2001",
		"DiscardTarget 2000", "ReleasePorts", "FailPoint"}, calls[len(calls)-8:])
	r.assertFailed(t, StatusFailed, "injected failure at ReadChangeIDs")
}

func TestBackupRejectsBadVMReferences(t *testing.T) {
	for name, vm := range map[string]string{
		"too long":       strings.Repeat("x", 10000),
		"control":        "web01\n# injected",
		"relative path":  "a/b",
		"dot-dot":        "../../etc",
		"dot-dot inside": "/DC0/vm/../../etc",
		"bad moref":      "VirtualMachine:../x",
		"spaces":         " web01",
	} {
		t.Run(name, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			_, err := r.execute(BackupInput{VM: vm, Site: testSite})
			var appErr *temporal.ApplicationError
			require.ErrorAs(t, err, &appErr)
			assert.Equal(t, activities.ErrBadInput, appErr.Type())
			assert.True(t, appErr.NonRetryable())
			assert.Contains(t, appErr.Error(), "vm:")
			assert.Empty(t, r.fakes.recorded(), "no activity runs on bad input")
			assert.LessOrEqual(t, len(r.attrs[VMNameKey.GetName()]), MaxVMRefLength+len("…"), "the search attribute stays within the server's limit")
			assert.Equal(t, StatusFailed, r.attrs[BackupStatusKey.GetName()])
		})
	}
	for _, vm := range []string{"web01", "vm-42", "VirtualMachine:vm-42", "/DC0/vm/folder/web01", "db (prod) #2"} {
		assert.NoError(t, BackupInput{VM: vm, Site: testSite}.Validate(), vm)
	}
	assert.ErrorContains(t, BackupInput{VM: "web\xff01", Site: testSite}.Validate(), "vm: not valid UTF-8")
}

// A misspelt field ("disk" for "disks") fails the run naming the field instead of being
// ignored, which would back up every disk.
func TestBackupRejectsUnknownFields(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.env.ExecuteWorkflow(BackupWorkflowName, map[string]any{"vm": "web01", "site": testSite, "disk": []int{203}})
	require.True(t, r.env.IsWorkflowCompleted())
	err := r.env.GetWorkflowError()
	var appErr *temporal.ApplicationError
	require.ErrorAs(t, err, &appErr)
	assert.Equal(t, activities.ErrBadInput, appErr.Type())
	assert.Contains(t, err.Error(), `unknown field "disk"`)
	assert.Empty(t, r.fakes.recorded())

	var in BackupInput
	require.NoError(t, in.UnmarshalJSON([]byte(`{"vm":"web01","site":"lab","disks":[2000],"workerWaitSeconds":30}`)))
	assert.NoError(t, in.Validate())
	assert.Equal(t, []int32{2000}, in.Disks)
}

const hostileName = "# Pwned [click](https://evil.example/x) <img src=x onerror=alert(1)> *b* `c` www.evil.example ~~s~~ a@evil.example"

// Names from users and vCenter never turn into markup in the Web UI's job log.
func TestJobLogEscapesMarkdown(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	_, err := r.execute(BackupInput{VM: hostileName, Site: testSite})
	require.Error(t, err, "the name is refused (it has a '/'), and the refusal is logged")
	details := r.details(t)
	for _, markup := range []string{"[click]", "](", "https://", "<img", "*b*", "`c`", "www.evil", "~~s~~", "a@evil", "\n#"} {
		assert.False(t, containsUnescaped(details, markup), "details contain %q unescaped:\n%s", markup, details)
	}
	assert.Contains(t, details, `\[click\]`)
	summary := (&backup{}).options(activities.InspectVMName, activities.SNAQueue(testSite), "inspect VM "+hostileName).Summary
	assert.False(t, containsUnescaped(summary, "[click]"), "activity summaries are escaped too: %s", summary)

	assert.Equal(t, `a \*b\* \[c\] \<d\> \&amp; \| \~ \@ \! \\ \_ https\://x www\.y WWW\.z plain: text (ok) - 1. #`,
		escapeMarkdown("a *b* [c] <d> &amp; | ~ @ ! \\ _ https://x www.y WWW.z plain: text (ok) - 1. #"))
	assert.Equal(t, "line one line two", escapeMarkdown("line one\nline two"))
}

// containsUnescaped reports whether s holds markup whose first character is not escaped.
func containsUnescaped(s, markup string) bool {
	for i := 0; ; {
		j := strings.Index(s[i:], markup)
		if j < 0 {
			return false
		}
		if at := i + j; at == 0 || s[at-1] != '\\' {
			return true
		}
		i += j + 1
	}
}

// details returns the run's current details as the Web UI shows them.
func (r *run) details(t *testing.T) string {
	t.Helper()
	v, err := r.env.QueryWorkflow("__temporal_workflow_metadata")
	require.NoError(t, err)
	var meta sdkpb.WorkflowMetadata
	require.NoError(t, v.Get(&meta))
	return meta.GetCurrentDetails()
}
