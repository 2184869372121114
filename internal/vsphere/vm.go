package vsphere

import (
	"context"
	"fmt"
	"regexp"
	"strings"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// Disk is one virtual disk of a VM or of a snapshot.
type Disk struct {
	Key           int32
	Label         string
	CapacityBytes int64
	BackingFile   string // "[datastore] dir/name.vmdk"
	Datastore     string
	ChangeID      string // empty without CBT
}

// VMInfo is what Inspect reports about a VM.
type VMInfo struct {
	InstanceUUID string // of the vCenter
	Moref        string
	Name         string
	PowerState   string
	CBTEnabled   bool
	Disks        []Disk
	Config       VMConfig
}

var vmMorefPattern = regexp.MustCompile(`^vm-\d+$`)

// FindVM resolves a VM by moref ("vm-123" or "VirtualMachine:vm-123"), inventory path
// ("/DC0/vm/app01", anything with a slash) or unique name.
func (c *Client) FindVM(ctx context.Context, ref string) (*object.VirtualMachine, error) {
	ref = strings.TrimSpace(ref)
	if ref == "" {
		return nil, fmt.Errorf("find VM: empty reference: %w", ErrNotFound)
	}
	if moref, ok := parseMoref(ref, "VirtualMachine", vmMorefPattern); ok {
		vm := object.NewVirtualMachine(c.vim, moref)
		var o mo.VirtualMachine
		if err := vm.Properties(ctx, moref, []string{"name"}, &o); err != nil {
			if isNotFound(err) {
				return nil, fmt.Errorf("find VM %s: %w", ref, ErrNotFound)
			}
			return nil, fmt.Errorf("find VM %s: %w", ref, err)
		}
		return vm, nil
	}
	if strings.Contains(ref, "/") {
		if err := checkInventoryPath(ref); err != nil {
			return nil, fmt.Errorf("find VM %q: %w", ref, err)
		}
		vm, err := find.NewFinder(c.vim, false).VirtualMachine(ctx, ref)
		if err != nil {
			if _, ok := err.(*find.NotFoundError); ok {
				return nil, fmt.Errorf("find VM %s: %w", ref, ErrNotFound)
			}
			return nil, fmt.Errorf("find VM %s: %w", ref, err)
		}
		return vm, nil
	}
	return c.findVMByName(ctx, ref)
}

// checkInventoryPath accepts only absolute paths without empty, '.' or '..' elements: the
// finder resolves nothing else without a default datacenter, and fails on them with errors
// that look transient.
func checkInventoryPath(path string) error {
	if !strings.HasPrefix(path, "/") {
		return fmt.Errorf("%w: an inventory path must be absolute (/datacenter/vm/name)", ErrInvalidReference)
	}
	for _, elem := range strings.Split(path[1:], "/") {
		if elem == "" || elem == "." || elem == ".." {
			return fmt.Errorf("%w: empty, '.' or '..' element in an inventory path", ErrInvalidReference)
		}
	}
	return nil
}

// findVMByName searches every datacenter, so a name need not say where the VM lives.
func (c *Client) findVMByName(ctx context.Context, name string) (*object.VirtualMachine, error) {
	m := view.NewManager(c.vim)
	v, err := m.CreateContainerView(ctx, c.vim.ServiceContent.RootFolder, []string{"VirtualMachine"}, true)
	if err != nil {
		return nil, fmt.Errorf("find VM %q: create view: %w", name, err)
	}
	defer func() { _ = v.Destroy(context.WithoutCancel(ctx)) }()

	refs, err := v.Find(ctx, []string{"VirtualMachine"}, property.Match{"name": name})
	if err != nil {
		return nil, fmt.Errorf("find VM %q: %w", name, err)
	}
	switch len(refs) {
	case 0:
		return nil, fmt.Errorf("find VM %q: %w", name, ErrNotFound)
	case 1:
		return object.NewVirtualMachine(c.vim, refs[0]), nil
	default:
		return nil, fmt.Errorf("find VM %q: %w: %d VMs have that name; use the inventory path or moref", name, ErrInvalidReference, len(refs))
	}
}

// parseMoref accepts "Type:value" of the given type, or a bare value matching pattern.
func parseMoref(s, kind string, bare *regexp.Regexp) (types.ManagedObjectReference, bool) {
	if v, ok := strings.CutPrefix(s, kind+":"); ok && v != "" {
		return types.ManagedObjectReference{Type: kind, Value: v}, true
	}
	if bare.MatchString(s) {
		return types.ManagedObjectReference{Type: kind, Value: s}, true
	}
	return types.ManagedObjectReference{}, false
}

// Inspect reads what a backup needs to know about a VM, and the VM's shape for a restore.
func (c *Client) Inspect(ctx context.Context, vm *object.VirtualMachine) (VMInfo, error) {
	var o mo.VirtualMachine
	props := append([]string{"name", "runtime.powerState", "config.changeTrackingEnabled", "config.hardware.device"}, vmConfigProps...)
	if err := vm.Properties(ctx, vm.Reference(), props, &o); err != nil {
		if isNotFound(err) {
			return VMInfo{}, fmt.Errorf("inspect VM %s: %w", vm.Reference().Value, ErrNotFound)
		}
		return VMInfo{}, fmt.Errorf("inspect VM %s: %w", vm.Reference().Value, err)
	}
	info := VMInfo{
		InstanceUUID: c.InstanceUUID(),
		Moref:        vm.Reference().Value,
		Name:         o.Name,
		PowerState:   string(o.Runtime.PowerState),
	}
	if o.Config == nil {
		return VMInfo{}, fmt.Errorf("inspect VM %s: no config (VM is inaccessible or being created)", info.Name)
	}
	if o.Config.ChangeTrackingEnabled != nil {
		info.CBTEnabled = *o.Config.ChangeTrackingEnabled
	}
	disks, err := c.disks(ctx, o.Config.Hardware.Device)
	if err != nil {
		return VMInfo{}, fmt.Errorf("inspect VM %s: %w", info.Name, err)
	}
	info.Disks = disks
	if info.Config, err = c.vmConfig(ctx, o.Config); err != nil {
		return VMInfo{}, fmt.Errorf("inspect VM %s: %w", info.Name, err)
	}
	return info, nil
}

// disks lists the virtual disks among devices, resolving datastore names.
func (c *Client) disks(ctx context.Context, devices object.VirtualDeviceList) ([]Disk, error) {
	var out []Disk
	dsNames := map[types.ManagedObjectReference]string{}
	for _, d := range devices.SelectByType((*types.VirtualDisk)(nil)) {
		vd := d.(*types.VirtualDisk)
		disk := Disk{
			Key:           vd.Key,
			Label:         devices.Name(vd),
			CapacityBytes: vd.CapacityInBytes,
		}
		if disk.CapacityBytes == 0 {
			disk.CapacityBytes = vd.CapacityInKB * 1024
		}
		if info := vd.DeviceInfo; info != nil && info.GetDescription().Label != "" {
			disk.Label = info.GetDescription().Label
		}
		var dsRef *types.ManagedObjectReference
		if fb, ok := vd.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
			b := fb.GetVirtualDeviceFileBackingInfo()
			disk.BackingFile = b.FileName
			dsRef = b.Datastore
		}
		disk.ChangeID = backingChangeID(vd.Backing)
		if dsRef != nil {
			name, ok := dsNames[*dsRef]
			if !ok {
				var ds mo.Datastore
				if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, *dsRef, []string{"name"}, &ds); err != nil {
					return nil, fmt.Errorf("datastore of disk %d: %w", vd.Key, err)
				}
				name = ds.Name
				dsNames[*dsRef] = name
			}
			disk.Datastore = name
		} else {
			var p object.DatastorePath
			if p.FromString(disk.BackingFile) {
				disk.Datastore = p.Datastore
			}
		}
		out = append(out, disk)
	}
	return out, nil
}

