package lab_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vmware/govmomi/find"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/vsphere"
	"github.com/diskferry/diskferry/workflows"
)

// TestRestoreEndToEnd backs up a 2-disk VM three times (full and two incrementals, data
// changing in between) and gives every point back through the real workers: each point
// into a new VM (disks read back through the datastore equal the source at that point's
// snapshot, the VM's shape equals the source's), one point to raw, qcow2 and vmdk files,
// the middle point in place (refused while the VM runs; the next backup is full), and a
// mount read over NBD that survives a hub worker restart and ends on unmount, on its TTL and
// on cancel. Nothing is left.
func TestRestoreEndToEnd(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 2, DiskSize: 64 << 20})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	vc := connectVC(ctx, t, l)

	var points []workflows.BackupResult
	var sources []map[int32]string
	for i := range 3 {
		if i > 0 {
			for j, d := range l.VC.Disks {
				for _, off := range []int64{int64(i) << 20, int64(20+10*i+j)<<20 + 4096} {
					_, err := l.VC.WriteRandom(d.Key, off, 384<<10)
					require.NoError(t, err)
				}
			}
		}
		sources = append(sources, snapshotSources(t, l))
		points = append(points, runBackup(ctx, t, l, workflows.BackupInput{VM: l.VC.VMName, Site: l.Site}))
	}
	require.Equal(t, activities.ModeIncremental, points[2].Mode)
	source, err := vc.FindVM(ctx, l.VC.VMMoref)
	require.NoError(t, err)
	sourceInfo, err := vc.Inspect(ctx, source)
	require.NoError(t, err)

	t.Run("new-vm", func(t *testing.T) {
		for i, p := range points {
			res := runRestore(ctx, t, l, workflows.RestoreInput{Point: p.PointID})
			require.Equal(t, activities.DestinationNewVM, res.Destination)
			require.Equal(t, fmt.Sprintf("%s-restore-%s", l.VC.VMName, p.PointID), res.VMName)
			require.Len(t, res.Disks, 2)
			info, flats, err := l.VMDisks(ctx, res.VMMoref, t.TempDir())
			require.NoError(t, err)
			require.Equal(t, "poweredOff", info.PowerState, "a restored VM is not powered on unless asked")
			requireSameShape(t, sourceInfo.Config, info.Config)
			for _, d := range res.Disks {
				requireSameRaw(ctx, t, sources[i][d.PointKey], flats[d.VMKey])
			}
		}
	})

	t.Run("file", func(t *testing.T) {
		dir := t.TempDir()
		key := l.VC.Disks[1].Key
		for _, format := range []string{activities.FormatRaw, activities.FormatQCOW2, activities.FormatVMDK} {
			out := filepath.Join(dir, "disk."+format)
			res := runRestore(ctx, t, l, workflows.RestoreInput{
				Point: points[1].PointID, Destination: activities.DestinationFile, Disks: []int32{key}, Format: format, Output: out})
			require.Len(t, res.Disks, 1)
			require.Equal(t, out, res.Disks[0].Output)
			cmp, err := qemu.Compare(ctx, qemu.Raw(sources[1][key]), qemu.Image{Path: out, Format: format})
			require.NoError(t, err)
			require.True(t, cmp.Equal, "%s restore differs: %s", format, cmp.Message)
			info, err := qemu.Info(ctx, out)
			require.NoError(t, err)
			require.Empty(t, info.BackingFile, "%s restore is standalone", format)
		}
		// The same output again is refused; the file stays.
		out := filepath.Join(dir, "disk.raw")
		before, err := os.Stat(out)
		require.NoError(t, err)
		err = restoreError(ctx, t, l, workflows.RestoreInput{
			Point: points[1].PointID, Destination: activities.DestinationFile, Disks: []int32{key}, Format: "raw", Output: out})
		requireErrorType(t, err, activities.ErrBadInput, "output")
		after, err := os.Stat(out)
		require.NoError(t, err)
		require.Equal(t, before.ModTime(), after.ModTime(), "the existing output was not touched")
	})

	t.Run("mount", func(t *testing.T) {
		for _, end := range []string{"unmount", "ttl", "cancel"} {
			in := workflows.MountInput{Point: points[2].PointID}
			if end == "ttl" {
				in.TTLSeconds = 3
			}
			run, info := startMount(ctx, t, l, in)
			require.Len(t, info.Disks, 2)
			for _, d := range info.Disks {
				cmp, err := qemu.Compare(ctx, qemu.Raw(sources[2][d.Key]), qemu.Raw(d.URI))
				require.NoError(t, err)
				require.True(t, cmp.Equal, "mounted disk %d differs: %s", d.Key, cmp.Message)
			}
			if end == "unmount" {
				// A hub worker restart keeps the mount: its reconcile adopts the read-only exports.
				reconciled := strings.Count(l.WorkerLog("hub"), "exports reconciled")
				l.KillWorker("hub")
				l.StartWorker("hub")
				require.Eventually(t, func() bool {
					return strings.Count(l.WorkerLog("hub"), "exports reconciled") > reconciled
				}, time.Minute, 50*time.Millisecond, "the restarted hub never reconciled its exports")
				for _, d := range info.Disks {
					cmp, err := qemu.Compare(ctx, qemu.Raw(sources[2][d.Key]), qemu.Raw(d.URI))
					require.NoError(t, err)
					require.True(t, cmp.Equal, "mounted disk %d after the hub restart: %s", d.Key, cmp.Message)
				}
			}
			switch end {
			case "unmount":
				require.NoError(t, l.Temporal.Client.SignalWorkflow(ctx, run.GetID(), "", workflows.UnmountSignalName, nil))
			case "cancel":
				require.NoError(t, l.Temporal.Client.CancelWorkflow(ctx, run.GetID(), ""))
			}
			var final workflows.MountInfo
			err := run.Get(ctx, &final)
			if end == "cancel" {
				var canceled *temporal.CanceledError
				require.ErrorAs(t, err, &canceled)
			} else {
				require.NoError(t, err)
				require.Equal(t, end, final.Ended)
			}
			requireNoExports(ctx, t, l)
		}
	})

	t.Run("in-place", func(t *testing.T) {
		in := workflows.RestoreInput{Point: points[1].PointID, Destination: activities.DestinationInPlace}
		err := restoreError(ctx, t, l, in)
		requireErrorType(t, err, activities.ErrPoweredOn, "powered on")
		for _, d := range l.VC.Disks {
			cmp, err := qemu.Compare(ctx, qemu.Raw(sources[2][d.Key]), qemu.Raw(d.FlatPath))
			require.NoError(t, err)
			require.True(t, cmp.Equal, "a refused in-place restore changed disk %d", d.Key)
		}

		in.PowerOff = true
		res := runRestore(ctx, t, l, in)
		require.Equal(t, l.VC.VMMoref, res.VMMoref)
		for _, d := range l.VC.Disks {
			requireSameRaw(ctx, t, sources[1][d.Key], d.FlatPath)
		}
		info, err := vc.Inspect(ctx, source)
		require.NoError(t, err)
		require.Equal(t, "poweredOff", info.PowerState, "an in-place restore does not power the VM on unless asked")

		next := runBackup(ctx, t, l, workflows.BackupInput{VM: l.VC.VMName, Site: l.Site})
		require.Equal(t, activities.ModeFull, next.Mode, "the backup after an in-place restore is full")
		for _, d := range next.Disks {
			require.Contains(t, d.Reason, "restored in place", "disk %d", d.Key)
			requireSameContent(ctx, t, sources[1][d.Key], d.Path)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		failed := failedPoint(ctx, t, l)
		vmsBefore := vmNames(ctx, t, vc)
		for _, c := range []struct {
			name    string
			in      workflows.RestoreInput
			errType string
			field   string
		}{
			{"unknown point", workflows.RestoreInput{Point: "20260101T000000.000Z-00000000"}, activities.ErrNotFound, "point"},
			{"failed point", workflows.RestoreInput{Point: failed}, activities.ErrBadInput, "point"},
			{"disk the point lacks", workflows.RestoreInput{Point: points[0].PointID, Disks: []int32{4711}}, activities.ErrBadInput, "disks"},
			{"name taken", workflows.RestoreInput{Point: points[0].PointID, Name: l.VC.VMName}, activities.ErrBadInput, "name"},
			{"no format", workflows.RestoreInput{Point: points[0].PointID, Destination: activities.DestinationFile, Output: "/tmp/x.raw"}, activities.ErrBadInput, "format"},
		} {
			err := restoreError(ctx, t, l, c.in)
			requireErrorType(t, err, c.errType, c.field)
		}
		require.Equal(t, vmsBefore, vmNames(ctx, t, vc), "a refused restore created or removed a VM")
		requireNoExports(ctx, t, l)
	})
}

