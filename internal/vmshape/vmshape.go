// Package vmshape is the shape of a VM that a restore into a new VM recreates: CPUs, memory,
// firmware, guest OS, where each disk sits and which networks the NICs join. One type for
// every layer: vSphere captures it, the activities contract carries it, the catalog keeps it
// with each point as JSON. The JSON field names are therefore the stored format: add
// fields, never rename them.
package vmshape

// Config is a VM's shape when a point was taken.
type Config struct {
	NumCPUs        int32        `json:"numCpus"`
	CoresPerSocket int32        `json:"coresPerSocket"`
	MemoryMB       int32        `json:"memoryMb"`
	Firmware       string       `json:"firmware"` // bios|efi
	GuestID        string       `json:"guestId"`  // vSphere guest OS identifier, e.g. otherLinux64Guest
	Disks          []DiskLayout `json:"disks"`
	NICs           []NIC        `json:"nics"`
}

// DiskLayout is where a virtual disk sits on the VM's controllers.
type DiskLayout struct {
	Key            int32  `json:"key"`
	CapacityBytes  int64  `json:"capacityBytes"`
	ControllerKey  int32  `json:"controllerKey"`
	ControllerType string `json:"controllerType"` // pvscsi, lsilogic, lsilogic-sas, buslogic, sata, nvme, ide
	BusNumber      int32  `json:"busNumber"`      // of the controller
	UnitNumber     int32  `json:"unitNumber"`     // on the controller
	// Provisioning is thin, thick-lazy or thick-eager; empty when the backing does not say.
	Provisioning string `json:"provisioning,omitempty"`
}

// NIC is one virtual network adapter.
type NIC struct {
	Key         int32  `json:"key"`
	AdapterType string `json:"adapterType"` // vmxnet3, e1000e, e1000, pcnet32, vmxnet2, vmxnet, sriov
	Network     string `json:"network"`     // the network's (port group's) name
	NetworkKind string `json:"networkKind"` // standard|distributed|opaque; empty without a network backing
	AddressType string `json:"addressType"` // manual|generated|assigned
	MACAddress  string `json:"macAddress"`
}
