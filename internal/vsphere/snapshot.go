package vsphere

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// Snapshot is one snapshot of a VM.
type Snapshot struct {
	VMMoref string
	Moref   string
	Name    string
	Created time.Time
}

var snapshotMorefPattern = regexp.MustCompile(`^snapshot-\d+$`)

// snapshotRef accepts "snapshot-12" or "VirtualMachineSnapshot:snapshot-12".
func snapshotRef(s string) (types.ManagedObjectReference, error) {
	ref, ok := parseMoref(strings.TrimSpace(s), "VirtualMachineSnapshot", snapshotMorefPattern)
	if !ok {
		return types.ManagedObjectReference{}, fmt.Errorf("%q is not a snapshot moref", s)
	}
	return ref, nil
}

// snapshotTaskNames are the VM tasks a backup snapshot must not run beside: they
// change the disk chain (Forklift learnt to guard against these).
var snapshotTaskNames = map[string]bool{
	"createsnapshot":          true,
	"createsnapshotex":        true,
	"removesnapshot":          true,
	"removeallsnapshots":      true,
	"consolidatevmdisks":      true,
	"reverttosnapshot":        true,
	"reverttocurrentsnapshot": true,
}

// isSnapshotTask matches both the method name (CreateSnapshot_Task) and the
// descriptionId (VirtualMachine.createSnapshot, VirtualMachineSnapshot.remove).
func isSnapshotTask(info types.TaskInfo) bool {
	name := strings.ToLower(strings.TrimSuffix(info.Name, "_Task"))
	if snapshotTaskNames[name] {
		return true
	}
	id := strings.ToLower(info.DescriptionId)
	if strings.HasPrefix(id, "virtualmachinesnapshot.") {
		return true
	}
	if rest, ok := strings.CutPrefix(id, "virtualmachine."); ok {
		return snapshotTaskNames[rest]
	}
	return false
}

// busySnapshotTask returns a queued or running snapshot task on the VM, if any.
func (c *Client) busySnapshotTask(ctx context.Context, vm *object.VirtualMachine) (*types.TaskInfo, error) {
	var o mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"recentTask"}, &o); err != nil {
		return nil, fmt.Errorf("read recent tasks: %w", err)
	}
	if len(o.RecentTask) == 0 {
		return nil, nil
	}
	var tasks []mo.Task
	if err := property.DefaultCollector(c.vim).Retrieve(ctx, o.RecentTask, []string{"info"}, &tasks); err != nil {
		if isNotFound(err) {
			// A task finished and was purged between the two reads: read again.
			return c.busySnapshotTask(ctx, vm)
		}
		return nil, fmt.Errorf("read recent tasks: %w", err)
	}
	for _, t := range tasks {
		if t.Info.State != types.TaskInfoStateQueued && t.Info.State != types.TaskInfoStateRunning {
			continue
		}
		if isSnapshotTask(t.Info) {
			info := t.Info
			return &info, nil
		}
	}
	return nil, nil
}

func (c *Client) refuseIfBusy(ctx context.Context, vm *object.VirtualMachine) error {
	busy, err := c.busySnapshotTask(ctx, vm)
	if err != nil {
		return err
	}
	if busy != nil {
		return fmt.Errorf("task %s (%s, %s) on %s: %w", busy.Key, busy.Name, busy.State, vm.Reference().Value, ErrSnapshotBusy)
	}
	return nil
}

// CreateSnapshot snapshots the VM's disks (memory never included). It refuses with
// ErrSnapshotBusy while another snapshot task runs on the VM.
func (c *Client) CreateSnapshot(ctx context.Context, vm *object.VirtualMachine, name string, quiesce bool) (Snapshot, error) {
	if err := c.refuseIfBusy(ctx, vm); err != nil {
		return Snapshot{}, fmt.Errorf("create snapshot %q: %w", name, err)
	}
	task, err := vm.CreateSnapshot(ctx, name, "diskferry backup", false, quiesce)
	if err != nil {
		return Snapshot{}, fmt.Errorf("create snapshot %q of %s: %w", name, vm.Reference().Value, err)
	}
	res, err := task.WaitForResult(ctx)
	if err != nil {
		return Snapshot{}, fmt.Errorf("create snapshot %q of %s: %w", name, vm.Reference().Value, err)
	}
	ref, ok := res.Result.(types.ManagedObjectReference)
	if !ok {
		return Snapshot{}, fmt.Errorf("create snapshot %q of %s: task returned %T, not a snapshot", name, vm.Reference().Value, res.Result)
	}
	c.log.Info("snapshot created", "vm", vm.Reference().Value, "snapshot", ref.Value, "name", name, "quiesce", quiesce)
	return Snapshot{VMMoref: vm.Reference().Value, Moref: ref.Value, Name: name, Created: time.Now()}, nil
}

