package vsphere

import (
	"context"
	"fmt"
	"net/url"
	"path"
	"strings"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// FlatDisk says where a snapshot's disk can be read over HTTPS without VDDK: the
// datastore file endpoint serving the frozen -flat.vmdk, which honours HTTP Range.
type FlatDisk struct {
	URL           string // https://host/folder/<dir>/<name>-flat.vmdk?dcPath=<dc>&dsName=<ds>
	Cookie        string // "vmware_soap_session=<value>": a secret, hand it over in a file
	CapacityBytes int64
	Datastore     string
	Path          string // "<dir>/<name>-flat.vmdk" inside the datastore
}

// DiskFlatURL locates the flat file of one disk inside a snapshot. The disk must be a
// flat (thick or thin) disk whose snapshot backing has no parent: delta and sesparse
// chains are not one readable file and need VDDK instead.
func (c *Client) DiskFlatURL(ctx context.Context, snapshotMoref string, diskKey int32) (FlatDisk, error) {
	disks, devices, err := c.snapshotDisks(ctx, snapshotMoref)
	if err != nil {
		return FlatDisk{}, fmt.Errorf("flat file of disk %d: %w", diskKey, err)
	}
	var disk *Disk
	for i := range disks {
		if disks[i].Key == diskKey {
			disk = &disks[i]
		}
	}
	if disk == nil {
		return FlatDisk{}, fmt.Errorf("flat file of disk %d in snapshot %s: no such disk: %w", diskKey, snapshotMoref, ErrNotFound)
	}
	return c.flatDisk(ctx, *disk, object.VirtualDeviceList(devices).FindByKey(diskKey).GetVirtualDevice().Backing)
}

// flatDisk builds the datastore URL of a disk whose backing must be one flat file.
func (c *Client) flatDisk(ctx context.Context, disk Disk, b types.BaseVirtualDeviceBackingInfo) (FlatDisk, error) {
	backing, ok := b.(*types.VirtualDiskFlatVer2BackingInfo)
	if !ok {
		return FlatDisk{}, fmt.Errorf("flat file of disk %d (%s): %w (backing %T); use the vddk transport", disk.Key, disk.BackingFile, ErrNotFlat, b)
	}
	if backing.Parent != nil {
		return FlatDisk{}, fmt.Errorf("flat file of disk %d (%s): %w (a delta disk: the VM has snapshots); use the vddk transport", disk.Key, disk.BackingFile, ErrNotFlat)
	}
	var p object.DatastorePath
	if !p.FromString(backing.FileName) || !strings.HasSuffix(p.Path, ".vmdk") {
		return FlatDisk{}, fmt.Errorf("flat file of disk %d: unexpected backing file %q", disk.Key, backing.FileName)
	}
	flatPath := strings.TrimSuffix(p.Path, ".vmdk") + "-flat.vmdk"

	dcPath, err := c.datacenterPath(ctx, backing.Datastore)
	if err != nil {
		return FlatDisk{}, fmt.Errorf("flat file of disk %d: %w", disk.Key, err)
	}
	cookie, err := c.SessionCookie()
	if err != nil {
		return FlatDisk{}, fmt.Errorf("flat file of disk %d: %w", disk.Key, err)
	}
	base := c.vim.URL()
	u := url.URL{
		Scheme:   base.Scheme,
		Host:     base.Host,
		Path:     path.Join("/folder", flatPath),
		RawQuery: url.Values{"dcPath": {dcPath}, "dsName": {p.Datastore}}.Encode(),
	}
	return FlatDisk{
		URL:           u.String(),
		Cookie:        cookie,
		CapacityBytes: disk.CapacityBytes,
		Datastore:     p.Datastore,
		Path:          flatPath,
	}, nil
}

// datacenterPath is the inventory path of the datacenter holding a datastore, without
// the leading slash, as the /folder endpoint's dcPath wants it.
func (c *Client) datacenterPath(ctx context.Context, ds *types.ManagedObjectReference) (string, error) {
	if ds == nil {
		return "", fmt.Errorf("disk backing names no datastore")
	}
	pc := property.DefaultCollector(c.vim)
	ref := *ds
	for ref.Type != "Datacenter" {
		var e mo.ManagedEntity
		if err := pc.RetrieveOne(ctx, ref, []string{"parent"}, &e); err != nil {
			return "", fmt.Errorf("walk up from %s: %w", ref, err)
		}
		if e.Parent == nil {
			return "", fmt.Errorf("datastore %s is not inside a datacenter", ds.Value)
		}
		ref = *e.Parent
	}
	p, err := find.InventoryPath(ctx, c.vim, ref)
	if err != nil {
		return "", fmt.Errorf("path of datacenter %s: %w", ref.Value, err)
	}
	return strings.TrimPrefix(p, "/"), nil
}
