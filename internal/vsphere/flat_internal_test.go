package vsphere

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vmware/govmomi/vim25/types"
)

// vcsim makes no delta disks, so the refusals are proven on the backings themselves.
func TestFlatDiskRefusesDeltaAndOtherBackings(t *testing.T) {
	c := &Client{}
	delta := &types.VirtualDiskFlatVer2BackingInfo{
		VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: "[ds] vm/vm-000001.vmdk"},
		Parent: &types.VirtualDiskFlatVer2BackingInfo{
			VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: "[ds] vm/vm.vmdk"}},
	}
	_, err := c.flatDisk(context.Background(), Disk{Key: 2000, BackingFile: "[ds] vm/vm-000001.vmdk"}, delta)
	require.ErrorIs(t, err, ErrNotFlat)
	assert.Contains(t, err.Error(), "snapshots")
	assert.Contains(t, err.Error(), "vddk")

	sesparse := &types.VirtualDiskSeSparseBackingInfo{}
	_, err = c.flatDisk(context.Background(), Disk{Key: 2001}, sesparse)
	require.ErrorIs(t, err, ErrNotFlat)
}