// RemoveSnapshot deletes a snapshot and consolidates its disks. A snapshot that no
// longer exists counts as removed, so compensation can run any number of times.
func (c *Client) RemoveSnapshot(ctx context.Context, vm *object.VirtualMachine, snapshotMoref string) error {
	ref, err := snapshotRef(snapshotMoref)
	if err != nil {
		return fmt.Errorf("remove snapshot: %w", err)
	}
	if err := c.refuseIfBusy(ctx, vm); err != nil {
		return fmt.Errorf("remove snapshot %s: %w", ref.Value, err)
	}
	consolidate := true
	res, err := methods.RemoveSnapshot_Task(ctx, c.vim, &types.RemoveSnapshot_Task{
		This:           ref,
		RemoveChildren: false,
		Consolidate:    &consolidate,
	})
	if err == nil {
		err = object.NewTask(c.vim, res.Returnval).Wait(ctx)
	}
	switch {
	case err == nil:
		c.log.Info("snapshot removed", "vm", vm.Reference().Value, "snapshot", ref.Value)
		return nil
	case isNotFound(err):
		c.log.Info("snapshot already gone", "vm", vm.Reference().Value, "snapshot", ref.Value)
		return nil
	default:
		return fmt.Errorf("remove snapshot %s of %s: %w", ref.Value, vm.Reference().Value, err)
	}
}

// ListSnapshots returns every snapshot of the VM, parents before children.
func (c *Client) ListSnapshots(ctx context.Context, vm *object.VirtualMachine) ([]Snapshot, error) {
	var o mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"snapshot"}, &o); err != nil {
		return nil, fmt.Errorf("list snapshots of %s: %w", vm.Reference().Value, err)
	}
	if o.Snapshot == nil {
		return nil, nil
	}
	var out []Snapshot
	var walk func([]types.VirtualMachineSnapshotTree)
	walk = func(trees []types.VirtualMachineSnapshotTree) {
		for _, t := range trees {
			out = append(out, Snapshot{VMMoref: vm.Reference().Value, Moref: t.Snapshot.Value, Name: t.Name, Created: t.CreateTime})
			walk(t.ChildSnapshotList)
		}
	}
	walk(o.Snapshot.RootSnapshotList)
	return out, nil
}

// SnapshotsByPrefix lists every VM's snapshots whose name starts with prefix, in one
// property-collector round trip over the whole inventory: how the SNA finds snapshots a
// crashed run left behind on any VM, after a restart too. Within a VM, parents come before
// their children.
func (c *Client) SnapshotsByPrefix(ctx context.Context, prefix string) ([]Snapshot, error) {
	if prefix == "" {
		return nil, errors.New("list snapshots: empty prefix would match every snapshot")
	}
	m := view.NewManager(c.vim)
	v, err := m.CreateContainerView(ctx, c.vim.ServiceContent.RootFolder, []string{"VirtualMachine"}, true)
	if err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	defer func() { _ = v.Destroy(context.WithoutCancel(ctx)) }()
	var vms []mo.VirtualMachine
	if err := v.Retrieve(ctx, []string{"VirtualMachine"}, []string{"snapshot"}, &vms); err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	var out []Snapshot
	for _, vm := range vms {
		if vm.Snapshot == nil {
			continue
		}
		var walk func([]types.VirtualMachineSnapshotTree)
		walk = func(trees []types.VirtualMachineSnapshotTree) {
			for _, t := range trees {
				if strings.HasPrefix(t.Name, prefix) {
					out = append(out, Snapshot{VMMoref: vm.Self.Value, Moref: t.Snapshot.Value, Name: t.Name, Created: t.CreateTime})
				}
				walk(t.ChildSnapshotList)
			}
		}
		walk(vm.Snapshot.RootSnapshotList)
	}
	return out, nil
}

// snapshotDisks reads the disks as they are inside the snapshot; their backings hold
// the changeId that describes the snapshot's point in time.
func (c *Client) snapshotDisks(ctx context.Context, snapshotMoref string) ([]Disk, []types.BaseVirtualDevice, error) {
	ref, err := snapshotRef(snapshotMoref)
	if err != nil {
		return nil, nil, err
	}
	var o mo.VirtualMachineSnapshot
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, ref, []string{"config.hardware.device"}, &o); err != nil {
		if isNotFound(err) {
			return nil, nil, fmt.Errorf("snapshot %s: %w", ref.Value, ErrNotFound)
		}
		return nil, nil, fmt.Errorf("snapshot %s: %w", ref.Value, err)
	}
	disks, err := c.disks(ctx, o.Config.Hardware.Device)
	if err != nil {
		return nil, nil, fmt.Errorf("snapshot %s: %w", ref.Value, err)
	}
	return disks, o.Config.Hardware.Device, nil
}

// ChangeIDs maps each disk key to its changeId inside the snapshot: the base of the
// next incremental backup. Disks without CBT map to "".
func (c *Client) ChangeIDs(ctx context.Context, snapshotMoref string) (map[int32]string, error) {
	disks, _, err := c.snapshotDisks(ctx, snapshotMoref)
	if err != nil {
		return nil, fmt.Errorf("read changeIds: %w", err)
	}
	out := make(map[int32]string, len(disks))
	for _, d := range disks {
		out[d.Key] = d.ChangeID
	}
	return out, nil
}

// SnapshotDisk describes one disk as of the snapshot: its backing file there is what VDDK
// opens to read that point in time.
func (c *Client) SnapshotDisk(ctx context.Context, snapshotMoref string, diskKey int32) (Disk, error) {
	disks, _, err := c.snapshotDisks(ctx, snapshotMoref)
	if err != nil {
		return Disk{}, fmt.Errorf("disk %d of snapshot %s: %w", diskKey, snapshotMoref, err)
	}
	for _, d := range disks {
		if d.Key == diskKey {
			return d, nil
		}
	}
	return Disk{}, fmt.Errorf("disk %d of snapshot %s: %w", diskKey, snapshotMoref, ErrNotFound)
}
