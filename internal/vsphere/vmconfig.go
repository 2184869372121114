package vsphere

import (
	"context"
	"fmt"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/diskferry/diskferry/internal/vmshape"
)

// VMConfig, DiskLayout and NIC are the VM's shape a restore recreates (package vmshape).
type (
	VMConfig   = vmshape.Config
	DiskLayout = vmshape.DiskLayout
	NIC        = vmshape.NIC
)

// vmConfigProps are the properties vmConfig reads besides config.hardware.device.
var vmConfigProps = []string{"config.hardware.numCPU", "config.hardware.numCoresPerSocket", "config.hardware.memoryMB",
	"config.firmware", "config.guestId"}

// vmConfig reads the VM's shape from its config; the names of distributed port groups are
// looked up, as a NIC's backing only holds their key.
func (c *Client) vmConfig(ctx context.Context, cfg *types.VirtualMachineConfigInfo) (VMConfig, error) {
	out := VMConfig{
		NumCPUs: cfg.Hardware.NumCPU,
		// vCenter before 7.0 U3 may leave it unset, meaning one core per socket.
		CoresPerSocket: 1,
		MemoryMB:       cfg.Hardware.MemoryMB,
		Firmware:       cfg.Firmware,
		GuestID:        cfg.GuestId,
	}
	if n := cfg.Hardware.NumCoresPerSocket; n != nil {
		out.CoresPerSocket = *n
	}
	devices := object.VirtualDeviceList(cfg.Hardware.Device)
	for _, d := range devices.SelectByType((*types.VirtualDisk)(nil)) {
		vd := d.(*types.VirtualDisk)
		layout := DiskLayout{Key: vd.Key, CapacityBytes: vd.CapacityInBytes, ControllerKey: vd.ControllerKey,
			Provisioning: provisioning(vd.Backing)}
		if layout.CapacityBytes == 0 {
			layout.CapacityBytes = vd.CapacityInKB * 1024
		}
		if vd.UnitNumber != nil {
			layout.UnitNumber = *vd.UnitNumber
		}
		if ctrl, ok := devices.FindByKey(vd.ControllerKey).(types.BaseVirtualController); ok {
			layout.ControllerType = controllerType(ctrl)
			layout.BusNumber = ctrl.GetVirtualController().BusNumber
		}
		out.Disks = append(out.Disks, layout)
	}
	for _, d := range devices.SelectByType((*types.VirtualEthernetCard)(nil)) {
		card := d.(types.BaseVirtualEthernetCard).GetVirtualEthernetCard()
		nic := NIC{Key: card.Key, AdapterType: adapterType(d), AddressType: card.AddressType, MACAddress: card.MacAddress}
		switch b := card.Backing.(type) {
		case *types.VirtualEthernetCardNetworkBackingInfo:
			nic.Network, nic.NetworkKind = b.DeviceName, "standard"
		case *types.VirtualEthernetCardDistributedVirtualPortBackingInfo:
			var pg mo.DistributedVirtualPortgroup
			ref := types.ManagedObjectReference{Type: "DistributedVirtualPortgroup", Value: b.Port.PortgroupKey}
			if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, ref, []string{"name"}, &pg); err != nil {
				return VMConfig{}, fmt.Errorf("port group of NIC %d: %w", card.Key, err)
			}
			nic.Network, nic.NetworkKind = pg.Name, "distributed"
		case *types.VirtualEthernetCardOpaqueNetworkBackingInfo:
			nic.Network, nic.NetworkKind = b.OpaqueNetworkId, "opaque"
		}
		out.NICs = append(out.NICs, nic)
	}
	return out, nil
}

// controllerType names a disk controller as govmomi's Create*Controller helpers do.
func controllerType(c types.BaseVirtualController) string {
	switch c.(type) {
	case *types.ParaVirtualSCSIController:
		return "pvscsi"
	case *types.VirtualLsiLogicController:
		return "lsilogic"
	case *types.VirtualLsiLogicSASController:
		return "lsilogic-sas"
	case *types.VirtualBusLogicController:
		return "buslogic"
	case *types.VirtualAHCIController:
		return "sata"
	case *types.VirtualNVMEController:
		return "nvme"
	case *types.VirtualIDEController:
		return "ide"
	}
	return object.VirtualDeviceList{}.TypeName(c.(types.BaseVirtualDevice))
}

// adapterType names a network adapter as govmomi's CreateEthernetCard accepts it.
func adapterType(d types.BaseVirtualDevice) string {
	switch d.(type) {
	case *types.VirtualVmxnet3:
		return "vmxnet3"
	case *types.VirtualVmxnet3Vrdma:
		return "vmxnet3vrdma"
	case *types.VirtualE1000e:
		return "e1000e"
	case *types.VirtualE1000:
		return "e1000"
	case *types.VirtualPCNet32:
		return "pcnet32"
	case *types.VirtualVmxnet2:
		return "vmxnet2"
	case *types.VirtualVmxnet:
		return "vmxnet"
	case *types.VirtualSriovEthernetCard:
		return "sriov"
	}
	return object.VirtualDeviceList{}.TypeName(d)
}

// provisioning tells thin from thick disks where the backing says.
func provisioning(b types.BaseVirtualDeviceBackingInfo) string {
	switch b := b.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo:
		switch {
		case b.ThinProvisioned != nil && *b.ThinProvisioned:
			return "thin"
		case b.EagerlyScrub != nil && *b.EagerlyScrub:
			return "thick-eager"
		case b.ThinProvisioned != nil:
			return "thick-lazy"
		}
	case *types.VirtualDiskSeSparseBackingInfo, *types.VirtualDiskSparseVer2BackingInfo:
		return "thin"
	}
	return ""
}