// TestRestoreSurvivesSNAKillAndCancelLeavesNothing restores a 1 GiB disk into new VMs twice:
// the first restore's SNA is killed (SIGKILL) mid-write and started again, and the restore
// completes identical after a retried write; the second is cancelled mid-write, and its new
// VM, exports, leases and forwards are gone.
func TestRestoreSurvivesSNAKillAndCancelLeavesNothing(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 1, DiskSize: 1 << 30})
	key := l.VC.Disks[0].Key
	fillDisk(t, l, key, 768<<20)
	source := snapshotSources(t, l)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	point := runBackup(ctx, t, l, workflows.BackupInput{VM: l.VC.VMName, Site: l.Site})
	vc := connectVC(ctx, t, l)

	in := workflows.RestoreInput{Point: point.PointID, Name: "killed-restore"}
	run := startRestore(ctx, t, l, in)
	waitForCopyProgress(ctx, t, l, run.GetID(), key)
	l.KillWorker("sna")
	l.StartWorker("sna")
	var res workflows.RestoreResult
	if err := run.Get(ctx, &res); err != nil {
		t.Fatalf("restore after the SNA restart: %v\nhub log:\n%s\nsna log:\n%s", err, tail(l.WorkerLog("hub")), tail(l.WorkerLog("sna")))
	}
	require.Greater(t, activityAttempts(ctx, t, l, run.GetID(), activities.WriteDiskName), int32(1), "the write was retried")
	_, flats, err := l.VMDisks(ctx, res.VMMoref, t.TempDir())
	require.NoError(t, err)
	requireSameRaw(ctx, t, source[key], flats[res.Disks[0].VMKey])
	requireNoExports(ctx, t, l)

	in = workflows.RestoreInput{Point: point.PointID, Name: "cancelled-restore"}
	run = startRestore(ctx, t, l, in)
	waitForCopyProgress(ctx, t, l, run.GetID(), key)
	require.NoError(t, l.Temporal.Client.CancelWorkflow(ctx, run.GetID(), ""))
	err = run.Get(ctx, nil)
	var canceled *temporal.CanceledError
	require.ErrorAs(t, err, &canceled, "the restore ends cancelled")
	_, err = vc.FindVM(ctx, "cancelled-restore")
	require.ErrorIs(t, err, vsphere.ErrNotFound, "the cancelled restore's VM was removed")
	requireNoExports(ctx, t, l)
}

