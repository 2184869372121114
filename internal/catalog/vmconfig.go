package catalog

import (
	"database/sql"
	"encoding/json"
	"fmt"
)

// VMConfig is the shape of a VM when a point was taken, kept as JSON with the point: a
// restore into a new VM recreates it. The JSON field names are the stored format; add
// fields, never rename them.
type VMConfig struct {
	NumCPUs        int32        `json:"numCpus"`
	CoresPerSocket int32        `json:"coresPerSocket"`
	MemoryMB       int32        `json:"memoryMb"`
	Firmware       string       `json:"firmware"` // bios|efi
	GuestID        string       `json:"guestId"`
	Disks          []DiskLayout `json:"disks"`
	NICs           []NIC        `json:"nics"`
}

// DiskLayout is where a virtual disk sat on the VM's controllers.
type DiskLayout struct {
	Key            int32  `json:"key"`
	CapacityBytes  int64  `json:"capacityBytes"`
	ControllerKey  int32  `json:"controllerKey"`
	ControllerType string `json:"controllerType"` // pvscsi, lsilogic, lsilogic-sas, buslogic, sata, nvme, ide
	BusNumber      int32  `json:"busNumber"`
	UnitNumber     int32  `json:"unitNumber"`
	Provisioning   string `json:"provisioning,omitempty"` // thin|thick-lazy|thick-eager; empty: not known
}

// NIC is one virtual network adapter of the VM.
type NIC struct {
	Key         int32  `json:"key"`
	AdapterType string `json:"adapterType"`
	Network     string `json:"network"`
	NetworkKind string `json:"networkKind"` // standard|distributed|opaque
	AddressType string `json:"addressType"` // manual|generated|assigned
	MACAddress  string `json:"macAddress"`
}

// maxVMConfigJSON bounds the stored document; a VM's shape is a few KiB at most.
const maxVMConfigJSON = 1 << 20

// encodeVMConfig is the column value: NULL for a config not captured.
func encodeVMConfig(c *VMConfig) (sql.NullString, error) {
	if c == nil {
		return sql.NullString{}, nil
	}
	b, err := json.Marshal(c)
	if err != nil {
		return sql.NullString{}, fmt.Errorf("encode VM config: %w", err)
	}
	if len(b) > maxVMConfigJSON {
		return sql.NullString{}, fmt.Errorf("%w: VM config of %d bytes is larger than %d", ErrInvalid, len(b), maxVMConfigJSON)
	}
	return sql.NullString{String: string(b), Valid: true}, nil
}

func decodeVMConfig(col sql.NullString) (*VMConfig, error) {
	if !col.Valid {
		return nil, nil
	}
	var c VMConfig
	if err := json.Unmarshal([]byte(col.String), &c); err != nil {
		return nil, fmt.Errorf("decode VM config: %w", err)
	}
	return &c, nil
}
