package catalog

import (
	"database/sql"
	"encoding/json"
	"fmt"

	"github.com/diskferry/diskferry/internal/vmshape"
)

// VMConfig, DiskLayout and NIC are the VM's shape kept as JSON with each point (package
// vmshape, whose JSON field names are the stored format).
type (
	VMConfig   = vmshape.Config
	DiskLayout = vmshape.DiskLayout
	NIC        = vmshape.NIC
)

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
