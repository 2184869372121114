package lab_test

import (
	"context"
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vmware/govmomi/vim25/mo"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/vsphere"
	"github.com/diskferry/diskferry/workflows"
)

// TestBackupEndToEnd runs a full and then an incremental backup of a 2-disk VM through the
// real workers, tunnel, exports and catalog, and checks every restore point against the
// source content at its snapshot, then that nothing was left behind.
func TestBackupEndToEnd(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 2, DiskSize: 64 << 20})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// Full backup.
	atFull := snapshotSources(t, l)
	full := runBackup(ctx, t, l, workflows.BackupInput{VM: l.VC.VMName, Site: l.Site})
	require.Equal(t, activities.ModeFull, full.Mode)
	require.Len(t, full.Disks, 2)
	for _, d := range full.Disks {
		require.Equal(t, activities.ModeFull, d.Mode)
		requireSameContent(ctx, t, atFull[d.Key], d.Path)
	}

	// Change some blocks, then an incremental.
	var changed int64
	for i, d := range l.VC.Disks {
		for _, off := range []int64{1 << 20, 17<<20 + 4096, int64(40+i) << 20} {
			_, err := l.VC.WriteRandom(d.Key, off, 256<<10)
			require.NoError(t, err)
			changed += 256 << 10
		}
	}
	atIncr := snapshotSources(t, l)
	incr := runBackup(ctx, t, l, workflows.BackupInput{VM: l.VC.VMName, Site: l.Site})
	require.Equal(t, activities.ModeIncremental, incr.Mode)
	var moved int64
	for _, d := range incr.Disks {
		require.Equal(t, activities.ModeIncremental, d.Mode, "disk %d", d.Key)
		require.NotEmpty(t, d.ParentPath)
		requireSameContent(ctx, t, atIncr[d.Key], d.Path)
		moved += d.BytesRead
	}
	require.LessOrEqual(t, moved, changed*105/100, "incremental read %d bytes for %d changed", moved, changed)
	require.Greater(t, moved, int64(0))

	// The full point still reads as the VM did at the first snapshot.
	for _, d := range full.Disks {
		requireSameContent(ctx, t, atFull[d.Key], d.Path)
	}

	points := requireComplete(ctx, t, l, full.PointID, incr.PointID)
	require.Equal(t, full.PointID, points[1].ParentID, "the incremental builds on the full point")
	requireNothingLeaked(ctx, t, l, full, incr)
}

func runBackup(ctx context.Context, t *testing.T, l *lab.Lab, in workflows.BackupInput) workflows.BackupResult {
	t.Helper()
	run, err := l.Temporal.Client.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
	require.NoError(t, err)
	var res workflows.BackupResult
	if err := run.Get(ctx, &res); err != nil {
		t.Fatalf("backup %s: %v\nhub log:\n%s\nsna log:\n%s", run.GetID(), err, tail(l.WorkerLog("hub")), tail(l.WorkerLog("sna")))
	}
	t.Logf("backup %s: point %s mode %s in %s", run.GetID(), res.PointID, res.Mode, res.Duration)
	return res
}

// snapshotSources copies each disk's flat file as it is now: vcsim makes no delta disks, so
// the flat file moves on after the snapshot and the test keeps its own copy.
func snapshotSources(t *testing.T, l *lab.Lab) map[int32]string {
	t.Helper()
	dir := t.TempDir()
	out := map[int32]string{}
	for _, d := range l.VC.Disks {
		dst := filepath.Join(dir, filepath.Base(d.FlatPath))
		copyFile(t, d.FlatPath, dst)
		out[d.Key] = dst
	}
	return out
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	require.NoError(t, err)
	defer in.Close()
	out, err := os.Create(dst)
	require.NoError(t, err)
	_, err = io.Copy(out, in)
	require.NoError(t, err)
	require.NoError(t, out.Close())
}

func requireSameContent(ctx context.Context, t *testing.T, raw, qcow2 string) {
	t.Helper()
	res, err := qemu.Compare(ctx, qemu.Raw(raw), qemu.QCOW2(qcow2))
	require.NoError(t, err)
	require.True(t, res.Equal, "%s differs from %s: %s", qcow2, raw, res.Message)
}

