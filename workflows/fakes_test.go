package workflows

import (
	"context"
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"

	"github.com/diskferry/diskferry/activities"
)

const (
	gib       = int64(1) << 30
	testHubID = "hub1"
	testSite  = "lab"
)

// fakeActivities stands in for the hub and SNA workers under the contract's activity names.
// It records every call as "<Name>" or "<Name> <diskKey>" and can fail or block one call.
type fakeActivities struct {
	mu    sync.Mutex
	calls []string
	// inputs of the calls whose content tests check
	failPoints []activities.FailPointInput
	commits    []activities.CommitPointInput
	removed    []activities.Snapshot
	stops      []activities.StopExportInput

	planMode string           // full | incremental: what PlanBackup decides for every disk
	planNote string           // what PlanBackup notes for the job log
	fail     map[string]error // call label → error to return
	blockAt  string           // call label whose first call blocks until its context ends or release closes
	onBlock  func()           // runs when the blocking call started
	// blockHeartbeat is the details the blocking call heartbeats, if any.
	blockHeartbeat any
	release        chan struct{} // closed by the test's cleanup
	// cancelErr, if set, is what the blocking call returns when cancelled, instead of the
	// context's error (a real copy may fail otherwise while it is being cancelled).
	cancelErr error
	// refuseChangeID are the disks whose incremental CopyDisk vCenter refuses.
	refuseChangeID map[int32]bool
	copyInputs     []activities.CopyDiskInput
	// before runs once, at the first call of its label, before the call's own behaviour.
	before   map[string]func()
	prepares []activities.PrepareTargetInput
	plans    []activities.PlanBackupInput
	flaky    map[string]int // call label → attempts that fail retryably before success
	// exhaust is AllocatePorts' label → attempts that find too few free ports on the hub.
	exhaust map[string]int
	// portsAhead is how many jobs AllocatePorts says are ahead in the hub's line.
	portsAhead int
	attempts   map[string]int
	copies     int // disks PlanBackup planned: the CopyDisk calls a run starts together

	// restores and mounts
	exports     []activities.StartExportInput
	inspects    []activities.InspectVMInput
	changeVM    func(*activities.VM)            // changes what InspectVM reports
	changeSrc   func(*activities.RestoreSource) // changes what ResolvePoint reports
	resolves    []activities.ResolvePointInput
	marks       []activities.MarkRestoredInPlaceInput
	files       []activities.RestoreFileInput
	creates     []activities.CreateRestoreVMInput
	destroys    []activities.DestroyRestoreVMInput
	powers      []activities.SetPowerInput
	writes      []activities.WriteDiskInput
	readBacks   []activities.ReadBackDiskInput
	activityIDs map[string]string // activity type → ID of its last start (WriteDisk)

	// retention
	retentionPlan  activities.RetentionPlan // what PlanRetention returns (VM and input filled in)
	planRetentions []activities.PlanRetentionInput
	applies        []activities.ApplyRetentionInput
}

func newFakeActivities(planMode string) *fakeActivities {
	return &fakeActivities{
		planMode:      planMode,
		fail:          map[string]error{},
		release:       make(chan struct{}),
		flaky:         map[string]int{},
		exhaust:       map[string]int{},
		attempts:      map[string]int{},
		retentionPlan: testRetentionPlan(),
	}
}

func (f *fakeActivities) register(r worker.ActivityRegistry) {
	for name, fn := range map[string]any{
		activities.InspectVMName:      f.InspectVM,
		activities.PlanBackupName:     f.PlanBackup,
		activities.AllocatePortsName:  f.AllocatePorts,
		activities.ReleasePortsName:   f.ReleasePorts,
		activities.CommitPointName:    f.CommitPoint,
		activities.FailPointName:      f.FailPoint,
		activities.PrepareTargetName:  f.PrepareTarget,
		activities.DiscardTargetName:  f.DiscardTarget,
		activities.StartExportName:    f.StartExport,
		activities.StopExportName:     f.StopExport,
		activities.VerifyTargetName:   f.VerifyTarget,
		activities.EnsureTunnelName:   f.EnsureTunnel,
		activities.DropTunnelName:     f.DropTunnel,
		activities.CreateSnapshotName: f.CreateSnapshot,
		activities.RemoveSnapshotName: f.RemoveSnapshot,
		activities.CopyDiskName:       f.CopyDisk,
		activities.ReadChangeIDsName:  f.ReadChangeIDs,

		activities.ResolvePointName:        f.ResolvePoint,
		activities.MarkRestoredInPlaceName: f.MarkRestoredInPlace,
		activities.RestoreFileName:         f.RestoreFile,
		activities.CreateRestoreVMName:     f.CreateRestoreVM,
		activities.DestroyRestoreVMName:    f.DestroyRestoreVM,
		activities.SetPowerName:            f.SetPower,
		activities.WriteDiskName:           f.WriteDisk,
		activities.ReadBackDiskName:        f.ReadBackDisk,

		activities.PlanRetentionName:  f.PlanRetention,
		activities.ApplyRetentionName: f.ApplyRetention,
	} {
		r.RegisterActivityWithOptions(fn, activity.RegisterOptions{Name: name})
	}
}