func connectVC(ctx context.Context, t *testing.T, l *lab.Lab) *vsphere.Client {
	t.Helper()
	vc, err := vsphere.Connect(ctx, vsphere.Config{URL: l.VC.URL, User: l.VC.User, Password: l.VC.Password, Thumbprint: l.VC.Thumbprint})
	require.NoError(t, err)
	t.Cleanup(func() { _ = vc.Close(context.Background()) })
	return vc
}

func restoreTarget(in workflows.RestoreInput) (string, string) {
	switch in.Destination {
	case activities.DestinationFile:
		return in.Destination, in.Output
	case activities.DestinationInPlace:
		return in.Destination, in.Point + in.VM
	}
	return activities.DestinationNewVM, in.Point + in.VM + "-" + in.Name
}

func startRestore(ctx context.Context, t *testing.T, l *lab.Lab, in workflows.RestoreInput) client.WorkflowRun {
	t.Helper()
	dest, target := restoreTarget(in)
	run, err := l.Temporal.Client.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID: workflows.RestoreWorkflowID(dest, target), TaskQueue: activities.HubQueue,
		WorkflowIDConflictPolicy: enumspb.WORKFLOW_ID_CONFLICT_POLICY_FAIL,
	}, workflows.RestoreWorkflowName, in)
	require.NoError(t, err)
	return run
}

