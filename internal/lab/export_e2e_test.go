package lab_test

import (
	"context"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/workflows"
)

// TestHubExportKilledMidCopy SIGKILLs the running backup's qemu-nbd while its disk copy
// runs: the hub's reconcile (every minute) serves the target again on the same socket,
// the copy's retry reconnects through the same forward and resumes, and the backup
// completes with a point equal to the source.
func TestHubExportKilledMidCopy(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 1, DiskSize: 1 << 30})
	key := l.VC.Disks[0].Key
	fillDisk(t, l, key, 768<<20)
	source := snapshotSources(t, l)

	// A reconcile round (one minute) plus the copy's retry backoff (10 s, 20 s, 40 s, …).
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	in := workflows.BackupInput{VM: l.VC.VMName, Site: l.Site}
	run, err := l.Temporal.Client.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
	require.NoError(t, err)
	waitForCopyProgress(ctx, t, l, run.GetID(), key)

	pidFiles, err := filepath.Glob(filepath.Join(l.RunDir, "export-*.pid"))
	require.NoError(t, err)
	require.Len(t, pidFiles, 1, "one export for the one disk")
	exp, err := qemu.Find(pidFiles[0])
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(exp.PID, syscall.SIGKILL))

	var res workflows.BackupResult
	if err := run.Get(ctx, &res); err != nil {
		t.Fatalf("backup after its export was killed: %v\nhub log:\n%s\nsna log:\n%s", err, tail(l.WorkerLog("hub")), tail(l.WorkerLog("sna")))
	}
	require.Contains(t, l.WorkerLog("hub"), "restarted on the same socket")
	require.True(t, strings.Contains(l.WorkerLog("sna"), "is not running (qemu-nbd gone?)"),
		"the failed attempt named the dead export:\n%s", tail(l.WorkerLog("sna")))
	require.Greater(t, activityAttempts(ctx, t, l, run.GetID(), activities.CopyDiskName), int32(1), "the copy was retried")
	require.Len(t, res.Disks, 1)
	requireSameContent(ctx, t, source[key], res.Disks[0].Path)
	requireComplete(ctx, t, l, res.PointID)
	requireNothingLeaked(ctx, t, l, res)
}