// call records a call and applies the injected behaviour for it.
func (f *fakeActivities) call(ctx context.Context, label string) error {
	f.mu.Lock()
	f.calls = append(f.calls, label)
	err := f.fail[label]
	block := f.blockAt == label
	if block {
		f.blockAt = "" // only the first call blocks; a compensation may run the same step again
	}
	details := f.blockHeartbeat
	cancelErr := f.cancelErr
	hook := f.before[label]
	delete(f.before, label)
	f.attempts[label]++
	flaky := f.attempts[label] <= f.flaky[label]
	f.mu.Unlock()
	if hook != nil {
		hook()
	}
	if err != nil {
		return err
	}
	if flaky {
		return fmt.Errorf("transient failure of %s", label)
	}
	if block {
		if parallel(label) {
			// A cancel before the sibling copies started would cancel them unstarted and
			// make the recorded calls depend on scheduling.
			f.waitForCopies()
		}
		if f.onBlock != nil {
			f.onBlock()
		}
		// Heartbeats carry the cancellation to the activity on a real server.
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			if details != nil {
				activity.RecordHeartbeat(ctx, details)
			} else {
				activity.RecordHeartbeat(ctx)
			}
			select {
			case <-ctx.Done():
				if cancelErr != nil {
					return cancelErr
				}
				return ctx.Err()
			case <-f.release:
				return fmt.Errorf("%s released by test cleanup", label)
			case <-tick.C:
			}
		}
	}
	return nil
}

// parallel reports whether a call is one of the copies a run starts together (CopyDisk of a
// backup, WriteDisk of a restore).
func parallel(label string) bool {
	return strings.HasPrefix(label, activities.CopyDiskName+" ") || strings.HasPrefix(label, activities.WriteDiskName+" ")
}

// recorded returns the calls so far, with each run of parallel copies sorted.
func (f *fakeActivities) recorded() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := slices.Clone(f.calls)
	for i := 0; i < len(out); {
		j := i
		for j < len(out) && parallel(out[j]) {
			j++
		}
		if j > i {
			slices.Sort(out[i:j])
			i = j
			continue
		}
		i++
	}
	return out
}

func label(name string, key int32) string { return name + " " + strconv.Itoa(int(key)) }

func testVM() activities.VM {
	return activities.VM{
		InstanceUUID: "5012-aaaa", Moref: "vm-42", Name: "web01", PowerState: "poweredOn", CBTEnabled: true,
		Disks: []activities.Disk{
			{Key: 2000, Label: "Hard disk 1", CapacityBytes: 64 * gib, BackingFile: "[ds1] web01/web01.vmdk", Datastore: "ds1"},
			{Key: 2001, Label: "Hard disk 2", CapacityBytes: 8 * gib, BackingFile: "[ds1] web01/web01_1.vmdk", Datastore: "ds1"},
		},
		Config: &activities.VMConfig{
			NumCPUs: 2, CoresPerSocket: 1, MemoryMB: 4096, Firmware: "efi", GuestID: "debian12_64Guest",
			Disks: []activities.DiskLayout{
				{Key: 2000, CapacityBytes: 64 * gib, ControllerKey: 1000, ControllerType: "pvscsi", UnitNumber: 0},
				{Key: 2001, CapacityBytes: 8 * gib, ControllerKey: 1001, ControllerType: "lsilogic", BusNumber: 1, UnitNumber: 0},
			},
			NICs: []activities.NIC{{Key: 4000, AdapterType: "vmxnet3", Network: "VM Network", NetworkKind: "standard", AddressType: "generated"}},
		},
	}
}

func testPort(key int32) int { return 10000 + int(key) }

func testTargetPath(key int32) string { return fmt.Sprintf("/srv/diskferry/web01/p1/%d.qcow2", key) }

func keyOfPath(p string) int32 {
	key, _ := strconv.Atoi(strings.TrimSuffix(path.Base(p), ".qcow2"))
	return int32(key)
}

