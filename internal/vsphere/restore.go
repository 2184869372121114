package vsphere

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// InputError is a restore request a retry cannot fix; Field names the input at fault.
type InputError struct {
	Field  string
	Reason string
}

func (e *InputError) Error() string { return e.Field + ": " + e.Reason }

// ErrNotFlat means a disk is not one flat file (delta or sesparse backing, an RDM): its
// datastore file is not the disk's content, so it cannot be read or written over https.
var ErrNotFlat = errors.New("not a single flat disk")

// restoreMarkPrefix starts the annotation line that names the workflow a VM was made by.
const restoreMarkPrefix = "diskferry-restore-workflow: "

// RestoreMark is the annotation of a VM made by the restore workflow workflowID.
func RestoreMark(workflowID string) string {
	return "Restored by diskferry.\n" + restoreMarkPrefix + workflowID
}

// hasMark reports whether an annotation carries the workflow's mark (a line of its own, so
// an operator's notes around it do not hide it).
func hasMark(annotation, workflowID string) bool {
	return slices.Contains(strings.Split(annotation, "\n"), restoreMarkPrefix+workflowID)
}

// NewVMSpec says what VM to create and where. Empty placement fields take the source VM's
// placement, or the datacenter's defaults when the source VM is gone.
type NewVMSpec struct {
	Name         string
	WorkflowID   string // marks the VM as the workflow's
	Folder       string // inventory path
	ResourcePool string // inventory path
	Host         string // inventory path
	Datastore    string // name
	SourceVM     string // moref of the backed-up VM; may be gone
	Config       VMConfig
}

// NewVM is a VM CreateVM made (or found made by the same workflow).
type NewVM struct {
	Moref string
	Name  string
	// Disks pairs each disk of the Config (by its key) with the VM's disk.
	Disks []NewVMDisk
}

// NewVMDisk is one disk of a new VM.
type NewVMDisk struct {
	ConfigKey     int32 // DiskLayout.Key
	Key           int32 // the VM's disk key
	CapacityBytes int64
	BackingFile   string
}

// namedVM is a VM found by name, with its annotation.
type namedVM struct {
	ref        types.ManagedObjectReference
	annotation string
}

// vmsNamed lists every VM of that name in vCenter.
func (c *Client) vmsNamed(ctx context.Context, name string) ([]namedVM, error) {
	v, err := view.NewManager(c.vim).CreateContainerView(ctx, c.vim.ServiceContent.RootFolder, []string{"VirtualMachine"}, true)
	if err != nil {
		return nil, fmt.Errorf("list VMs named %q: %w", name, err)
	}
	defer func() { _ = v.Destroy(context.WithoutCancel(ctx)) }()
	refs, err := v.Find(ctx, []string{"VirtualMachine"}, property.Match{"name": name})
	if err != nil {
		return nil, fmt.Errorf("list VMs named %q: %w", name, err)
	}
	if len(refs) == 0 {
		return nil, nil
	}
	var vms []mo.VirtualMachine
	if err := property.DefaultCollector(c.vim).Retrieve(ctx, refs, []string{"name", "config.annotation"}, &vms); err != nil {
		return nil, fmt.Errorf("list VMs named %q: %w", name, err)
	}
	out := make([]namedVM, 0, len(vms))
	for _, vm := range vms {
		n := namedVM{ref: vm.Self}
		if vm.Config != nil {
			n.annotation = vm.Config.Annotation
		}
		out = append(out, n)
	}
	return out, nil
}