func runRestore(ctx context.Context, t *testing.T, l *lab.Lab, in workflows.RestoreInput) workflows.RestoreResult {
	t.Helper()
	run := startRestore(ctx, t, l, in)
	var res workflows.RestoreResult
	if err := run.Get(ctx, &res); err != nil {
		t.Fatalf("restore %s: %v\nhub log:\n%s\nsna log:\n%s", run.GetID(), err, tail(l.WorkerLog("hub")), tail(l.WorkerLog("sna")))
	}
	t.Logf("restore %s: point %s to %s in %s", run.GetID(), res.PointID, res.Destination, res.Duration)
	return res
}

func restoreError(ctx context.Context, t *testing.T, l *lab.Lab, in workflows.RestoreInput) error {
	t.Helper()
	err := startRestore(ctx, t, l, in).Get(ctx, nil)
	require.Error(t, err, "restore %+v succeeded", in)
	return err
}

// requireErrorType checks a run failed with the application error type and that its
// message names what was wrong.
func requireErrorType(t *testing.T, err error, errType, mentions string) {
	t.Helper()
	var appErr *temporal.ApplicationError
	require.True(t, errors.As(err, &appErr), "not an application error: %v", err)
	require.Equal(t, errType, appErr.Type(), "error: %v", err)
	require.Contains(t, err.Error(), mentions)
}

func startMount(ctx context.Context, t *testing.T, l *lab.Lab, in workflows.MountInput) (client.WorkflowRun, workflows.MountInfo) {
	t.Helper()
	run, err := l.Temporal.Client.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID: workflows.MountWorkflowID(in.Point), TaskQueue: activities.HubQueue,
	}, workflows.MountWorkflowName, in)
	require.NoError(t, err)
	var info workflows.MountInfo
	require.Eventually(t, func() bool {
		v, err := l.Temporal.Client.QueryWorkflow(ctx, run.GetID(), run.GetRunID(), workflows.MountQueryName)
		if err != nil || v.Get(&info) != nil {
			return false
		}
		require.NotEqual(t, workflows.MountFailed, info.Status, "mount failed: %s", info.Error)
		return info.Status == workflows.MountMounted
	}, time.Minute, 50*time.Millisecond, "the mount never served")
	return run, info
}

// requireNoExports checks no export, lease, export row or forward is left.
func requireNoExports(ctx context.Context, t *testing.T, l *lab.Lab) {
	t.Helper()
	pidFiles, err := filepath.Glob(filepath.Join(l.RunDir, "*.pid"))
	require.NoError(t, err)
	for _, pf := range pidFiles {
		_, err := qemu.Find(pf)
		require.ErrorIs(t, err, qemu.ErrNotRunning, "export %s still running", pf)
	}
	require.Empty(t, l.DataPlaneProcesses(), "data-plane processes left running")
	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	defer store.Close()
	requireNoLeases(ctx, t, l, store)
}