// requireComplete checks the points are complete in the catalog, each disk with its
// changeId and digest, and that no port lease or export row is left; it returns the points.
func requireComplete(ctx context.Context, t *testing.T, l *lab.Lab, ids ...string) []catalog.Point {
	t.Helper()
	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	defer store.Close()
	var points []catalog.Point
	for _, id := range ids {
		p, err := store.GetPoint(ctx, id)
		require.NoError(t, err)
		require.Equal(t, catalog.StatusComplete, p.Status, "point %s", id)
		for _, d := range p.Disks {
			require.NotEmpty(t, d.ChangeID, "disk %d of point %s has no changeId", d.Key, id)
			require.NotEmpty(t, d.Digest, "disk %d of point %s has no digest", d.Key, id)
		}
		points = append(points, p)
	}
	requireNoLeases(ctx, t, l, store)
	return points
}

func requireNoLeases(ctx context.Context, t *testing.T, l *lab.Lab, store *catalog.Store) {
	t.Helper()
	ports, err := catalog.NewPorts(store, catalog.DefaultPortRange)
	require.NoError(t, err)
	leases, err := ports.ListLeases(ctx, l.HubID)
	require.NoError(t, err)
	require.Empty(t, leases, "port leases left behind")
	exports, err := store.ListExports(ctx, l.HubID)
	require.NoError(t, err)
	require.Empty(t, exports, "export rows left behind")
}

func requireNothingLeaked(ctx context.Context, t *testing.T, l *lab.Lab, points ...workflows.BackupResult) {
	t.Helper()
	// No snapshot left on the VM.
	vc, err := vsphere.Connect(ctx, vsphere.Config{URL: l.VC.URL, User: l.VC.User, Password: l.VC.Password, Thumbprint: l.VC.Thumbprint})
	require.NoError(t, err)
	defer vc.Close(context.WithoutCancel(ctx))
	vm, err := vc.FindVM(ctx, l.VC.VMMoref)
	require.NoError(t, err)
	snaps, err := vc.ListSnapshots(ctx, vm)
	require.NoError(t, err)
	require.Empty(t, snaps, "snapshots left on the VM")

	// No export process: every pid file's export is gone.
	pidFiles, err := filepath.Glob(filepath.Join(l.RunDir, "*.pid"))
	require.NoError(t, err)
	for _, pf := range pidFiles {
		_, err := qemu.Find(pf)
		require.ErrorIs(t, err, qemu.ErrNotRunning, "export %s still running", pf)
	}
	require.Empty(t, l.DataPlaneProcesses(), "data-plane processes left running")

	// The repository holds exactly the points' files: each disk's qcow2 and block manifest.
	want := map[string]bool{}
	for _, p := range points {
		for _, d := range p.Disks {
			want[d.Path] = true
			want[repo.ManifestPath(d.Path)] = true
		}
	}
	err = filepath.Walk(l.RepoRoot, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		require.True(t, want[path], "unexpected file in the repository: %s", path)
		delete(want, path)
		return nil
	})
	require.NoError(t, err)
	require.Empty(t, want, "restore point files missing")
}

func tail(s string) string {
	lines := strings.Split(s, "\n")
	if len(lines) > 60 {
		lines = lines[len(lines)-60:]
	}
	return strings.Join(lines, "\n")
}

// TestBackupCancelledMidCopyLeavesNothing cancels a backup while its disk copy runs and
// checks the compensation on real parts: no snapshot, export, lease or file is left, and
// the catalog marks the point failed.
func TestBackupCancelledMidCopyLeavesNothing(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 1, DiskSize: 1 << 30})
	key := l.VC.Disks[0].Key
	fillDisk(t, l, key, 768<<20) // the copy is still running when the cancel lands

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	in := workflows.BackupInput{VM: l.VC.VMName, Site: l.Site}
	c := l.Temporal.Client
	run, err := c.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
	require.NoError(t, err)
	waitForCopyProgress(ctx, t, l, run.GetID(), key)
	require.NoError(t, c.CancelWorkflow(ctx, run.GetID(), run.GetRunID()))

	err = run.Get(ctx, nil)
	var canceled *temporal.CanceledError
	require.ErrorAs(t, err, &canceled, "the run ends cancelled")

	var p workflows.Progress
	v, err := c.QueryWorkflow(ctx, run.GetID(), run.GetRunID(), workflows.ProgressQueryName)
	require.NoError(t, err)
	require.NoError(t, v.Get(&p))
	require.Equal(t, workflows.StatusCancelled, p.Status)
	require.Empty(t, p.UndoErrors)

	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	defer store.Close()
	point, err := store.GetPoint(ctx, p.PointID)
	require.NoError(t, err)
	require.Equal(t, catalog.StatusFailed, point.Status)
	requireNothingLeaked(ctx, t, l)
	requireNoLeases(ctx, t, l, store)
}