// CreateVM creates a powered-off VM of the Config's shape, marked as the workflow's. A VM of
// that name the workflow made before (a retry) is returned as it is; one it did not make,
// and a datastore with less free space than the disks' capacity, are an *InputError and
// nothing is created. NICs get generated MAC addresses: a copy of the source's would clash.
func (c *Client) CreateVM(ctx context.Context, spec NewVMSpec) (NewVM, error) {
	if err := checkNewVM(spec); err != nil {
		return NewVM{}, err
	}
	existing, err := c.vmsNamed(ctx, spec.Name)
	if err != nil {
		return NewVM{}, err
	}
	for _, vm := range existing {
		if !hasMark(vm.annotation, spec.WorkflowID) {
			return NewVM{}, &InputError{Field: "name", Reason: fmt.Sprintf("a VM named %s already exists in vCenter (%s)", spec.Name, vm.ref.Value)}
		}
	}
	if len(existing) > 0 {
		c.log.Info("restore VM already created by this workflow", "vm", existing[0].ref.Value, "name", spec.Name)
		return c.describeNewVM(ctx, object.NewVirtualMachine(c.vim, existing[0].ref), spec)
	}

	p, err := c.placement(ctx, spec)
	if err != nil {
		return NewVM{}, err
	}
	var need int64
	for _, d := range spec.Config.Disks {
		need += d.CapacityBytes
	}
	if p.freeSpace < need {
		return NewVM{}, &InputError{Field: "datastore", Reason: fmt.Sprintf("%s has %s free, the disks need %s",
			p.dsName, formatBytes(p.freeSpace), formatBytes(need))}
	}
	cs, err := c.configSpec(ctx, spec, p)
	if err != nil {
		return NewVM{}, err
	}
	task, err := p.folder.CreateVM(ctx, cs, p.pool, p.host)
	if err != nil {
		return NewVM{}, fmt.Errorf("create VM %s: %w", spec.Name, err)
	}
	res, err := task.WaitForResult(ctx)
	if err != nil {
		var dup *types.DuplicateName
		if asMethodFault(err, &dup) {
			return NewVM{}, &InputError{Field: "name", Reason: fmt.Sprintf("a VM named %s already exists in vCenter", spec.Name)}
		}
		return NewVM{}, fmt.Errorf("create VM %s: %w", spec.Name, err)
	}
	ref, ok := res.Result.(types.ManagedObjectReference)
	if !ok {
		return NewVM{}, fmt.Errorf("create VM %s: task returned %T, not a VM", spec.Name, res.Result)
	}
	c.log.Info("restore VM created", "vm", ref.Value, "name", spec.Name, "datastore", p.dsName)
	return c.describeNewVM(ctx, object.NewVirtualMachine(c.vim, ref), spec)
}

func checkNewVM(spec NewVMSpec) error {
	switch {
	case strings.TrimSpace(spec.Name) == "":
		return &InputError{Field: "name", Reason: "empty VM name"}
	case spec.WorkflowID == "":
		return &InputError{Field: "workflowId", Reason: "empty"}
	case spec.Config.NumCPUs <= 0 || spec.Config.MemoryMB <= 0:
		return &InputError{Field: "config", Reason: fmt.Sprintf("%d CPUs and %d MB memory is no VM shape", spec.Config.NumCPUs, spec.Config.MemoryMB)}
	}
	return nil
}

// placed is where a new VM goes.
type placed struct {
	dc        *object.Datacenter
	folder    *object.Folder
	pool      *object.ResourcePool
	host      *object.HostSystem // nil: vCenter chooses within the pool
	ds        types.ManagedObjectReference
	dsName    string
	freeSpace int64
}

// sourcePlacement is where the backed-up VM lives, if it still does.
type sourcePlacement struct {
	dc     *object.Datacenter
	folder *types.ManagedObjectReference
	pool   *types.ManagedObjectReference
	host   *types.ManagedObjectReference
	ds     *types.ManagedObjectReference
}

func (c *Client) sourcePlacement(ctx context.Context, moref string) (*sourcePlacement, error) {
	if moref == "" {
		return nil, nil
	}
	vm, err := c.FindVM(ctx, moref)
	if errors.Is(err, ErrNotFound) {
		c.log.Info("source VM gone; placing the restore VM at the datacenter's defaults", "vm", moref)
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var o mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"parent", "resourcePool", "runtime.host", "datastore"}, &o); err != nil {
		if isNotFound(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("placement of source VM %s: %w", moref, err)
	}
	sp := &sourcePlacement{folder: o.Parent, pool: o.ResourcePool, host: o.Runtime.Host}
	if len(o.Datastore) > 0 {
		sp.ds = &o.Datastore[0]
	}
	dc, err := c.datacenterOf(ctx, vm.Reference())
	if err != nil {
		return nil, fmt.Errorf("placement of source VM %s: %w", moref, err)
	}
	sp.dc = dc
	return sp, nil
}

// datacenterOf walks up the inventory from ref to its datacenter.
func (c *Client) datacenterOf(ctx context.Context, ref types.ManagedObjectReference) (*object.Datacenter, error) {
	pc := property.DefaultCollector(c.vim)
	for ref.Type != "Datacenter" {
		var e mo.ManagedEntity
		if err := pc.RetrieveOne(ctx, ref, []string{"parent"}, &e); err != nil {
			return nil, fmt.Errorf("walk up from %s: %w", ref, err)
		}
		if e.Parent == nil {
			return nil, fmt.Errorf("%s is not inside a datacenter", ref)
		}
		ref = *e.Parent
	}
	dc := object.NewDatacenter(c.vim, ref)
	p, err := find.InventoryPath(ctx, c.vim, ref)
	if err != nil {
		return nil, fmt.Errorf("path of datacenter %s: %w", ref.Value, err)
	}
	dc.InventoryPath = p
	return dc, nil
}