func (f *fakeActivities) InspectVM(ctx context.Context, in activities.InspectVMInput) (activities.VM, error) {
	f.mu.Lock()
	f.inspects = append(f.inspects, in)
	change := f.changeVM
	f.mu.Unlock()
	if err := f.call(ctx, activities.InspectVMName); err != nil {
		return activities.VM{}, err
	}
	vm := testVM()
	if change != nil {
		change(&vm)
	}
	return vm, nil
}

func (f *fakeActivities) PlanBackup(ctx context.Context, in activities.PlanBackupInput) (activities.Plan, error) {
	if err := f.call(ctx, activities.PlanBackupName); err != nil {
		return activities.Plan{}, err
	}
	f.mu.Lock()
	f.plans = append(f.plans, in)
	f.mu.Unlock()
	plan := activities.Plan{PointID: "p1", HubID: testHubID, Mode: f.planMode, Note: f.planNote}
	for _, d := range in.VM.Disks {
		if len(in.DiskKeys) > 0 && !slices.Contains(in.DiskKeys, d.Key) {
			continue
		}
		dp := activities.DiskPlan{Key: d.Key, CapacityBytes: d.CapacityBytes, Mode: f.planMode}
		if f.planMode == activities.ModeIncremental {
			dp.ParentPath = fmt.Sprintf("/srv/diskferry/web01/p0/%d.qcow2", d.Key)
			dp.PrevChangeID = fmt.Sprintf("52 aa/%d", d.Key)
		}
		plan.Disks = append(plan.Disks, dp)
	}
	f.mu.Lock()
	f.copies = len(plan.Disks)
	f.mu.Unlock()
	return plan, nil
}

func (f *fakeActivities) AllocatePorts(ctx context.Context, in activities.AllocatePortsInput) ([]int, error) {
	l := activities.AllocatePortsName
	if err := f.call(ctx, l); err != nil {
		return nil, err
	}
	f.mu.Lock()
	exhausted := f.attempts[l] <= f.exhaust[l]
	details := testPortsExhausted(in.HubID)
	details.Ahead = f.portsAhead
	f.mu.Unlock()
	if exhausted {
		// As the hub says it (activities/hub AllocatePorts): retryable, with the hub's range.
		return nil, temporal.NewApplicationErrorWithOptions("no free export port on hub "+in.HubID, activities.ErrPortsExhausted,
			temporal.ApplicationErrorOptions{Details: []any{details}})
	}
	ports := make([]int, len(in.DiskKeys))
	for i, key := range in.DiskKeys {
		ports[i] = testPort(key)
	}
	return ports, nil
}

func testPortsExhausted(hubID string) activities.PortsExhausted {
	return activities.PortsExhausted{HubID: hubID, Ports: 4, First: 20100, Last: 20103}
}

func (f *fakeActivities) ReleasePorts(ctx context.Context, in activities.ReleasePortsInput) error {
	return f.call(ctx, activities.ReleasePortsName)
}

func (f *fakeActivities) CommitPoint(ctx context.Context, in activities.CommitPointInput) error {
	if err := f.call(ctx, activities.CommitPointName); err != nil {
		return err
	}
	f.mu.Lock()
	f.commits = append(f.commits, in)
	f.mu.Unlock()
	return nil
}

func (f *fakeActivities) FailPoint(ctx context.Context, in activities.FailPointInput) error {
	f.mu.Lock()
	f.failPoints = append(f.failPoints, in)
	f.mu.Unlock()
	return f.call(ctx, activities.FailPointName)
}

func (f *fakeActivities) PrepareTarget(ctx context.Context, in activities.PrepareTargetInput) (activities.Target, error) {
	f.mu.Lock()
	f.prepares = append(f.prepares, in)
	f.mu.Unlock()
	if err := f.call(ctx, label(activities.PrepareTargetName, in.Disk.Key)); err != nil {
		return activities.Target{}, err
	}
	return activities.Target{DiskKey: in.Disk.Key, Path: testTargetPath(in.Disk.Key)}, nil
}

func (f *fakeActivities) DiscardTarget(ctx context.Context, in activities.DiscardTargetInput) error {
	return f.call(ctx, label(activities.DiscardTargetName, in.DiskKey))
}

func (f *fakeActivities) StartExport(ctx context.Context, in activities.StartExportInput) (activities.Export, error) {
	if err := f.call(ctx, label(activities.StartExportName, in.DiskKey)); err != nil {
		return activities.Export{}, err
	}
	f.mu.Lock()
	f.exports = append(f.exports, in)
	f.mu.Unlock()
	return activities.Export{DiskKey: in.DiskKey, Port: in.Port, Name: fmt.Sprintf("disk-%d", in.DiskKey), PID: 4242, Path: in.Path,
		Socket: testExportSocket(in.Port)}, nil
}

