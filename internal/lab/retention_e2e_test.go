package lab_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/retention"
	"github.com/diskferry/diskferry/workflows"
)

// TestRetentionKeepsWhatThePolicySays backs a VM up ten times with data changing in between
// under "keep the last 3, chains of at most 2 incrementals". Every backup starts the VM's
// retention, which merges and removes the points that go: afterwards exactly the newest 3
// points remain, none reads through more than 3 files, each still restores to a file equal to
// the source at its snapshot, the repository holds only their files, and the catalog's
// allocated bytes are what the files take.
func TestRetentionKeepsWhatThePolicySays(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 1, DiskSize: 32 << 20})
	key := l.VC.Disks[0].Key
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	defer store.Close()

	sources := map[string]string{} // point → the source as of its snapshot
	var order, deleted []string
	var freed int64
	for i := range 10 {
		if i > 0 {
			// Rewrites of the same blocks and new ones.
			for _, off := range []int64{1 << 20, int64(2+i) << 20} {
				_, err := l.VC.WriteRandom(key, off, 256<<10)
				require.NoError(t, err)
			}
		}
		src := snapshotSources(t, l)[key]
		res := runBackup(ctx, t, l, workflows.BackupInput{VM: l.VC.VMName, Site: l.Site})
		sources[res.PointID] = src
		order = append(order, res.PointID)
		if i == 0 {
			vms, err := store.FindVMs(ctx, l.VC.VMName)
			require.NoError(t, err)
			require.Len(t, vms, 1)
			require.NoError(t, store.SetVMPolicy(ctx, vms[0].ID, retention.Policy{KeepLast: 3, MaxChain: 2}))
		}
		// The retention this backup started: wait for it, so the next backup sees its result.
		var outcome workflows.RetentionOutcome
		require.NoError(t, l.Temporal.Client.GetWorkflow(ctx, workflows.RetentionWorkflowID(l.VC.VMName), "").Get(ctx, &outcome),
			"retention after backup %d", i+1)
		deleted = append(deleted, outcome.Result.Deleted...)
		freed += outcome.Result.BytesFreed
	}
	require.ElementsMatch(t, order[:len(order)-3], deleted, "the retentions deleted every point but the newest 3")
	require.Positive(t, freed)

	requireRetained(ctx, t, l, store, order[len(order)-3:], func(id string) string { return sources[id] })
}

// TestScheduledBackupsKeepTheSchedulesPolicy runs a schedule created with the CLI's retention
// flags (keep the last 3, chains of at most 2 incrementals) every 2 s: after 10 backups and
// the schedule's end, the schedule's default policy left exactly the newest 3 points, each
// restoring equal to the source.
func TestScheduledBackupsKeepTheSchedulesPolicy(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 1, DiskSize: 16 << 20})
	cli := lab.Build(t, t.TempDir(), "./starter", "diskferry")
	key := l.VC.Disks[0].Key
	_, err := l.VC.WriteRandom(key, 1<<20, 2<<20)
	require.NoError(t, err)
	source := snapshotSources(t, l)[key]
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	defer store.Close()

	run(ctx, t, l, cli, "schedule", "create", "--vm", l.VC.VMName, "--site", l.Site, "--every", "2s",
		"--keep-last", "3", "--max-chain", "2")
	backups := fmt.Sprintf("WorkflowType = '%s' AND VMName = '%s'", workflows.BackupWorkflowName, l.VC.VMName)
	require.Eventually(t, func() bool {
		return countWorkflows(ctx, t, l, backups+" AND ExecutionStatus = 'Completed'") >= 10
	}, 6*time.Minute, time.Second, "ten scheduled backups never completed\nhub log:\n%s", tail(l.WorkerLog("hub")))
	run(ctx, t, l, cli, "schedule", "delete", "backup-schedule-"+l.VC.VMName)
	open := fmt.Sprintf("(WorkflowType = '%s' OR WorkflowType = '%s') AND ExecutionStatus = 'Running'",
		workflows.BackupWorkflowName, workflows.RetentionWorkflowName)
	require.Eventually(t, func() bool { return countWorkflows(ctx, t, l, open) == 0 },
		2*time.Minute, 200*time.Millisecond, "backups or retentions still running after the schedule's end")
	require.Zero(t, countWorkflows(ctx, t, l, backups+" AND ExecutionStatus != 'Completed'"), "a scheduled backup failed")

	points, err := store.FindPoints(ctx, l.VC.VMName)
	require.NoError(t, err)
	var newest []string // FindPoints lists newest first
	for _, p := range points {
		if p.Status == catalog.StatusComplete && len(newest) < 3 {
			newest = append(newest, p.ID)
		}
	}
	requireRetained(ctx, t, l, store, newest, func(string) string { return source })
}