// placement resolves the spec's placement: named objects first, then the source VM's, then
// the datacenter's defaults. Named objects that do not exist are an *InputError.
func (c *Client) placement(ctx context.Context, spec NewVMSpec) (placed, error) {
	src, err := c.sourcePlacement(ctx, spec.SourceVM)
	if err != nil {
		return placed{}, err
	}
	finder := find.NewFinder(c.vim, false)
	var p placed
	switch {
	case spec.Folder != "":
		if err := checkInventoryPath(spec.Folder); err != nil {
			return placed{}, &InputError{Field: "folder", Reason: err.Error()}
		}
		if p.folder, err = finder.Folder(ctx, spec.Folder); err != nil {
			return placed{}, &InputError{Field: "folder", Reason: fmt.Sprintf("no folder %s in vCenter", spec.Folder)}
		}
		if p.dc, err = c.datacenterOf(ctx, p.folder.Reference()); err != nil {
			return placed{}, &InputError{Field: "folder", Reason: fmt.Sprintf("folder %s: %v", spec.Folder, err)}
		}
	case src != nil:
		p.dc = src.dc
		if src.folder != nil {
			p.folder = object.NewFolder(c.vim, *src.folder)
		}
	default:
		if p.dc, err = finder.DefaultDatacenter(ctx); err != nil {
			return placed{}, &InputError{Field: "folder", Reason: "the source VM is gone and vCenter has no single datacenter: name a folder"}
		}
	}
	finder.SetDatacenter(p.dc)
	if p.folder == nil {
		folders, err := p.dc.Folders(ctx)
		if err != nil {
			return placed{}, fmt.Errorf("folders of datacenter %s: %w", p.dc.InventoryPath, err)
		}
		p.folder = folders.VmFolder
	}

	if spec.Host != "" {
		if err := checkInventoryPath(spec.Host); err != nil {
			return placed{}, &InputError{Field: "host", Reason: err.Error()}
		}
		if p.host, err = finder.HostSystem(ctx, spec.Host); err != nil {
			return placed{}, &InputError{Field: "host", Reason: fmt.Sprintf("no host %s in vCenter", spec.Host)}
		}
	}
	sameDC := src != nil && src.dc.Reference() == p.dc.Reference()
	switch {
	case spec.ResourcePool != "":
		if err := checkInventoryPath(spec.ResourcePool); err != nil {
			return placed{}, &InputError{Field: "resourcePool", Reason: err.Error()}
		}
		if p.pool, err = finder.ResourcePool(ctx, spec.ResourcePool); err != nil {
			return placed{}, &InputError{Field: "resourcePool", Reason: fmt.Sprintf("no resource pool %s in vCenter", spec.ResourcePool)}
		}
	case p.host != nil:
		if p.pool, err = p.host.ResourcePool(ctx); err != nil {
			return placed{}, fmt.Errorf("resource pool of host %s: %w", spec.Host, err)
		}
	case sameDC && src.pool != nil:
		p.pool = object.NewResourcePool(c.vim, *src.pool)
		if src.host != nil {
			p.host = object.NewHostSystem(c.vim, *src.host)
		}
	default:
		if p.pool, err = finder.DefaultResourcePool(ctx); err != nil {
			return placed{}, &InputError{Field: "resourcePool", Reason: fmt.Sprintf("datacenter %s has no single default resource pool: name one", p.dc.InventoryPath)}
		}
	}

	switch {
	case spec.Datastore != "":
		ds, err := finder.Datastore(ctx, spec.Datastore)
		if err != nil {
			return placed{}, &InputError{Field: "datastore", Reason: fmt.Sprintf("no datastore %s in datacenter %s", spec.Datastore, p.dc.InventoryPath)}
		}
		p.ds = ds.Reference()
	case sameDC && src.ds != nil:
		p.ds = *src.ds
	default:
		ds, err := finder.DefaultDatastore(ctx)
		if err != nil {
			return placed{}, &InputError{Field: "datastore", Reason: fmt.Sprintf("datacenter %s has no single default datastore: name one", p.dc.InventoryPath)}
		}
		p.ds = ds.Reference()
	}
	var ds mo.Datastore
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, p.ds, []string{"summary"}, &ds); err != nil {
		return placed{}, fmt.Errorf("datastore %s: %w", p.ds.Value, err)
	}
	p.dsName, p.freeSpace = ds.Summary.Name, ds.Summary.FreeSpace
	return p, nil
}

