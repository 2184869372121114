package vsphere_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/vim25/mo"

	"github.com/diskferry/diskferry/internal/vsphere"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
)

// restoreShape is a VM shape unlike the lab VM's: three controller types, a thick disk,
// two NICs, one of them with a manual MAC that must not be copied.
func restoreShape() vsphere.VMConfig {
	return vsphere.VMConfig{
		NumCPUs: 4, CoresPerSocket: 2, MemoryMB: 512, Firmware: "efi", GuestID: "debian11_64Guest",
		Disks: []vsphere.DiskLayout{
			{Key: 2000, CapacityBytes: 16 << 20, ControllerKey: 1000, ControllerType: "pvscsi", BusNumber: 0, UnitNumber: 0, Provisioning: "thin"},
			{Key: 2001, CapacityBytes: 8 << 20, ControllerKey: 1001, ControllerType: "lsilogic", BusNumber: 1, UnitNumber: 3, Provisioning: "thick-eager"},
			{Key: 16000, CapacityBytes: 4 << 20, ControllerKey: 15000, ControllerType: "sata", BusNumber: 0, UnitNumber: 2, Provisioning: "thick-lazy"},
		},
		NICs: []vsphere.NIC{
			{Key: 4000, AdapterType: "vmxnet3", Network: "VM Network", NetworkKind: "standard", AddressType: "manual", MACAddress: "00:50:56:3f:00:01"},
			{Key: 4001, AdapterType: "e1000e", Network: "VM Network", NetworkKind: "standard", AddressType: "generated", MACAddress: "00:50:56:aa:bb:cc"},
		},
	}
}

func vmCount(t *testing.T, c *vsphere.Client) int {
	t.Helper()
	vms, err := find.NewFinder(c.Vim(), false).VirtualMachineList(context.Background(), "/...")
	require.NoError(t, err)
	return len(vms)
}

func TestCreateVMHasTheConfigShapeAtTheSourcePlacementAndARetryFindsIt(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	shape := restoreShape()
	spec := vsphere.NewVMSpec{Name: "df-vm01-restore-p1", WorkflowID: "restore-p1", SourceVM: lab.VMMoref, Config: shape}

	before := vmCount(t, c)
	got, err := c.CreateVM(ctx, spec)
	require.NoError(t, err)
	assert.Equal(t, before+1, vmCount(t, c))
	assert.Equal(t, spec.Name, got.Name)

	vm, err := c.FindVM(ctx, got.Moref)
	require.NoError(t, err)
	info, err := c.Inspect(ctx, vm)
	require.NoError(t, err)
	assert.Equal(t, "poweredOff", info.PowerState)
	cfg := info.Config
	assert.Equal(t, shape.NumCPUs, cfg.NumCPUs)
	assert.Equal(t, shape.CoresPerSocket, cfg.CoresPerSocket)
	assert.Equal(t, shape.MemoryMB, cfg.MemoryMB)
	assert.Equal(t, shape.Firmware, cfg.Firmware)
	assert.Equal(t, shape.GuestID, cfg.GuestID)
	require.Len(t, cfg.Disks, len(shape.Disks))
	require.Len(t, got.Disks, len(shape.Disks))
	for i, want := range shape.Disks {
		d := cfg.Disks[i]
		assert.Equal(t, want.ControllerType, d.ControllerType, "disk %d", want.Key)
		assert.Equal(t, want.BusNumber, d.BusNumber, "disk %d", want.Key)
		assert.Equal(t, want.UnitNumber, d.UnitNumber, "disk %d", want.Key)
		assert.Equal(t, want.CapacityBytes, d.CapacityBytes, "disk %d", want.Key)
		assert.Equal(t, want.Provisioning, d.Provisioning, "disk %d", want.Key)
		m := got.Disks[i]
		assert.Equal(t, want.Key, m.ConfigKey)
		assert.Equal(t, d.Key, m.Key, "point disk %d maps to the VM's disk on %s %d:%d", want.Key, want.ControllerType, want.BusNumber, want.UnitNumber)
		assert.Equal(t, want.CapacityBytes, m.CapacityBytes)
		assert.Contains(t, m.BackingFile, "["+lab.Datastore+"] ")
	}
	require.Len(t, cfg.NICs, 2)
	for i, want := range shape.NICs {
		n := cfg.NICs[i]
		assert.Equal(t, want.AdapterType, n.AdapterType)
		assert.Equal(t, want.Network, n.Network)
		assert.Equal(t, "generated", n.AddressType, "a new VM never takes the source's MAC")
		assert.NotEqual(t, want.MACAddress, n.MACAddress)
	}

	var o, src mo.VirtualMachine
	require.NoError(t, vm.Properties(ctx, vm.Reference(), []string{"config.annotation", "parent", "resourcePool", "datastore"}, &o))
	source := labVM(t, c, lab)
	require.NoError(t, source.Properties(ctx, source.Reference(), []string{"parent", "resourcePool", "datastore"}, &src))
	assert.Contains(t, o.Config.Annotation, vsphere.RestoreMark("restore-p1"))
	assert.Equal(t, src.Parent, o.Parent, "the source VM's folder")
	assert.Equal(t, src.ResourcePool, o.ResourcePool, "the source VM's pool")
	assert.Equal(t, src.Datastore, o.Datastore, "the source VM's datastore")

	again, err := c.CreateVM(ctx, spec)
	require.NoError(t, err)
	assert.Equal(t, got, again, "a retry returns the VM the first attempt made")
	assert.Equal(t, before+1, vmCount(t, c))
}

