package vcsimtest_test

import (
	"context"
	"net/url"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
)

// A plain govmomi login with the lab's credentials and pinned thumbprint sees the VM.
func TestLabLoginListsVM(t *testing.T) {
	testenv.Integration(t)
	ctx := context.Background()
	lab := vcsimtest.NewLab(t, vcsimtest.Options{Disks: 3, DiskSize: 8 << 20})

	u, err := soap.ParseURL(lab.URL)
	require.NoError(t, err)
	sc := soap.NewClient(u, false)
	sc.SetThumbprint(u.Host, lab.Thumbprint)
	vc, err := vim25.NewClient(ctx, sc)
	require.NoError(t, err)
	sm := session.NewManager(vc)
	require.NoError(t, sm.Login(ctx, url.UserPassword(lab.User, lab.Password)))
	t.Cleanup(func() { _ = sm.Logout(ctx) })

	vms, err := find.NewFinder(vc).VirtualMachineList(ctx, "*")
	require.NoError(t, err)
	var names []string
	for _, vm := range vms {
		names = append(names, vm.Name())
	}
	require.Equal(t, []string{lab.VMName}, names)
	require.Len(t, lab.Disks, 3)
	for _, d := range lab.Disks {
		require.Equal(t, int64(8<<20), d.CapacityBytes)
		require.FileExists(t, d.FlatPath)
	}
}

// Content is a function of the seed, and each CBT answer stays within the batch bound.
func TestLabContentAndCBTBatches(t *testing.T) {
	testenv.Integration(t)
	ctx := context.Background()
	opts := vcsimtest.Options{Disks: 1, DiskSize: 32 << 20, Seed: 7, CBT: true, MaxExtentsPerQuery: 2}
	a := vcsimtest.NewLab(t, opts)
	b := vcsimtest.NewLab(t, opts)
	opts.Seed = 8
	c := vcsimtest.NewLab(t, opts)

	key := a.Disks[0].Key
	read := func(l *vcsimtest.Lab) []byte {
		data, err := l.ReadDisk(key, 0, 32<<20)
		require.NoError(t, err)
		return data
	}
	require.Equal(t, read(a), read(b), "same seed, same content")
	require.NotEqual(t, read(a), read(c), "another seed, other content")
	require.Equal(t, a.Allocated(key), b.Allocated(key))
	require.Equal(t, a.ChangeID(key), b.ChangeID(key))
	require.Regexp(t, `/0$`, a.ChangeID(key))

	u, err := soap.ParseURL(a.URL)
	require.NoError(t, err)
	sc := soap.NewClient(u, false)
	sc.SetThumbprint(u.Host, a.Thumbprint)
	vc, err := vim25.NewClient(ctx, sc)
	require.NoError(t, err)
	require.NoError(t, session.NewManager(vc).Login(ctx, url.UserPassword(a.User, a.Password)))
	vm := object.NewVirtualMachine(vc, types.ManagedObjectReference{Type: "VirtualMachine", Value: a.VMMoref})
	task, err := vm.CreateSnapshot(ctx, "s", "", false, false)
	require.NoError(t, err)
	res, err := task.WaitForResult(ctx)
	require.NoError(t, err)
	snap := res.Result.(types.ManagedObjectReference)

	var got []types.DiskChangeExtent
	calls := 0
	for start := int64(0); start < 32<<20; calls++ {
		r, err := methods.QueryChangedDiskAreas(ctx, vc, &types.QueryChangedDiskAreas{
			This: vm.Reference(), Snapshot: &snap, DeviceKey: key, StartOffset: start, ChangeId: "*",
		})
		require.NoError(t, err)
		require.LessOrEqual(t, len(r.Returnval.ChangedArea), 2)
		require.Equal(t, start, r.Returnval.StartOffset)
		got = append(got, r.Returnval.ChangedArea...)
		start = r.Returnval.StartOffset + r.Returnval.Length
	}
	require.Greater(t, calls, 1)
	alloc := a.Allocated(key)
	require.Len(t, got, len(alloc))
	for i, e := range alloc {
		require.Equal(t, e.Start, got[i].Start)
		require.Equal(t, e.Length, got[i].Length)
	}
}

// Every VM of a many-VM lab has disks of its own content, and each answers
// QueryChangedDiskAreas on its own snapshot with its own allocated areas.
func TestLabManyVMs(t *testing.T) {
	testenv.Integration(t)
	ctx := context.Background()
	lab := vcsimtest.NewLab(t, vcsimtest.Options{VMs: 3, Disks: 2, DiskSize: 4 << 20, CBT: true, Seed: 3})
	require.Len(t, lab.VMs, 3)
	require.Equal(t, lab.VMName, lab.VMs[0].Name)
	require.Equal(t, lab.VMMoref, lab.VMs[0].Moref)
	require.Equal(t, lab.Disks, lab.VMs[0].Disks)
	require.Equal(t, lab.VMName+"-03", lab.VMs[2].Name)

	u, err := soap.ParseURL(lab.URL)
	require.NoError(t, err)
	sc := soap.NewClient(u, false)
	sc.SetThumbprint(u.Host, lab.Thumbprint)
	vc, err := vim25.NewClient(ctx, sc)
	require.NoError(t, err)
	require.NoError(t, session.NewManager(vc).Login(ctx, url.UserPassword(lab.User, lab.Password)))

	contents := map[string]string{}
	for _, v := range lab.VMs {
		require.Len(t, v.Disks, 2)
		for _, d := range v.Disks {
			data, err := os.ReadFile(d.FlatPath)
			require.NoError(t, err)
			require.NotContains(t, contents, string(data), "disk %s of %s has another disk's content", d.Label, v.Name)
			contents[string(data)] = v.Name
		}
		vm := object.NewVirtualMachine(vc, types.ManagedObjectReference{Type: "VirtualMachine", Value: v.Moref})
		task, err := vm.CreateSnapshot(ctx, "s", "", false, false)
		require.NoError(t, err)
		res, err := task.WaitForResult(ctx)
		require.NoError(t, err)
		snap := res.Result.(types.ManagedObjectReference)
		r, err := methods.QueryChangedDiskAreas(ctx, vc, &types.QueryChangedDiskAreas{
			This: vm.Reference(), Snapshot: &snap, DeviceKey: v.Disks[1].Key, ChangeId: "*",
		})
		require.NoError(t, err, "CBT of %s", v.Name)
		require.NotEmpty(t, r.Returnval.ChangedArea)
		require.Zero(t, r.Returnval.ChangedArea[0].Start, "the first chunk of every disk holds data")
	}
}