// ideKeys are the keys vSphere gives the two IDE controllers every VM has.
var ideKeys = map[int32]int32{0: 200, 1: 201}

// configSpec builds the new VM's configuration from the Config.
func (c *Client) configSpec(ctx context.Context, spec NewVMSpec, p placed) (types.VirtualMachineConfigSpec, error) {
	cfg := spec.Config
	cores := cfg.CoresPerSocket
	if cores <= 0 {
		cores = 1
	}
	cs := types.VirtualMachineConfigSpec{
		Name:              spec.Name,
		GuestId:           cfg.GuestID,
		NumCPUs:           cfg.NumCPUs,
		NumCoresPerSocket: &cores,
		MemoryMB:          int64(cfg.MemoryMB),
		Firmware:          cfg.Firmware,
		Annotation:        RestoreMark(spec.WorkflowID),
		Files:             &types.VirtualMachineFileInfo{VmPathName: "[" + p.dsName + "]"},
	}
	add := func(d types.BaseVirtualDevice, create bool) {
		dc := &types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: d}
		if create {
			dc.FileOperation = types.VirtualDeviceConfigSpecFileOperationCreate
		}
		cs.DeviceChange = append(cs.DeviceChange, dc)
	}
	type bus struct {
		kind string
		num  int32
	}
	controllers := map[bus]int32{}
	nextKey := int32(-100)
	for i, d := range cfg.Disks {
		b := bus{d.ControllerType, d.BusNumber}
		key, ok := controllers[b]
		if !ok {
			ctrl, err := newController(d.ControllerType, d.BusNumber)
			if err != nil {
				return cs, &InputError{Field: "config", Reason: fmt.Sprintf("disk %d: %v", d.Key, err)}
			}
			if ctrl == nil {
				key = ideKeys[d.BusNumber]
			} else {
				key = nextKey
				nextKey--
				ctrl.GetVirtualDevice().Key = key
				add(ctrl, false)
			}
			controllers[b] = key
		}
		unit := d.UnitNumber
		disk := &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key:           -1000 - int32(i),
				ControllerKey: key,
				UnitNumber:    &unit,
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					DiskMode:                     string(types.VirtualDiskModePersistent),
					ThinProvisioned:              types.NewBool(d.Provisioning != "thick-lazy" && d.Provisioning != "thick-eager"),
					EagerlyScrub:                 types.NewBool(d.Provisioning == "thick-eager"),
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: "[" + p.dsName + "]", Datastore: &p.ds},
				},
			},
			CapacityInBytes: d.CapacityBytes,
			CapacityInKB:    d.CapacityBytes / 1024,
		}
		add(disk, true)
	}
	finder := find.NewFinder(c.vim, false)
	finder.SetDatacenter(p.dc)
	for i, n := range cfg.NICs {
		if n.Network == "" {
			return cs, &InputError{Field: "config", Reason: fmt.Sprintf("NIC %d has no network", n.Key)}
		}
		net, err := finder.Network(ctx, n.Network)
		if err != nil {
			return cs, &InputError{Field: "config", Reason: fmt.Sprintf("NIC %d: no network %s in datacenter %s", n.Key, n.Network, p.dc.InventoryPath)}
		}
		backing, err := net.EthernetCardBackingInfo(ctx)
		if err != nil {
			return cs, fmt.Errorf("NIC %d on %s: %w", n.Key, n.Network, err)
		}
		card, err := object.VirtualDeviceList{}.CreateEthernetCard(n.AdapterType, backing)
		if err != nil {
			return cs, &InputError{Field: "config", Reason: fmt.Sprintf("NIC %d: %v", n.Key, err)}
		}
		e := card.(types.BaseVirtualEthernetCard).GetVirtualEthernetCard()
		e.Key = -2000 - int32(i)
		e.AddressType = string(types.VirtualEthernetCardMacTypeGenerated)
		e.MacAddress = ""
		add(card, false)
	}
	return cs, nil
}

