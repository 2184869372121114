package lab_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/workflows"
)

// vCenter refuses the previous changeId although the disk's CBT identity looks unchanged (so
// the plan is incremental): the run copies that disk in full into a fresh target instead of
// failing, warns, and the catalog records why; the next run is incremental on it again.
func TestBackupChangeIDRefusedFallsBackToFull(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 1, DiskSize: 64 << 20})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	key := l.VC.Disks[0].Key
	in := workflows.BackupInput{VM: l.VC.VMName, Site: l.Site}
	first := runBackup(ctx, t, l, in)

	_, err := l.VC.WriteRandom(key, 3<<20, 512<<10)
	require.NoError(t, err)
	l.VC.FailNext("QueryChangedDiskAreas", &types.InvalidArgument{InvalidProperty: "changeId"})
	atRefused := snapshotSources(t, l)
	refused := runBackup(ctx, t, l, in)
	require.Equal(t, activities.ModeFull, refused.Mode)
	require.Len(t, refused.Disks, 1)
	d := refused.Disks[0]
	require.Equal(t, activities.ModeFull, d.Mode)
	require.Empty(t, d.ParentPath)
	require.Contains(t, d.Reason, "vCenter refused the previous changeId")
	require.Len(t, refused.Warnings, 1)
	require.Contains(t, refused.Warnings[0], "copying the disk in full")
	requireSameContent(ctx, t, atRefused[key], d.Path)
	points := requireComplete(ctx, t, l, refused.PointID)
	require.Equal(t, "full", points[0].Mode)
	require.Empty(t, points[0].ParentID, "the point depends on no other")
	require.Contains(t, points[0].Disks[0].Reason, "vCenter refused the previous changeId")

	_, err = l.VC.WriteRandom(key, 9<<20, 256<<10)
	require.NoError(t, err)
	atNext := snapshotSources(t, l)
	next := runBackup(ctx, t, l, in)
	require.Equal(t, activities.ModeIncremental, next.Mode, "the next run builds on the full copy")
	require.Equal(t, d.Path, next.Disks[0].ParentPath)
	requireSameContent(ctx, t, atNext[key], next.Disks[0].Path)
	requireNothingLeaked(ctx, t, l, first, refused, next)
}
