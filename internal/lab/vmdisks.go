package lab

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/soap"

	"github.com/diskferry/diskferry/internal/vsphere"
)

// VMDisks is a VM as vCenter describes it, and each of its disks' flat file fetched through
// the datastore's HTTP interface (as an operator's tool reads it) into dir, by disk key.
func (l *Lab) VMDisks(ctx context.Context, vmRef, dir string) (vsphere.VMInfo, map[int32]string, error) {
	vc, err := vsphere.Connect(ctx, vsphere.Config{URL: l.VC.URL, User: l.VC.User, Password: l.VC.Password, Thumbprint: l.VC.Thumbprint})
	if err != nil {
		return vsphere.VMInfo{}, nil, err
	}
	defer vc.Close(context.WithoutCancel(ctx))
	vm, err := vc.FindVM(ctx, vmRef)
	if err != nil {
		return vsphere.VMInfo{}, nil, err
	}
	info, err := vc.Inspect(ctx, vm)
	if err != nil {
		return vsphere.VMInfo{}, nil, err
	}
	finder := find.NewFinder(vc.Vim(), false)
	dc, err := finder.Datacenter(ctx, l.VC.Datacenter)
	if err != nil {
		return vsphere.VMInfo{}, nil, err
	}
	finder.SetDatacenter(dc)
	out := map[int32]string{}
	for _, d := range info.Disks {
		var p object.DatastorePath
		if !p.FromString(d.BackingFile) {
			return vsphere.VMInfo{}, nil, fmt.Errorf("disk %d: backing file %q", d.Key, d.BackingFile)
		}
		ds, err := finder.Datastore(ctx, p.Datastore)
		if err != nil {
			return vsphere.VMInfo{}, nil, err
		}
		local := filepath.Join(dir, fmt.Sprintf("%s-disk-%d.raw", info.Name, d.Key))
		if err := download(ctx, ds, strings.TrimSuffix(p.Path, ".vmdk")+"-flat.vmdk", local); err != nil {
			return vsphere.VMInfo{}, nil, fmt.Errorf("disk %d: %w", d.Key, err)
		}
		out[d.Key] = local
	}
	return info, out, nil
}

func download(ctx context.Context, ds *object.Datastore, path, local string) error {
	r, _, err := ds.Download(ctx, path, &soap.DefaultDownload)
	if err != nil {
		return fmt.Errorf("download %s: %w", path, err)
	}
	defer r.Close()
	f, err := os.Create(local)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		return fmt.Errorf("download %s: %w", path, err)
	}
	return f.Close()
}