// newController makes a controller of the type's name on the bus; nil for IDE, whose two
// controllers every VM already has.
func newController(kind string, busNumber int32) (types.BaseVirtualDevice, error) {
	var ctrl types.BaseVirtualDevice
	var err error
	switch kind {
	case "ide":
		if _, ok := ideKeys[busNumber]; !ok {
			return nil, fmt.Errorf("IDE bus %d does not exist (0 or 1)", busNumber)
		}
		return nil, nil
	case "sata":
		ctrl = &types.VirtualAHCIController{}
	case "nvme":
		ctrl = &types.VirtualNVMEController{}
	default:
		if ctrl, err = (object.VirtualDeviceList{}).CreateSCSIController(kind); err != nil {
			return nil, fmt.Errorf("controller type %q: %w", kind, err)
		}
	}
	ctrl.(types.BaseVirtualController).GetVirtualController().BusNumber = busNumber
	return ctrl, nil
}

// describeNewVM pairs the Config's disks with the VM's, by controller type, bus and unit.
func (c *Client) describeNewVM(ctx context.Context, vm *object.VirtualMachine, spec NewVMSpec) (NewVM, error) {
	var o mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"name", "config.hardware.device"}, &o); err != nil {
		return NewVM{}, fmt.Errorf("read new VM %s: %w", vm.Reference().Value, err)
	}
	if o.Config == nil {
		return NewVM{}, fmt.Errorf("read new VM %s: no config yet", vm.Reference().Value)
	}
	got, err := c.vmConfig(ctx, o.Config)
	if err != nil {
		return NewVM{}, fmt.Errorf("read new VM %s: %w", vm.Reference().Value, err)
	}
	devices := object.VirtualDeviceList(o.Config.Hardware.Device)
	out := NewVM{Moref: vm.Reference().Value, Name: o.Name}
	for _, want := range spec.Config.Disks {
		i := slices.IndexFunc(got.Disks, func(d DiskLayout) bool {
			return d.ControllerType == want.ControllerType && d.BusNumber == want.BusNumber && d.UnitNumber == want.UnitNumber
		})
		if i < 0 {
			return NewVM{}, fmt.Errorf("VM %s (%s) has no disk on %s bus %d unit %d for disk %d",
				o.Name, out.Moref, want.ControllerType, want.BusNumber, want.UnitNumber, want.Key)
		}
		d := got.Disks[i]
		nd := NewVMDisk{ConfigKey: want.Key, Key: d.Key, CapacityBytes: d.CapacityBytes}
		if b, ok := devices.FindByKey(d.Key).GetVirtualDevice().Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
			nd.BackingFile = b.GetVirtualDeviceFileBackingInfo().FileName
		}
		out.Disks = append(out.Disks, nd)
	}
	return out, nil
}

// DestroyVM removes the VM the workflow made: by moref, or by name when the create's reply
// was lost. A VM without the workflow's mark is left alone (false); a VM already gone is
// success. A powered-on VM is powered off first.
func (c *Client) DestroyVM(ctx context.Context, moref, name, workflowID string) (bool, error) {
	var refs []types.ManagedObjectReference
	if moref != "" {
		vm, err := c.FindVM(ctx, moref)
		if errors.Is(err, ErrNotFound) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		var o mo.VirtualMachine
		if err := vm.Properties(ctx, vm.Reference(), []string{"config.annotation"}, &o); err != nil {
			if isNotFound(err) {
				return false, nil
			}
			return false, fmt.Errorf("read VM %s: %w", moref, err)
		}
		if o.Config == nil || !hasMark(o.Config.Annotation, workflowID) {
			c.log.Warn("not destroying a VM the restore did not make", "vm", moref, "workflow", workflowID)
			return false, nil
		}
		refs = append(refs, vm.Reference())
	} else {
		named, err := c.vmsNamed(ctx, name)
		if err != nil {
			return false, err
		}
		for _, vm := range named {
			if hasMark(vm.annotation, workflowID) {
				refs = append(refs, vm.ref)
			}
		}
	}
	destroyed := false
	for _, ref := range refs {
		vm := object.NewVirtualMachine(c.vim, ref)
		if err := c.setPower(ctx, vm, string(types.VirtualMachinePowerStatePoweredOff)); err != nil {
			if errors.Is(err, ErrNotFound) {
				continue
			}
			return destroyed, err
		}
		task, err := vm.Destroy(ctx)
		if err == nil {
			err = task.Wait(ctx)
		}
		if err != nil {
			if isNotFound(err) {
				continue
			}
			return destroyed, fmt.Errorf("destroy VM %s: %w", ref.Value, err)
		}
		c.log.Info("restore VM destroyed", "vm", ref.Value, "workflow", workflowID)
		destroyed = true
	}
	return destroyed, nil
}

