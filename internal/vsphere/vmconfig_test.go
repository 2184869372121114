package vsphere_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/diskferry/diskferry/internal/vsphere"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
)

// TestInspectCapturesVMConfig reshapes the lab VM (CPUs, memory, EFI, a thick disk on a
// second controller, a NIC on a standard and one on a distributed port group) and checks
// Inspect reports the shape the simulator holds.
func TestInspectCapturesVMConfig(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	vm := labVM(t, c, lab)

	finder := find.NewFinder(c.Vim(), false)
	dc, err := finder.Datacenter(ctx, lab.Datacenter)
	require.NoError(t, err)
	finder.SetDatacenter(dc)
	pgName := addDistributedPortgroup(ctx, t, c, finder, dc)
	standard := ethernetBacking(ctx, t, finder, "VM Network")
	distributed := ethernetBacking(ctx, t, finder, pgName)

	var o mo.VirtualMachine
	require.NoError(t, vm.Properties(ctx, vm.Reference(), []string{"config.hardware.device", "datastore"}, &o))
	devices := object.VirtualDeviceList(o.Config.Hardware.Device)
	lsi, err := devices.CreateSCSIController("lsilogic")
	require.NoError(t, err)
	lsi.(types.BaseVirtualSCSIController).GetVirtualSCSIController().BusNumber = 1
	devices = append(devices, lsi)
	disk := devices.CreateDisk(lsi.(types.BaseVirtualController), o.Datastore[0], "["+lab.Datastore+"] "+lab.VMName+"/thick.vmdk")
	disk.CapacityInBytes = 8 << 20
	unit := int32(3)
	disk.UnitNumber = &unit
	backing := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	backing.ThinProvisioned, backing.EagerlyScrub = types.NewBool(false), types.NewBool(true)
	vmxnet3, err := devices.CreateEthernetCard("vmxnet3", standard)
	require.NoError(t, err)
	card := vmxnet3.(types.BaseVirtualEthernetCard).GetVirtualEthernetCard()
	card.AddressType, card.MacAddress = string(types.VirtualEthernetCardMacTypeManual), "00:50:56:3f:00:01"
	e1000e, err := devices.CreateEthernetCard("e1000e", distributed)
	require.NoError(t, err)

	cores := int32(2)
	spec := types.VirtualMachineConfigSpec{
		NumCPUs: 4, NumCoresPerSocket: &cores, MemoryMB: 512, Firmware: string(types.GuestOsDescriptorFirmwareTypeEfi),
		GuestId: string(types.VirtualMachineGuestOsIdentifierDebian11_64Guest),
		DeviceChange: []types.BaseVirtualDeviceConfigSpec{
			&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: lsi},
			&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd,
				FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate, Device: disk},
			&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: vmxnet3},
			&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: e1000e},
		},
	}
	task, err := vm.Reconfigure(ctx, spec)
	require.NoError(t, err)
	require.NoError(t, task.Wait(ctx))

	// What the simulator holds now, read independently of Inspect.
	require.NoError(t, vm.Properties(ctx, vm.Reference(), []string{"config.hardware.device"}, &o))
	held := object.VirtualDeviceList(o.Config.Hardware.Device)
	heldDisks := held.SelectByType((*types.VirtualDisk)(nil))
	require.Len(t, heldDisks, 2)
	heldNICs := held.SelectByType((*types.VirtualEthernetCard)(nil))
	require.Len(t, heldNICs, 2)

	info, err := c.Inspect(ctx, vm)
	require.NoError(t, err)
	cfg := info.Config
	assert.Equal(t, int32(4), cfg.NumCPUs)
	assert.Equal(t, int32(2), cfg.CoresPerSocket)
	assert.Equal(t, int32(512), cfg.MemoryMB)
	assert.Equal(t, "efi", cfg.Firmware)
	assert.Equal(t, "debian11_64Guest", cfg.GuestID)

	first := heldDisks[0].(*types.VirtualDisk)
	second := heldDisks[1].(*types.VirtualDisk)
	assert.Equal(t, []vsphere.DiskLayout{
		{Key: first.Key, CapacityBytes: diskSize, ControllerKey: first.ControllerKey, ControllerType: "pvscsi",
			BusNumber: 0, UnitNumber: *first.UnitNumber, Provisioning: "thin"},
		{Key: second.Key, CapacityBytes: 8 << 20, ControllerKey: second.ControllerKey, ControllerType: "lsilogic",
			BusNumber: 1, UnitNumber: 3, Provisioning: "thick-eager"},
	}, cfg.Disks)
	assert.NotEqual(t, first.ControllerKey, second.ControllerKey)

	held0 := heldNICs[0].(types.BaseVirtualEthernetCard).GetVirtualEthernetCard()
	held1 := heldNICs[1].(types.BaseVirtualEthernetCard).GetVirtualEthernetCard()
	require.NotEmpty(t, held1.MacAddress, "the simulator assigns a generated MAC")
	assert.Equal(t, []vsphere.NIC{
		{Key: held0.Key, AdapterType: "vmxnet3", Network: "VM Network", NetworkKind: "standard",
			AddressType: "manual", MACAddress: "00:50:56:3f:00:01"},
		{Key: held1.Key, AdapterType: "e1000e", Network: pgName, NetworkKind: "distributed",
			AddressType: held1.AddressType, MACAddress: held1.MacAddress},
	}, cfg.NICs)
}

// addDistributedPortgroup creates a distributed switch the lab's host joins, with one port
// group (the lab has none).
func addDistributedPortgroup(ctx context.Context, t *testing.T, c *vsphere.Client, finder *find.Finder, dc *object.Datacenter) string {
	t.Helper()
	folders, err := dc.Folders(ctx)
	require.NoError(t, err)
	host, err := finder.DefaultHostSystem(ctx)
	require.NoError(t, err)
	var spec types.DVSCreateSpec
	spec.ConfigSpec = &types.VMwareDVSConfigSpec{DVSConfigSpec: types.DVSConfigSpec{Name: "df-dvs"}}
	task, err := folders.NetworkFolder.CreateDVS(ctx, spec)
	require.NoError(t, err)
	res, err := task.WaitForResult(ctx)
	require.NoError(t, err)
	dvs := object.NewDistributedVirtualSwitch(c.Vim(), res.Result.(types.ManagedObjectReference))
	task, err = dvs.Reconfigure(ctx, &types.VMwareDVSConfigSpec{DVSConfigSpec: types.DVSConfigSpec{
		Host: []types.DistributedVirtualSwitchHostMemberConfigSpec{{Operation: string(types.ConfigSpecOperationAdd), Host: host.Reference()}}}})
	require.NoError(t, err)
	require.NoError(t, task.Wait(ctx))
	const name = "df-backend"
	task, err = dvs.AddPortgroup(ctx, []types.DVPortgroupConfigSpec{{Name: name, NumPorts: 8,
		Type: string(types.DistributedVirtualPortgroupPortgroupTypeEarlyBinding)}})
	require.NoError(t, err)
	require.NoError(t, task.Wait(ctx))
	return name
}

func ethernetBacking(ctx context.Context, t *testing.T, finder *find.Finder, name string) types.BaseVirtualDeviceBackingInfo {
	t.Helper()
	net, err := finder.Network(ctx, name)
	require.NoError(t, err)
	b, err := net.EthernetCardBackingInfo(ctx)
	require.NoError(t, err)
	return b
}