func TestCreateVMRefusesAnExistingNameAndCreatesNothing(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	before := vmCount(t, c)
	_, err := c.CreateVM(context.Background(), vsphere.NewVMSpec{Name: lab.VMName, WorkflowID: "restore-p1",
		SourceVM: lab.VMMoref, Config: restoreShape()})
	var in *vsphere.InputError
	require.ErrorAs(t, err, &in)
	assert.Equal(t, "name", in.Field)
	assert.Contains(t, err.Error(), "name: a VM named "+lab.VMName+" already exists in vCenter")
	assert.Equal(t, before, vmCount(t, c))
}

func TestCreateVMRefusesATooSmallDatastoreAndCreatesNothing(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	shape := restoreShape()
	shape.Disks[0].CapacityBytes = 1 << 60
	before := vmCount(t, c)
	_, err := c.CreateVM(context.Background(), vsphere.NewVMSpec{Name: "too-big", WorkflowID: "restore-p1",
		SourceVM: lab.VMMoref, Datastore: lab.Datastore, Config: shape})
	var in *vsphere.InputError
	require.ErrorAs(t, err, &in)
	assert.Equal(t, "datastore", in.Field)
	need := int64(1<<60) + shape.Disks[1].CapacityBytes + shape.Disks[2].CapacityBytes
	assert.Regexp(t, `^datastore: `+lab.Datastore+` has [0-9.]+ [KMGTP]iB \(\d+ bytes\) free, the disks need 1024\.0 PiB \(`+
		strconv.FormatInt(need, 10)+` bytes\)$`, err.Error())
	assert.Equal(t, before, vmCount(t, c))
	_, statErr := os.Stat(filepath.Join(lab.DatastoreDir, "too-big"))
	assert.ErrorIs(t, statErr, os.ErrNotExist, "no VM directory")
}

func TestCreateVMWithTheSourceGoneUsesTheDatacenterDefaults(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	got, err := c.CreateVM(ctx, vsphere.NewVMSpec{Name: "orphan-restore", WorkflowID: "restore-p2",
		SourceVM: "vm-999999", Config: restoreShape()})
	require.NoError(t, err)
	vm, err := c.FindVM(ctx, "/"+lab.Datacenter+"/vm/orphan-restore")
	require.NoError(t, err)
	assert.Equal(t, got.Moref, vm.Reference().Value)

	_, err = c.CreateVM(ctx, vsphere.NewVMSpec{Name: "x", WorkflowID: "restore-p3", Folder: "/" + lab.Datacenter + "/vm/nope", Config: restoreShape()})
	var in *vsphere.InputError
	require.ErrorAs(t, err, &in)
	assert.Equal(t, "folder", in.Field)
	_, err = c.CreateVM(ctx, vsphere.NewVMSpec{Name: "y", WorkflowID: "restore-p3", Datastore: "nope", Config: restoreShape()})
	require.ErrorAs(t, err, &in)
	assert.Equal(t, "datastore", in.Field)
}

