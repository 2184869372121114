package hub

import (
	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
)

// catalogVMConfig is the VM's shape as the catalog keeps it with the point; nil (an SNA
// that does not capture it yet) stays nil, "not captured".
func catalogVMConfig(c *activities.VMConfig) *catalog.VMConfig {
	if c == nil {
		return nil
	}
	out := &catalog.VMConfig{NumCPUs: c.NumCPUs, CoresPerSocket: c.CoresPerSocket, MemoryMB: c.MemoryMB,
		Firmware: c.Firmware, GuestID: c.GuestID}
	for _, d := range c.Disks {
		out.Disks = append(out.Disks, catalog.DiskLayout{Key: d.Key, CapacityBytes: d.CapacityBytes,
			ControllerKey: d.ControllerKey, ControllerType: d.ControllerType, BusNumber: d.BusNumber,
			UnitNumber: d.UnitNumber, Provisioning: d.Provisioning})
	}
	for _, n := range c.NICs {
		out.NICs = append(out.NICs, catalog.NIC{Key: n.Key, AdapterType: n.AdapterType, Network: n.Network,
			NetworkKind: n.NetworkKind, AddressType: n.AddressType, MACAddress: n.MACAddress})
	}
	return out
}