// TestHubWorkerKilledMidBackup kills the hub worker (SIGKILL) while a disk copy runs and
// starts it again: its reconcile adopts the running backup's export (the same qemu-nbd
// process), the backup completes, the restore point equals the source and nothing is left
// behind.
func TestHubWorkerKilledMidBackup(t *testing.T) {
	backupSurvivesWorkerKill(t, func(ctx context.Context, l *lab.Lab, key int32) {
		before := exportPID(t, l)
		// Frozen, the SNA cannot finish the copy, so nothing can stop the export before the
		// restarted hub's reconcile has run and the test has looked at it.
		l.PauseWorker("sna")
		defer l.ResumeWorker("sna")
		reconciled := strings.Count(l.WorkerLog("hub"), "exports reconciled")
		l.KillWorker("hub")
		l.StartWorker("hub")
		require.Eventually(t, func() bool {
			return strings.Count(l.WorkerLog("hub"), "exports reconciled") > reconciled
		}, time.Minute, 50*time.Millisecond, "the restarted hub never reconciled its exports")
		require.Equal(t, before, exportPID(t, l), "the restarted hub adopted the running export")
	})
}

// The SNA dies mid-copy (its nbdkit and tunnel forwards with it): Temporal retries the copy
// after the heartbeat timeout on the restarted SNA, which opens the forward again and resumes
// from the last heartbeated checkpoint: it reads nothing below that checkpoint again.
func TestSNAWorkerKilledMidCopy(t *testing.T) {
	var last activities.CopyProgress
	var areas []vsphere.Extent
	l, ctx, res := backupSurvivesWorkerKill(t, func(ctx context.Context, l *lab.Lab, key int32) {
		areas = l.VC.Allocated(key)
		require.Eventually(t, func() bool { return copyHeartbeat(ctx, t, l, key).Checkpoint > 0 },
			time.Minute, 20*time.Millisecond, "the copy never heartbeated a checkpoint")
		l.KillWorker("sna")
		// The SNA is dead: this is the heartbeat the retried copy resumes from.
		last = copyHeartbeat(ctx, t, l, key)
		l.StartWorker("sna")
	})
	require.Greater(t, activityAttempts(ctx, t, l, workflows.BackupWorkflowID(l.VC.VMName), activities.CopyDiskName), int32(1), "the copy was retried")

	// A copy reads every byte of its areas (the https source has no holes inside them), so
	// what the retry did not read again is what it resumed past.
	below := bytesBelow(areas, last.Checkpoint)
	skipped := last.BytesTotal - res.Disks[0].BytesRead
	require.Positive(t, below)
	require.GreaterOrEqual(t, skipped, below, "the retry read again below its checkpoint at %d", last.Checkpoint)
	redone := last.BytesDone - skipped
	t.Logf("checkpoint %d: %d of %d bytes done, %d skipped by the retry, %d done again", last.Checkpoint, last.BytesDone, last.BytesTotal, skipped, redone)
}

// backupSurvivesWorkerKill backs up a 1 GiB disk (768 MiB of data, snapshot quiesced) and,
// once its copy reports progress, calls interrupt to kill and restart a worker: the backup
// completes, equals the source and leaves nothing behind.
func backupSurvivesWorkerKill(t *testing.T, interrupt func(ctx context.Context, l *lab.Lab, key int32)) (*lab.Lab, context.Context, workflows.BackupResult) {
	t.Helper()
	l := startLab(t, lab.Options{Disks: 1, DiskSize: 1 << 30})
	key := l.VC.Disks[0].Key
	fillDisk(t, l, key, 768<<20)
	source := snapshotSources(t, l)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	in := workflows.BackupInput{VM: l.VC.VMName, Site: l.Site, Quiesce: true}
	run, err := l.Temporal.Client.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
	require.NoError(t, err)
	waitForCopyProgress(ctx, t, l, run.GetID(), key)
	requireQuiescedSnapshot(ctx, t, l)

	interrupt(ctx, l, key)

	var res workflows.BackupResult
	if err := run.Get(ctx, &res); err != nil {
		t.Fatalf("backup after the restart: %v\nhub log:\n%s\nsna log:\n%s", err, tail(l.WorkerLog("hub")), tail(l.WorkerLog("sna")))
	}
	require.Len(t, res.Disks, 1)
	requireSameContent(ctx, t, source[key], res.Disks[0].Path)
	requireComplete(ctx, t, l, res.PointID)
	requireNothingLeaked(ctx, t, l, res)
	return l, ctx, res
}