// backingChangeID returns the CBT changeId of a disk backing, empty if it has none.
func backingChangeID(b types.BaseVirtualDeviceBackingInfo) string {
	switch b := b.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo:
		return b.ChangeId
	case *types.VirtualDiskSparseVer2BackingInfo:
		return b.ChangeId
	case *types.VirtualDiskSeSparseBackingInfo:
		return b.ChangeId
	case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
		return b.ChangeId
	case *types.VirtualDiskRawDiskVer2BackingInfo:
		return b.ChangeId
	}
	return ""
}

// EnableCBT turns Changed Block Tracking on. It takes effect after the next stun
// (snapshot create/remove or power cycle), so the first backup after it is full.
func (c *Client) EnableCBT(ctx context.Context, vm *object.VirtualMachine) error {
	var o mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"config.changeTrackingEnabled"}, &o); err != nil {
		return fmt.Errorf("enable CBT on %s: %w", vm.Reference().Value, err)
	}
	if o.Config != nil && o.Config.ChangeTrackingEnabled != nil && *o.Config.ChangeTrackingEnabled {
		return nil
	}
	on := true
	task, err := vm.Reconfigure(ctx, types.VirtualMachineConfigSpec{ChangeTrackingEnabled: &on})
	if err != nil {
		return fmt.Errorf("enable CBT on %s: %w", vm.Reference().Value, err)
	}
	if err := task.Wait(ctx); err != nil {
		return fmt.Errorf("enable CBT on %s: %w", vm.Reference().Value, err)
	}
	c.log.Info("CBT enabled", "vm", vm.Reference().Value)
	return nil
}