func countWorkflows(ctx context.Context, t *testing.T, l *lab.Lab, query string) int64 {
	t.Helper()
	resp, err := l.Temporal.Client.CountWorkflow(ctx, &workflowservice.CountWorkflowExecutionsRequest{Namespace: l.Temporal.Namespace, Query: query})
	require.NoError(t, err)
	return resp.GetCount()
}

// requireRetained checks the VM's points after retention: exactly want remain complete (none
// left deleting), none reads through more than 3 files, each equals its source (sourceOf)
// and restores to a file equal to it, the catalog's allocated bytes are what the files take,
// and the repository holds only the kept points' files.
func requireRetained(ctx context.Context, t *testing.T, l *lab.Lab, store *catalog.Store, want []string, sourceOf func(id string) string) {
	t.Helper()
	points, err := store.FindPoints(ctx, l.VC.VMName)
	require.NoError(t, err)
	var kept []string
	for _, p := range points {
		require.NotEqual(t, catalog.StatusDeleting, p.Status, "point %s left deleting", p.ID)
		if p.Status == catalog.StatusComplete {
			kept = append(kept, p.ID)
		}
	}
	require.ElementsMatch(t, want, kept, "exactly the points retention keeps remain")

	files := map[string]bool{}
	var recorded int64
	dir := t.TempDir()
	for _, id := range kept {
		p, err := store.GetPoint(ctx, id)
		require.NoError(t, err)
		require.Len(t, p.Disks, 1)
		d := p.Disks[0]
		info, err := qemu.Info(ctx, d.Path)
		require.NoError(t, err)
		require.LessOrEqual(t, chainLength(ctx, t, d.Path), 3, "point %s reads through more than 3 files", id)
		requireSameContent(ctx, t, sourceOf(id), d.Path)
		require.Equal(t, info.ActualSize, d.AllocatedBytes, "point %s: catalog and file disagree on its size", id)
		recorded += d.AllocatedBytes
		files[d.Path] = true
		files[repo.ManifestPath(d.Path)] = true

		out := filepath.Join(dir, id+".raw")
		runRestore(ctx, t, l, workflows.RestoreInput{Point: id, Destination: activities.DestinationFile, Format: activities.FormatRaw, Output: out})
		requireSameRaw(ctx, t, sourceOf(id), out)
	}
	require.Positive(t, recorded)

	// The repository holds the kept points' files (a merged point's file may sit in a removed
	// point's directory) and nothing else.
	err = filepath.Walk(l.RepoRoot, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		require.True(t, files[path], "file in the repository no kept point uses: %s", path)
		delete(files, path)
		return nil
	})
	require.NoError(t, err)
	for path := range files {
		if filepath.Ext(path) == ".qcow2" {
			t.Errorf("kept point file missing: %s", path)
		}
	}
	requireNoExports(ctx, t, l)
}

// chainLength is how many files a restore of the image reads: it and its backing files.
func chainLength(ctx context.Context, t *testing.T, path string) int {
	t.Helper()
	n := 0
	for path != "" {
		info, err := qemu.Info(ctx, path)
		require.NoError(t, err)
		n++
		next := info.BackingFile
		if next != "" && !filepath.IsAbs(next) {
			next = filepath.Join(filepath.Dir(path), next)
		}
		path = next
	}
	return n
}