func (f *fakeActivities) StopExport(ctx context.Context, in activities.StopExportInput) error {
	f.mu.Lock()
	f.stops = append(f.stops, in)
	f.mu.Unlock()
	return f.call(ctx, label(activities.StopExportName, keyOfPath(in.Path)))
}

func (f *fakeActivities) VerifyTarget(ctx context.Context, in activities.VerifyTargetInput) (activities.Verification, error) {
	if err := f.call(ctx, label(activities.VerifyTargetName, keyOfPath(in.Path))); err != nil {
		return activities.Verification{}, err
	}
	return activities.Verification{Path: in.Path, AllocatedBytes: gib, VirtualBytes: 64 * gib}, nil
}

func (f *fakeActivities) EnsureTunnel(ctx context.Context, in activities.EnsureTunnelInput) (activities.Forwards, error) {
	if err := f.call(ctx, activities.EnsureTunnelName); err != nil {
		return activities.Forwards{}, err
	}
	fw := activities.Forwards{Sockets: map[int]string{}}
	for _, port := range in.Ports {
		fw.Sockets[port] = testForwardSocket(port)
	}
	return fw, nil
}

func (f *fakeActivities) DropTunnel(ctx context.Context, in activities.EnsureTunnelInput) error {
	return f.call(ctx, activities.DropTunnelName)
}

func (f *fakeActivities) CreateSnapshot(ctx context.Context, in activities.CreateSnapshotInput) (activities.Snapshot, error) {
	if err := f.call(ctx, activities.CreateSnapshotName); err != nil {
		return activities.Snapshot{}, err
	}
	return activities.Snapshot{VMMoref: in.VMMoref, Moref: "snapshot-7", Name: in.Name}, nil
}

func (f *fakeActivities) RemoveSnapshot(ctx context.Context, in activities.Snapshot) error {
	f.mu.Lock()
	f.removed = append(f.removed, in)
	f.mu.Unlock()
	return f.call(ctx, activities.RemoveSnapshotName)
}

func (f *fakeActivities) CopyDisk(ctx context.Context, in activities.CopyDiskInput) (activities.CopyDiskResult, error) {
	f.mu.Lock()
	f.copyInputs = append(f.copyInputs, in)
	refuse := f.refuseChangeID[in.DiskKey] && in.Mode == activities.ModeIncremental
	f.mu.Unlock()
	if refuse {
		_ = f.call(ctx, label(activities.CopyDiskName, in.DiskKey))
		f.waitForCopies()
		return activities.CopyDiskResult{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("copy disk %d: changeId %q not accepted", in.DiskKey, in.PrevChangeID), activities.ErrChangeIDRefused, nil)
	}
	if err := f.call(ctx, label(activities.CopyDiskName, in.DiskKey)); err != nil {
		// The copies run in parallel: a failure waits until its siblings started, so the
		// recorded calls do not depend on how the test environment schedules them.
		f.waitForCopies()
		return activities.CopyDiskResult{}, err
	}
	read := in.CapacityBytes / 64
	if in.Mode == activities.ModeIncremental {
		read = in.CapacityBytes / 1024
	}
	return activities.CopyDiskResult{
		DiskKey: in.DiskKey, BytesRead: read, BytesWritten: read, BytesZeroed: read / 2,
		Duration: 2 * time.Second, BlockSize: 1 << 20, Digest: fmt.Sprintf("sha256:%d", in.DiskKey),
	}, nil
}

// waitForCopies waits (up to 5 s) until every planned copy (CopyDisk, WriteDisk) has been called.
func (f *fakeActivities) waitForCopies() {
	for range 500 {
		f.mu.Lock()
		started := 0
		for _, c := range f.calls {
			if parallel(c) {
				started++
			}
		}
		want := f.copies
		f.mu.Unlock()
		if started >= want {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (f *fakeActivities) ReadChangeIDs(ctx context.Context, in activities.ReadChangeIDsInput) (map[int32]string, error) {
	if err := f.call(ctx, activities.ReadChangeIDsName); err != nil {
		return nil, err
	}
	return map[int32]string{2000: "52 bb/2000", 2001: "52 bb/2001"}, nil
}

func injected(at string) error {
	return temporal.NewNonRetryableApplicationError("injected failure at "+at, "Injected", nil)
}