// requireSameShape checks a restored VM has the source's shape (keys and MACs are new).
func requireSameShape(t *testing.T, want, got vsphere.VMConfig) {
	t.Helper()
	require.Equal(t, want.NumCPUs, got.NumCPUs)
	require.Equal(t, want.CoresPerSocket, got.CoresPerSocket)
	require.Equal(t, want.MemoryMB, got.MemoryMB)
	require.Equal(t, want.Firmware, got.Firmware)
	require.Equal(t, want.GuestID, got.GuestID)
	require.Len(t, got.Disks, len(want.Disks))
	for i := range want.Disks {
		w, g := want.Disks[i], got.Disks[i]
		require.Equal(t, w.CapacityBytes, g.CapacityBytes, "disk %d", i)
		require.Equal(t, w.ControllerType, g.ControllerType, "disk %d", i)
		require.Equal(t, w.BusNumber, g.BusNumber, "disk %d", i)
		require.Equal(t, w.UnitNumber, g.UnitNumber, "disk %d", i)
	}
	require.Len(t, got.NICs, len(want.NICs))
	require.NotEmpty(t, want.NICs, "the lab VM has a NIC to recreate")
	for i := range want.NICs {
		require.Equal(t, want.NICs[i].AdapterType, got.NICs[i].AdapterType, "nic %d", i)
		require.Equal(t, want.NICs[i].Network, got.NICs[i].Network, "nic %d", i)
	}
}

func requireSameRaw(ctx context.Context, t *testing.T, want, got string) {
	t.Helper()
	require.NotEmpty(t, got, "no restored disk to compare with %s", want)
	cmp, err := qemu.Compare(ctx, qemu.Raw(want), qemu.Raw(got))
	require.NoError(t, err)
	require.True(t, cmp.Equal, "%s differs from %s: %s", got, want, cmp.Message)
	a, err := os.Stat(want)
	require.NoError(t, err)
	b, err := os.Stat(got)
	require.NoError(t, err)
	require.Equal(t, a.Size(), b.Size(), "restored disk size")
}

// failedPoint makes a failed point of the lab VM in the catalog, as a failed backup leaves.
func failedPoint(ctx context.Context, t *testing.T, l *lab.Lab) string {
	t.Helper()
	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	defer store.Close()
	list, err := store.FindPoints(ctx, l.VC.VMName)
	require.NoError(t, err)
	require.NotEmpty(t, list)
	p, err := store.OpenPoint(ctx, catalog.OpenPointRequest{
		WorkflowID: "backup-failed-for-test", RunID: "run-1", Site: l.Site, Hub: l.HubID,
		VMID: list[0].VMID, Mode: catalog.ModeFull,
	})
	require.NoError(t, err)
	require.NoError(t, store.FailPoint(ctx, p.ID, "failed for the test"))
	return p.ID
}

func vmNames(ctx context.Context, t *testing.T, vc *vsphere.Client) []string {
	t.Helper()
	vms, err := find.NewFinder(vc.Vim(), false).VirtualMachineList(ctx, "/...")
	require.NoError(t, err)
	var names []string
	for _, vm := range vms {
		names = append(names, vm.Name())
	}
	return names
}

