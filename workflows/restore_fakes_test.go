package workflows

import (
	"context"
	"fmt"
	"slices"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
)

// The restore activities of fakeActivities; calls are recorded as "<Name>", "<Name> <disk
// key>" (the VM's disk key for WriteDisk and ReadBackDisk) or "SetPower <state>".

const (
	testPointID  = "p1"
	newVMMoref   = "vm-77"
	newVMKeyBase = 100 // a new VM's disk key is the point's plus this
)

func testExportSocket(port int) string { return fmt.Sprintf("/run/diskferry/exports/%d.sock", port) }
func testForwardSocket(port int) string {
	return fmt.Sprintf("/run/diskferry-sna/forwards/%d.sock", port)
}

func testSource() activities.RestoreSource {
	vm := testVM()
	src := activities.RestoreSource{
		PointID: testPointID, HubID: testHubID, Site: testSite, VMName: vm.Name, VMMoref: vm.Moref,
		InstanceUUID: vm.InstanceUUID, Mode: activities.ModeIncremental,
		FinishedAt: time.Date(2026, 11, 26, 18, 49, 12, 0, time.UTC), Config: vm.Config,
	}
	for _, d := range vm.Disks {
		src.Disks = append(src.Disks, activities.SourceDisk{Key: d.Key, CapacityBytes: d.CapacityBytes, Path: testTargetPath(d.Key), Chain: 2})
	}
	return src
}

func (f *fakeActivities) ResolvePoint(ctx context.Context, in activities.ResolvePointInput) (activities.RestoreSource, error) {
	f.mu.Lock()
	f.resolves = append(f.resolves, in)
	change := f.changeSrc
	f.mu.Unlock()
	if err := f.call(ctx, activities.ResolvePointName); err != nil {
		return activities.RestoreSource{}, err
	}
	src := testSource()
	if change != nil {
		change(&src)
	}
	if len(in.Disks) > 0 {
		for _, key := range in.Disks {
			if !slices.ContainsFunc(src.Disks, func(d activities.SourceDisk) bool { return d.Key == key }) {
				return activities.RestoreSource{}, temporal.NewNonRetryableApplicationError(
					fmt.Sprintf("invalid restore input: disks: point %s has no disk %d", src.PointID, key), activities.ErrBadInput, nil)
			}
		}
		src.Disks = slices.DeleteFunc(src.Disks, func(d activities.SourceDisk) bool { return !slices.Contains(in.Disks, d.Key) })
	}
	f.mu.Lock()
	f.copies = len(src.Disks)
	f.mu.Unlock()
	return src, nil
}

func (f *fakeActivities) MarkRestoredInPlace(ctx context.Context, in activities.MarkRestoredInPlaceInput) error {
	f.mu.Lock()
	f.marks = append(f.marks, in)
	f.mu.Unlock()
	return f.call(ctx, activities.MarkRestoredInPlaceName)
}

func (f *fakeActivities) RestoreFile(ctx context.Context, in activities.RestoreFileInput) (activities.RestoreFileResult, error) {
	f.mu.Lock()
	f.files = append(f.files, in)
	f.mu.Unlock()
	key := keyOfPath(in.Path)
	if err := f.call(ctx, label(activities.RestoreFileName, key)); err != nil {
		return activities.RestoreFileResult{}, err
	}
	capacity := testVM().Disks[0].CapacityBytes
	if key == 2001 {
		capacity = testVM().Disks[1].CapacityBytes
	}
	return activities.RestoreFileResult{Output: in.Output, Format: in.Format, VirtualBytes: capacity, AllocatedBytes: capacity / 64}, nil
}

func (f *fakeActivities) CreateRestoreVM(ctx context.Context, in activities.CreateRestoreVMInput) (activities.RestoreVM, error) {
	f.mu.Lock()
	f.creates = append(f.creates, in)
	f.mu.Unlock()
	if err := f.call(ctx, activities.CreateRestoreVMName); err != nil {
		return activities.RestoreVM{}, err
	}
	vm := activities.RestoreVM{Moref: newVMMoref, Name: in.Spec.Name}
	for _, d := range in.Spec.Config.Disks {
		vm.Disks = append(vm.Disks, activities.RestoreDiskMap{
			PointKey: d.Key, VMKey: d.Key + newVMKeyBase, CapacityBytes: d.CapacityBytes,
			BackingFile: fmt.Sprintf("[ds1] %s/%s_%d.vmdk", in.Spec.Name, in.Spec.Name, d.Key),
		})
	}
	return vm, nil
}

func (f *fakeActivities) DestroyRestoreVM(ctx context.Context, in activities.DestroyRestoreVMInput) error {
	f.mu.Lock()
	f.destroys = append(f.destroys, in)
	f.mu.Unlock()
	return f.call(ctx, activities.DestroyRestoreVMName)
}

func (f *fakeActivities) SetPower(ctx context.Context, in activities.SetPowerInput) error {
	f.mu.Lock()
	f.powers = append(f.powers, in)
	f.mu.Unlock()
	return f.call(ctx, activities.SetPowerName+" "+in.State)
}

func (f *fakeActivities) WriteDisk(ctx context.Context, in activities.WriteDiskInput) (activities.WriteDiskResult, error) {
	f.mu.Lock()
	f.writes = append(f.writes, in)
	if f.activityIDs == nil {
		f.activityIDs = map[string]string{}
	}
	f.activityIDs[label(activities.WriteDiskName, in.DiskKey)] = activity.GetInfo(ctx).ActivityID
	f.mu.Unlock()
	if err := f.call(ctx, label(activities.WriteDiskName, in.DiskKey)); err != nil {
		// As for CopyDisk: a failure waits until its siblings started.
		f.waitForCopies()
		return activities.WriteDiskResult{}, err
	}
	read := in.CapacityBytes / 64
	return activities.WriteDiskResult{
		DiskKey: in.DiskKey, BytesRead: read, BytesWritten: read, BytesZeroed: read / 2,
		Duration: 2 * time.Second, BlockSize: 1 << 20, Digest: fmt.Sprintf("sha256:%d", in.DiskKey),
	}, nil
}

func (f *fakeActivities) ReadBackDisk(ctx context.Context, in activities.ReadBackDiskInput) (activities.ReadBackResult, error) {
	f.mu.Lock()
	f.readBacks = append(f.readBacks, in)
	f.mu.Unlock()
	if err := f.call(ctx, label(activities.ReadBackDiskName, in.DiskKey)); err != nil {
		return activities.ReadBackResult{}, err
	}
	return activities.ReadBackResult{DiskKey: in.DiskKey, BytesRead: gib, Duration: time.Second}, nil
}