func TestDestroyVMRemovesOnlyTheWorkflowsVM(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	got, err := c.CreateVM(ctx, vsphere.NewVMSpec{Name: "r1", WorkflowID: "wf-1", SourceVM: lab.VMMoref, Config: restoreShape()})
	require.NoError(t, err)
	require.NoError(t, c.SetPower(ctx, got.Moref, "poweredOn"))

	done, err := c.DestroyVM(ctx, lab.VMMoref, "", "wf-1")
	require.NoError(t, err)
	assert.False(t, done, "the lab VM carries no mark")
	done, err = c.DestroyVM(ctx, "", "r1", "wf-other")
	require.NoError(t, err)
	assert.False(t, done, "another workflow's mark")
	_, err = c.FindVM(ctx, lab.VMMoref)
	require.NoError(t, err)

	done, err = c.DestroyVM(ctx, "", "r1", "wf-1")
	require.NoError(t, err)
	assert.True(t, done, "found by name when the create's reply was lost, powered off and destroyed")
	_, err = c.FindVM(ctx, got.Moref)
	require.ErrorIs(t, err, vsphere.ErrNotFound)

	done, err = c.DestroyVM(ctx, got.Moref, "r1", "wf-1")
	require.NoError(t, err, "gone is success")
	assert.False(t, done)
}

func TestSetPowerIsIdempotent(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	for _, state := range []string{"poweredOn", "poweredOff", "poweredOff", "poweredOn"} {
		require.NoError(t, c.SetPower(ctx, lab.VMMoref, state))
		got, err := c.PowerState(ctx, lab.VMMoref)
		require.NoError(t, err)
		assert.Equal(t, state, got)
	}
	err := c.SetPower(ctx, lab.VMMoref, "on")
	var in *vsphere.InputError
	require.ErrorAs(t, err, &in)
	err = c.SetPower(ctx, "vm-999999", "poweredOn")
	require.ErrorIs(t, err, vsphere.ErrNotFound)
}

func TestLiveDiskFlatURL(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	key := lab.Disks[0].Key
	flat, err := c.LiveDiskFlatURL(ctx, lab.VMMoref, key)
	require.NoError(t, err)
	assert.Contains(t, flat.URL, "/folder/"+lab.VMName+"/"+lab.VMName+"-flat.vmdk?")
	assert.Equal(t, int64(diskSize), flat.CapacityBytes)
	local, err := lab.FlatPath(lab.Disks[0].BackingFile)
	require.NoError(t, err)
	assert.Equal(t, lab.Disks[0].FlatPath, local)

	_, err = c.LiveDiskFlatURL(ctx, lab.VMMoref, 9999)
	require.True(t, errors.Is(err, vsphere.ErrNotFound), "%v", err)
}

func TestCreateVMAtANamedPlacement(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	finder := find.NewFinder(c.Vim(), false)
	vmFolder, err := finder.Folder(ctx, "/"+lab.Datacenter+"/vm")
	require.NoError(t, err)
	restores, err := vmFolder.CreateFolder(ctx, "restores")
	require.NoError(t, err)
	hosts, err := finder.HostSystemList(ctx, "/"+lab.Datacenter+"/host/*/*")
	require.NoError(t, err)
	require.NotEmpty(t, hosts)
	host := hosts[len(hosts)-1]

	got, err := c.CreateVM(ctx, vsphere.NewVMSpec{Name: "placed", WorkflowID: "wf-placed",
		Folder: "/" + lab.Datacenter + "/vm/restores", Host: host.InventoryPath, Datastore: lab.Datastore,
		SourceVM: lab.VMMoref, Config: restoreShape()})
	require.NoError(t, err)
	vm, err := c.FindVM(ctx, got.Moref)
	require.NoError(t, err)
	var o mo.VirtualMachine
	require.NoError(t, vm.Properties(ctx, vm.Reference(), []string{"parent", "runtime.host"}, &o))
	assert.Equal(t, restores.Reference(), *o.Parent)
	assert.Equal(t, host.Reference(), *o.Runtime.Host)
}