// activityAttempts is the highest attempt of a run's activities of one type.
func activityAttempts(ctx context.Context, t *testing.T, l *lab.Lab, workflowID, activityType string) int32 {
	t.Helper()
	scheduled := map[int64]bool{}
	var most int32
	it := l.Temporal.Client.GetWorkflowHistory(ctx, workflowID, "", false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
	for it.HasNext() {
		ev, err := it.Next()
		require.NoError(t, err)
		if a := ev.GetActivityTaskScheduledEventAttributes(); a != nil && a.GetActivityType().GetName() == activityType {
			scheduled[ev.GetEventId()] = true
		}
		if a := ev.GetActivityTaskStartedEventAttributes(); a != nil && scheduled[a.GetScheduledEventId()] {
			most = max(most, a.GetAttempt())
		}
	}
	return most
}

// TestOddSizedDisksRoundTrip backs up and restores a VM whose disks differ in size and are
// sized in KiB only (vSphere sizes disks in KB): not multiples of 4 KiB, 64 KiB or 1 MiB, so
// the copy's last request, the qcow2 target's last cluster, CBT's last area and every
// restore's last write are partial. A full and an incremental that rewrites each disk's last
// 1.5 KiB both equal their sources; the incremental point restores to a file in each format
// and into a new VM, the full point in place, and each result equals its source byte for byte.
func TestOddSizedDisksRoundTrip(t *testing.T) {
	sizes := []int64{5<<20 + 3<<10, 1<<20 + 1<<10, 9<<20 + 63<<10}
	l := startLab(t, lab.Options{DiskSizes: sizes})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	require.Len(t, l.VC.Disks, len(sizes))
	size := map[int32]int64{}
	for i, d := range l.VC.Disks {
		require.Equal(t, sizes[i], d.CapacityBytes)
		size[d.Key] = d.CapacityBytes
	}

	atFull := snapshotSources(t, l)
	full := runBackup(ctx, t, l, workflows.BackupInput{VM: l.VC.VMName, Site: l.Site})
	for _, d := range full.Disks {
		requireSameContent(ctx, t, atFull[d.Key], d.Path)
	}
	for _, d := range l.VC.Disks {
		for _, w := range []struct{ off, n int64 }{{d.CapacityBytes - 1536, 1536}, {d.CapacityBytes / 3 &^ 511, 777 * 512}} {
			_, err := l.VC.WriteRandom(d.Key, w.off, w.n)
			require.NoError(t, err)
		}
	}
	atIncr := snapshotSources(t, l)
	incr := runBackup(ctx, t, l, workflows.BackupInput{VM: l.VC.VMName, Site: l.Site})
	require.Equal(t, activities.ModeIncremental, incr.Mode)
	require.Len(t, incr.Disks, len(sizes))
	for _, d := range incr.Disks {
		info, err := qemu.Info(ctx, d.Path)
		require.NoError(t, err)
		require.Equal(t, size[d.Key], info.VirtualSize, "disk %d point size", d.Key)
		requireSameContent(ctx, t, atIncr[d.Key], d.Path)
	}

	dir := t.TempDir()
	key := l.VC.Disks[1].Key
	for _, format := range []string{activities.FormatRaw, activities.FormatQCOW2, activities.FormatVMDK} {
		out := filepath.Join(dir, "disk."+format)
		runRestore(ctx, t, l, workflows.RestoreInput{
			Point: incr.PointID, Destination: activities.DestinationFile, Disks: []int32{key}, Format: format, Output: out})
		cmp, err := qemu.Compare(ctx, qemu.Raw(atIncr[key]), qemu.Image{Path: out, Format: format})
		require.NoError(t, err)
		require.True(t, cmp.Equal, "%s restore differs: %s", format, cmp.Message)
		info, err := qemu.Info(ctx, out)
		require.NoError(t, err)
		require.Equal(t, size[key], info.VirtualSize, "%s restore size", format)
	}
	newVM := runRestore(ctx, t, l, workflows.RestoreInput{Point: incr.PointID})
	_, flats, err := l.VMDisks(ctx, newVM.VMMoref, t.TempDir())
	require.NoError(t, err)
	require.Len(t, newVM.Disks, len(sizes))
	for _, d := range newVM.Disks {
		requireSameRaw(ctx, t, atIncr[d.PointKey], flats[d.VMKey])
	}
	runRestore(ctx, t, l, workflows.RestoreInput{Point: full.PointID, Destination: activities.DestinationInPlace, PowerOff: true})
	for _, d := range l.VC.Disks {
		requireSameRaw(ctx, t, atFull[d.Key], d.FlatPath)
	}
	requireNoExports(ctx, t, l)
}