// TestRetentionSurvivesHubWorkerKill kills the hub worker (SIGKILL) while ApplyRetention
// merges a VM's oldest full point into the incremental kept above it, and starts it again:
// Temporal retries the step on the restarted worker, which finishes the merge from what the
// catalog and the files say. The kept points equal their sources, the dropped one is gone,
// and the repository holds only the kept points' files.
func TestRetentionSurvivesHubWorkerKill(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 1, DiskSize: 512 << 20})
	key := l.VC.Disks[0].Key
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	defer store.Close()

	// A full, then an incremental rewriting all of its data: dropping the full commits the
	// incremental's 256 MiB into the full's file, long enough to be interrupted.
	fillDisk(t, l, key, 256<<20)
	full := runBackup(ctx, t, l, workflows.BackupInput{VM: l.VC.VMName, Site: l.Site})
	fillDisk(t, l, key, 256<<20)
	sources := map[string]string{}
	var kept []string
	for range 2 {
		src := snapshotSources(t, l)[key]
		res := runBackup(ctx, t, l, workflows.BackupInput{VM: l.VC.VMName, Site: l.Site})
		sources[res.PointID] = src
		kept = append(kept, res.PointID)
		_, err := l.VC.WriteRandom(key, 300<<20, 1<<20)
		require.NoError(t, err)
	}
	// The backups' own retentions run before the policy exists and keep everything: the last
	// one must have ended, or it would apply the policy set next itself.
	require.NoError(t, l.Temporal.Client.GetWorkflow(ctx, workflows.RetentionWorkflowID(l.VC.VMName), "").Get(ctx, nil))
	vms, err := store.FindVMs(ctx, l.VC.VMName)
	require.NoError(t, err)
	require.Len(t, vms, 1)
	require.NoError(t, store.SetVMPolicy(ctx, vms[0].ID, retention.Policy{KeepLast: 2}))
	run := startRetention(ctx, t, l, workflows.RetentionInput{VM: l.VC.VMName})
	waitForActivity(ctx, t, l, run, activities.ApplyRetentionName)
	l.KillWorker("hub")
	l.StartWorker("hub")

	var outcome workflows.RetentionOutcome
	if err := run.Get(ctx, &outcome); err != nil {
		t.Fatalf("retention after the hub restart: %v\nhub log:\n%s", err, tail(l.WorkerLog("hub")))
	}
	require.Greater(t, activityAttempts(ctx, t, l, run.GetID(), activities.ApplyRetentionName), int32(1), "the merge was retried")
	p, err := store.GetPoint(ctx, full.PointID)
	require.ErrorIs(t, err, catalog.ErrNotFound, "the dropped full point is gone (%+v)", p)
	requireRetained(ctx, t, l, store, kept, func(id string) string { return sources[id] })
}

// startRetention starts a retention run of its own: a run still going (one a backup started)
// is waited for first, so the new run plans with everything the test set up.
func startRetention(ctx context.Context, t *testing.T, l *lab.Lab, in workflows.RetentionInput) client.WorkflowRun {
	t.Helper()
	id := workflows.RetentionWorkflowID(in.VM)
	for {
		run, err := l.Temporal.Client.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
			ID: id, TaskQueue: activities.HubQueue, WorkflowExecutionErrorWhenAlreadyStarted: true,
		}, workflows.RetentionWorkflowName, in)
		var running *serviceerror.WorkflowExecutionAlreadyStarted
		if !errors.As(err, &running) {
			require.NoError(t, err)
			return run
		}
		_ = l.Temporal.Client.GetWorkflow(ctx, id, running.RunId).Get(ctx, nil)
	}
}

// waitForActivity returns once the run has an attempt of the activity type started. A run that
// ends first fails the test with what it did instead.
func waitForActivity(ctx context.Context, t *testing.T, l *lab.Lab, run client.WorkflowRun, activityType string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		desc, err := l.Temporal.Client.DescribeWorkflow(ctx, run.GetID(), run.GetRunID())
		require.NoError(t, err)
		for _, a := range desc.RawResponse.GetPendingActivities() {
			if a.GetActivityType().GetName() == activityType && a.GetState() == enumspb.PENDING_ACTIVITY_STATE_STARTED {
				return
			}
		}
		if desc.RawResponse.GetWorkflowExecutionInfo().GetStatus() != enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING {
			var out any
			err := run.Get(ctx, &out)
			t.Fatalf("%s ended before %s started: result %+v, error %v\nhub log:\n%s", run.GetID(), activityType, out, err, tail(l.WorkerLog("hub")))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: %s not started in 2 minutes\nhub log:\n%s", run.GetID(), activityType, tail(l.WorkerLog("hub")))
}