// requireQuiescedSnapshot checks the running backup asked vCenter for a quiesced snapshot.
func requireQuiescedSnapshot(ctx context.Context, t *testing.T, l *lab.Lab) {
	t.Helper()
	vc, err := vsphere.Connect(ctx, vsphere.Config{URL: l.VC.URL, User: l.VC.User, Password: l.VC.Password, Thumbprint: l.VC.Thumbprint})
	require.NoError(t, err)
	defer vc.Close(context.WithoutCancel(ctx))
	vm, err := vc.FindVM(ctx, l.VC.VMMoref)
	require.NoError(t, err)
	var o mo.VirtualMachine
	require.NoError(t, vm.Properties(ctx, vm.Reference(), []string{"snapshot"}, &o))
	require.NotNil(t, o.Snapshot, "the backup's snapshot is missing")
	require.Len(t, o.Snapshot.RootSnapshotList, 1)
	snap := o.Snapshot.RootSnapshotList[0]
	require.True(t, strings.HasPrefix(snap.Name, workflows.SnapshotPrefix), snap.Name)
	require.True(t, snap.Quiesced, "snapshot %s is not quiesced", snap.Name)
}

// exportPID is the pid of the one qemu-nbd export the hub runs for the lab's backup.
func exportPID(t *testing.T, l *lab.Lab) int {
	t.Helper()
	pidFiles, err := filepath.Glob(filepath.Join(l.RunDir, "export-*.pid"))
	require.NoError(t, err)
	require.Len(t, pidFiles, 1, "one export runs")
	exp, err := qemu.Find(pidFiles[0])
	require.NoError(t, err)
	return exp.PID
}

// copyHeartbeat is the last heartbeat of the disk's pending copy; zero when there is none.
func copyHeartbeat(ctx context.Context, t *testing.T, l *lab.Lab, key int32) activities.CopyProgress {
	t.Helper()
	desc, err := l.Temporal.Client.DescribeWorkflow(ctx, workflows.BackupWorkflowID(l.VC.VMName), "")
	require.NoError(t, err)
	live, err := workflows.LiveCopies(desc.RawResponse.GetPendingActivities(), converter.GetDefaultDataConverter())
	require.NoError(t, err)
	return live[key]
}

// bytesBelow is how much of areas lies below offset.
func bytesBelow(areas []vsphere.Extent, offset int64) int64 {
	var n int64
	for _, a := range areas {
		n += max(0, min(a.Start+a.Length, offset)-a.Start)
	}
	return n
}

// fillDisk writes size bytes of random data from the start of the disk, so a copy of it
// takes long enough to be interrupted.
func fillDisk(t *testing.T, l *lab.Lab, key int32, size int64) {
	t.Helper()
	chunk := make([]byte, 4<<20)
	_, err := rand.Read(chunk)
	require.NoError(t, err)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		require.NoError(t, l.VC.WriteDisk(key, off, chunk))
	}
}

// waitForCopyProgress waits until the run's copy of the disk has heartbeated progress.
func waitForCopyProgress(ctx context.Context, t *testing.T, l *lab.Lab, workflowID string, key int32) {
	t.Helper()
	require.Eventually(t, func() bool {
		desc, err := l.Temporal.Client.DescribeWorkflow(ctx, workflowID, "")
		if err != nil {
			return false
		}
		live, err := workflows.LiveCopies(desc.RawResponse.GetPendingActivities(), converter.GetDefaultDataConverter())
		return err == nil && live[key].BytesDone > 0
	}, time.Minute, 20*time.Millisecond, "the copy never reported progress")
}