// PowerState is the VM's runtime.powerState (poweredOn, poweredOff, suspended).
func (c *Client) PowerState(ctx context.Context, moref string) (string, error) {
	vm, err := c.FindVM(ctx, moref)
	if err != nil {
		return "", err
	}
	var o mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"runtime.powerState"}, &o); err != nil {
		if isNotFound(err) {
			return "", fmt.Errorf("power state of %s: %w", moref, ErrNotFound)
		}
		return "", fmt.Errorf("power state of %s: %w", moref, err)
	}
	return string(o.Runtime.PowerState), nil
}

// SetPower powers the VM on or off (poweredOn|poweredOff); already so is success.
func (c *Client) SetPower(ctx context.Context, moref, state string) error {
	if state != string(types.VirtualMachinePowerStatePoweredOn) && state != string(types.VirtualMachinePowerStatePoweredOff) {
		return &InputError{Field: "state", Reason: fmt.Sprintf("unknown power state %q (poweredOn or poweredOff)", state)}
	}
	vm, err := c.FindVM(ctx, moref)
	if err != nil {
		return err
	}
	return c.setPower(ctx, vm, state)
}

func (c *Client) setPower(ctx context.Context, vm *object.VirtualMachine, state string) error {
	var o mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"runtime.powerState"}, &o); err != nil {
		if isNotFound(err) {
			return fmt.Errorf("power state of %s: %w", vm.Reference().Value, ErrNotFound)
		}
		return fmt.Errorf("power state of %s: %w", vm.Reference().Value, err)
	}
	if string(o.Runtime.PowerState) == state {
		return nil
	}
	var task *object.Task
	var err error
	if state == string(types.VirtualMachinePowerStatePoweredOn) {
		task, err = vm.PowerOn(ctx)
	} else {
		task, err = vm.PowerOff(ctx)
	}
	if err == nil {
		err = task.Wait(ctx)
	}
	var invalid *types.InvalidPowerState
	if asMethodFault(err, &invalid) && string(invalid.ExistingState) == state {
		return nil // another caller got there first
	}
	if err != nil {
		return fmt.Errorf("set %s to %s: %w", vm.Reference().Value, state, err)
	}
	c.log.Info("VM power changed", "vm", vm.Reference().Value, "state", state)
	return nil
}

// VMDisk describes one disk of a VM as it is now (no snapshot).
func (c *Client) VMDisk(ctx context.Context, moref string, diskKey int32) (Disk, types.BaseVirtualDevice, error) {
	vm, err := c.FindVM(ctx, moref)
	if err != nil {
		return Disk{}, nil, err
	}
	var o mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"config.hardware.device"}, &o); err != nil {
		if isNotFound(err) {
			return Disk{}, nil, fmt.Errorf("disks of VM %s: %w", moref, ErrNotFound)
		}
		return Disk{}, nil, fmt.Errorf("disks of VM %s: %w", moref, err)
	}
	if o.Config == nil {
		return Disk{}, nil, fmt.Errorf("disks of VM %s: no config (VM inaccessible?)", moref)
	}
	devices := object.VirtualDeviceList(o.Config.Hardware.Device)
	disks, err := c.disks(ctx, devices)
	if err != nil {
		return Disk{}, nil, fmt.Errorf("disks of VM %s: %w", moref, err)
	}
	for _, d := range disks {
		if d.Key == diskKey {
			return d, devices.FindByKey(diskKey), nil
		}
	}
	return Disk{}, nil, fmt.Errorf("VM %s has no disk %d: %w", moref, diskKey, ErrNotFound)
}

// LiveDiskFlatURL locates the flat file of a VM's disk as it is now, for writing it whole
// (a restore, the VM powered off) or reading it back. A disk with snapshots (a delta
// backing) or another backing than a flat file is refused with ErrNotFlat.
func (c *Client) LiveDiskFlatURL(ctx context.Context, moref string, diskKey int32) (FlatDisk, error) {
	disk, dev, err := c.VMDisk(ctx, moref, diskKey)
	if err != nil {
		return FlatDisk{}, fmt.Errorf("flat file of disk %d: %w", diskKey, err)
	}
	return c.flatDisk(ctx, disk, dev.GetVirtualDevice().Backing)
}

func formatBytes(n int64) string {
	const unit = 1 << 10
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB (%d bytes)", float64(n)/float64(div), "KMGTP"[exp], n)
}
