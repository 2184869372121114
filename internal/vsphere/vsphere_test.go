package vsphere_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/vsphere"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
)

const diskSize = 16 << 20

func newLab(t *testing.T, opts vcsimtest.Options) *vcsimtest.Lab {
	t.Helper()
	testenv.Integration(t)
	return vcsimtest.NewLab(t, opts)
}

func config(lab *vcsimtest.Lab) vsphere.Config {
	return vsphere.Config{URL: lab.URL, User: lab.User, Password: lab.Password, Thumbprint: lab.Thumbprint}
}

func connect(t *testing.T, lab *vcsimtest.Lab) *vsphere.Client {
	t.Helper()
	c, err := vsphere.Connect(context.Background(), config(lab))
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, c.Close(context.Background())) })
	return c
}

func labVM(t *testing.T, c *vsphere.Client, lab *vcsimtest.Lab) *object.VirtualMachine {
	t.Helper()
	vm, err := c.FindVM(context.Background(), lab.VMMoref)
	require.NoError(t, err)
	return vm
}

func TestConnectPinnedThumbprint(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	assert.NotEmpty(t, c.InstanceUUID())
	cookie, err := c.SessionCookie()
	require.NoError(t, err)
	assert.True(t, strings.HasPrefix(cookie, "vmware_soap_session="), cookie)

	// Lower case without colons, and SHA-256, pin the same certificate.
	cfg := config(lab)
	cfg.Thumbprint = strings.ToLower(strings.ReplaceAll(lab.Thumbprint, ":", ""))
	c2, err := vsphere.Connect(context.Background(), cfg)
	require.NoError(t, err)
	require.NoError(t, c2.Close(context.Background()))
}

func TestConnectWrongThumbprint(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	cfg := config(lab)
	cfg.Thumbprint = strings.Repeat("AB:", 19) + "AB"
	_, err := vsphere.Connect(context.Background(), cfg)
	require.Error(t, err)
	var mismatch *vsphere.ThumbprintMismatchError
	require.ErrorAs(t, err, &mismatch)
	assert.Equal(t, cfg.Thumbprint, mismatch.Expected)
	assert.Equal(t, lab.Thumbprint, mismatch.ActualSHA1)
	assert.Contains(t, err.Error(), "expected "+cfg.Thumbprint)
	assert.Contains(t, err.Error(), lab.Thumbprint)

	cfg.Thumbprint = "not-hex"
	_, err = vsphere.Connect(context.Background(), cfg)
	assert.ErrorContains(t, err, "not a SHA-1 or SHA-256")
}

func TestConnectWithoutPinRejectsUnknownCA(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	cfg := config(lab)
	cfg.Thumbprint = ""
	_, err := vsphere.Connect(context.Background(), cfg)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "certificate not trusted")
	assert.Contains(t, err.Error(), "server presents SHA-1 "+lab.Thumbprint)
}

func TestConnectInsecureLogsWarning(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	var logs bytes.Buffer
	cfg := config(lab)
	cfg.Thumbprint = ""
	cfg.Insecure = true
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	c, err := vsphere.Connect(context.Background(), cfg)
	require.NoError(t, err)
	require.NoError(t, c.Close(context.Background()))
	assert.Contains(t, logs.String(), "level=WARN")
	assert.Contains(t, logs.String(), "insecure")
	assert.NotContains(t, logs.String(), lab.Password)
}

func TestConnectWrongPassword(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	var logs bytes.Buffer
	cfg := config(lab)
	cfg.Password = "wrong-" + lab.Password
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	_, err := vsphere.Connect(context.Background(), cfg)
	require.ErrorIs(t, err, vsphere.ErrLogin)
	assert.Contains(t, err.Error(), "invalid user name or password")
	assert.NotContains(t, err.Error(), cfg.Password)
	assert.NotContains(t, logs.String(), cfg.Password)
	assert.NotContains(t, fmt.Sprint(cfg), cfg.Password)
}

func TestFindVM(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	for _, ref := range []string{lab.VMMoref, "VirtualMachine:" + lab.VMMoref, lab.VMName, lab.VMPath} {
		vm, err := c.FindVM(ctx, ref)
		require.NoError(t, err, ref)
		assert.Equal(t, lab.VMMoref, vm.Reference().Value, ref)
	}
	for _, ref := range []string{"vm-999999", "no-such-vm", "/DC0/vm/no-such-vm", ""} {
		_, err := c.FindVM(ctx, ref)
		assert.ErrorIs(t, err, vsphere.ErrNotFound, ref)
	}
}

func TestInspectAndEnableCBT(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 3, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	vm := labVM(t, c, lab)

	info, err := c.Inspect(ctx, vm)
	require.NoError(t, err)
	assert.Equal(t, c.InstanceUUID(), info.InstanceUUID)
	assert.Equal(t, lab.VMMoref, info.Moref)
	assert.Equal(t, lab.VMName, info.Name)
	assert.Equal(t, "poweredOn", info.PowerState)
	assert.False(t, info.CBTEnabled)
	require.Len(t, info.Disks, 3)
	for i, d := range info.Disks {
		assert.Equal(t, lab.Disks[i].Key, d.Key)
		assert.Equal(t, int64(diskSize), d.CapacityBytes)
		assert.Equal(t, lab.Disks[i].BackingFile, d.BackingFile)
		assert.Equal(t, lab.Datastore, d.Datastore)
		assert.NotEmpty(t, d.Label)
		assert.Empty(t, d.ChangeID, "no changeId without CBT")
	}

	require.NoError(t, c.EnableCBT(ctx, vm))
	require.NoError(t, c.EnableCBT(ctx, vm), "enabling twice is a no-op")
	info, err = c.Inspect(ctx, vm)
	require.NoError(t, err)
	assert.True(t, info.CBTEnabled)
}

func TestSnapshotLifecycle(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 2, DiskSize: diskSize, CBT: true})
	c := connect(t, lab)
	ctx := context.Background()
	vm := labVM(t, c, lab)

	snap, err := c.CreateSnapshot(ctx, vm, "diskferry-wf1", true)
	require.NoError(t, err)
	assert.Equal(t, lab.VMMoref, snap.VMMoref)
	assert.True(t, strings.HasPrefix(snap.Moref, "snapshot-"), snap.Moref)

	list, err := c.ListSnapshots(ctx, vm)
	require.NoError(t, err)
	require.Len(t, list, 1)
	assert.Equal(t, snap.Moref, list[0].Moref)
	assert.Equal(t, "diskferry-wf1", list[0].Name)

	require.NoError(t, c.RemoveSnapshot(ctx, vm, snap.Moref))
	require.NoError(t, c.RemoveSnapshot(ctx, vm, snap.Moref), "removing twice is done")
	require.NoError(t, c.RemoveSnapshot(ctx, vm, "VirtualMachineSnapshot:"+snap.Moref))
	list, err = c.ListSnapshots(ctx, vm)
	require.NoError(t, err)
	assert.Empty(t, list)

	assert.Error(t, c.RemoveSnapshot(ctx, vm, "vm-1"), "not a snapshot moref")
}

// References no VM can have fail as such at once, not with errors that look transient
// ("please specify a datacenter", "cannot traverse up a tree").
func TestFindVMRejectsInvalidReferences(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	for _, ref := range []string{"a/b", "../../etc", "/DC0/vm/../vm/x", "/DC0//vm", "/DC0/./vm/x"} {
		_, err := c.FindVM(context.Background(), ref)
		assert.ErrorIs(t, err, vsphere.ErrInvalidReference, ref)
	}
}

// A request vCenter refuses (invalid argument, no permission) is told apart from a
// transient failure (insufficient resources), so the caller does not retry it.
func TestIsRefused(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	vm := labVM(t, c, lab)
	for _, tc := range []struct {
		fault   types.BaseMethodFault
		refused bool
	}{
		{&types.InvalidArgument{InvalidProperty: "name"}, true},
		{&types.NoPermission{PrivilegeId: "VirtualMachine.State.CreateSnapshot"}, true},
		{&types.InsufficientResourcesFault{}, false},
	} {
		lab.FailNext("CreateSnapshot_Task", tc.fault)
		_, err := c.CreateSnapshot(ctx, vm, "diskferry-refused", false)
		require.Error(t, err)
		assert.Equal(t, tc.refused, vsphere.IsRefused(err), "%T: %v", tc.fault, err)
	}
}

func TestSnapshotFaultsSurface(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	vm := labVM(t, c, lab)

	lab.FailNext("CreateSnapshot_Task", &types.InsufficientResourcesFault{})
	_, err := c.CreateSnapshot(ctx, vm, "diskferry-x", false)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "create snapshot")

	snap, err := c.CreateSnapshot(ctx, vm, "diskferry-x", false)
	require.NoError(t, err, "the fault fires once")
	lab.FailNext("RemoveSnapshot_Task", nil)
	require.Error(t, c.RemoveSnapshot(ctx, vm, snap.Moref))
	require.NoError(t, c.RemoveSnapshot(ctx, vm, snap.Moref))
}

func TestSnapshotGuardRefusesConcurrentTask(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	vm := labVM(t, c, lab)

	for _, method := range []string{"CreateSnapshot_Task", "RemoveSnapshot_Task"} {
		release := lab.HoldTask(method)
		_, err := c.CreateSnapshot(ctx, vm, "diskferry-guard", false)
		require.ErrorIs(t, err, vsphere.ErrSnapshotBusy, method)
		assert.Contains(t, err.Error(), method)
		assert.Regexp(t, `task task-\d+ `, err.Error())
		require.ErrorIs(t, c.RemoveSnapshot(ctx, vm, "snapshot-1"), vsphere.ErrSnapshotBusy)
		release()
	}
	release := lab.HoldTask("PowerOnVM_Task")
	defer release()
	snap, err := c.CreateSnapshot(ctx, vm, "diskferry-guard", false)
	require.NoError(t, err, "an unrelated running task does not block")
	require.NoError(t, c.RemoveSnapshot(ctx, vm, snap.Moref))
}

func TestSnapshotsByPrefix(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	vm := labVM(t, c, lab)

	for _, name := range []string{"diskferry-a", "operator-keep", "diskferry-b"} {
		_, err := c.CreateSnapshot(ctx, vm, name, false)
		require.NoError(t, err)
	}
	found, err := c.SnapshotsByPrefix(ctx, "diskferry-")
	require.NoError(t, err)
	var names []string
	for _, s := range found {
		names = append(names, s.Name)
		assert.Equal(t, lab.VMMoref, s.VMMoref)
		assert.NotEmpty(t, s.Moref)
	}
	assert.Equal(t, []string{"diskferry-a", "diskferry-b"}, names, "ours only, parent before child")

	_, err = c.SnapshotsByPrefix(ctx, "")
	assert.Error(t, err, "an empty prefix must not match everything")
}

func TestChangeIDsFromSnapshot(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 2, DiskSize: diskSize, CBT: true})
	c := connect(t, lab)
	ctx := context.Background()
	vm := labVM(t, c, lab)

	snap1, err := c.CreateSnapshot(ctx, vm, "diskferry-1", false)
	require.NoError(t, err)
	ids1, err := c.ChangeIDs(ctx, snap1.Moref)
	require.NoError(t, err)
	require.Len(t, ids1, 2)
	for _, d := range lab.Disks {
		assert.Regexp(t, `^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/0$`, ids1[d.Key])
	}

	require.NoError(t, lab.WriteDisk(lab.Disks[0].Key, 0, []byte("changed")))
	snap2, err := c.CreateSnapshot(ctx, vm, "diskferry-2", false)
	require.NoError(t, err)
	ids2, err := c.ChangeIDs(ctx, snap2.Moref)
	require.NoError(t, err)
	assert.NotEqual(t, ids1[lab.Disks[0].Key], ids2[lab.Disks[0].Key], "a written disk gets a new changeId")
	assert.Equal(t, ids1[lab.Disks[1].Key], ids2[lab.Disks[1].Key], "an untouched disk keeps its changeId")
	ids1again, err := c.ChangeIDs(ctx, snap1.Moref)
	require.NoError(t, err)
	assert.Equal(t, ids1, ids1again, "the older snapshot keeps its point in time")

	_, err = c.ChangeIDs(ctx, "snapshot-999999")
	assert.ErrorIs(t, err, vsphere.ErrNotFound)
}

func TestQueryChangedAreas(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 2, DiskSize: diskSize, CBT: true, MaxExtentsPerQuery: 3})
	c := connect(t, lab)
	ctx := context.Background()
	vm := labVM(t, c, lab)
	key := lab.Disks[0].Key

	base, err := c.CreateSnapshot(ctx, vm, "diskferry-base", false)
	require.NoError(t, err)
	baseIDs, err := c.ChangeIDs(ctx, base.Moref)
	require.NoError(t, err)

	// Full map: every allocated area, over several batches of 3.
	all, err := c.QueryChangedAreas(ctx, vm, base.Moref, key, diskSize, vsphere.AllAllocated)
	require.NoError(t, err)
	require.Greater(t, len(all), 3, "the generated content spans more than one batch")
	assert.Equal(t, lab.Allocated(key), all)

	// Writes: overlapping ones merge, touching ones join, and they span several batches.
	writes := []vsphere.Extent{
		{Start: 4096, Length: 4096}, {Start: 6144, Length: 8192}, // overlap → [4096, 14336)
		{Start: 1 << 20, Length: 512}, {Start: 1<<20 + 512, Length: 512}, // touch → one
		{Start: 3 << 20, Length: 65536}, {Start: 5 << 20, Length: 1},
		{Start: 7 << 20, Length: 4096}, {Start: 9 << 20, Length: 4096},
		{Start: diskSize - 4096, Length: 4096},
	}
	for _, w := range writes {
		_, err := lab.WriteRandom(key, w.Start, w.Length)
		require.NoError(t, err)
	}
	want := []vsphere.Extent{
		{Start: 4096, Length: 10240}, {Start: 1 << 20, Length: 1024},
		{Start: 3 << 20, Length: 65536}, {Start: 5 << 20, Length: 1},
		{Start: 7 << 20, Length: 4096}, {Start: 9 << 20, Length: 4096},
		{Start: diskSize - 4096, Length: 4096},
	}
	snap, err := c.CreateSnapshot(ctx, vm, "diskferry-incr", false)
	require.NoError(t, err)
	// Writes after the snapshot are not part of it.
	require.NoError(t, lab.WriteDisk(key, 12<<20, []byte("later")))

	got, err := c.QueryChangedAreas(ctx, vm, snap.Moref, key, diskSize, baseIDs[key])
	require.NoError(t, err)
	assert.Equal(t, want, got)

	other, err := c.QueryChangedAreas(ctx, vm, snap.Moref, lab.Disks[1].Key, diskSize, baseIDs[lab.Disks[1].Key])
	require.NoError(t, err)
	assert.Empty(t, other, "the untouched disk has no changes")

	// A changeId from another CBT identity is refused, so the caller can go full.
	foreign := "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/0"
	_, err = c.QueryChangedAreas(ctx, vm, snap.Moref, key, diskSize, foreign)
	require.ErrorIs(t, err, vsphere.ErrInvalidChangeID)
	require.NoError(t, lab.ResetCBT(key))
	snap3, err := c.CreateSnapshot(ctx, vm, "diskferry-after-reset", false)
	require.NoError(t, err)
	_, err = c.QueryChangedAreas(ctx, vm, snap3.Moref, key, diskSize, baseIDs[key])
	require.ErrorIs(t, err, vsphere.ErrInvalidChangeID)

	lab.FailNext("QueryChangedDiskAreas", nil)
	_, err = c.QueryChangedAreas(ctx, vm, snap.Moref, key, diskSize, vsphere.AllAllocated)
	require.Error(t, err, "injected fault")
	assert.NotErrorIs(t, err, vsphere.ErrInvalidChangeID)
}

func TestDiskFlatURLServesSnapshotDisk(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 2, DiskSize: diskSize, CBT: true})
	c := connect(t, lab)
	ctx := context.Background()
	vm := labVM(t, c, lab)
	disk := lab.Disks[1]

	snap, err := c.CreateSnapshot(ctx, vm, "diskferry-flat", false)
	require.NoError(t, err)
	flat, err := c.DiskFlatURL(ctx, snap.Moref, disk.Key)
	require.NoError(t, err)
	assert.Equal(t, int64(diskSize), flat.CapacityBytes)
	assert.Equal(t, lab.Datastore, flat.Datastore)
	assert.Contains(t, flat.URL, "/folder/"+lab.VMName+"/")
	assert.Contains(t, flat.URL, "-flat.vmdk?")
	assert.Contains(t, flat.URL, "dcPath="+lab.Datacenter)
	assert.Contains(t, flat.URL, "dsName="+lab.Datastore)

	client := pinnedHTTPClient(t, lab.Thumbprint)
	get := func(cookie string, from, to int64) (int, []byte) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, flat.URL, nil)
		require.NoError(t, err)
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", from, to))
		if cookie != "" {
			req.Header.Set("Cookie", cookie)
		}
		res, err := client.Do(req)
		require.NoError(t, err)
		defer res.Body.Close()
		body, err := io.ReadAll(res.Body)
		require.NoError(t, err)
		return res.StatusCode, body
	}

	alloc := lab.Allocated(disk.Key)[0]
	from, to := alloc.Start, alloc.Start+alloc.Length-1
	status, body := get(flat.Cookie, from, to)
	require.Equal(t, http.StatusPartialContent, status)
	want, err := lab.ReadDisk(disk.Key, from, to-from+1)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want, body), "range of the flat file")
	assert.NotEqual(t, make([]byte, len(body)), body, "generated content is not all zero")

	status, _ = get("", 0, 511)
	assert.Equal(t, http.StatusUnauthorized, status, "no cookie, no data")
	status, _ = get("vmware_soap_session=forged", 0, 511)
	assert.Equal(t, http.StatusUnauthorized, status)
	other := flat.URL
	flat.URL = strings.Replace(other, "dsName="+lab.Datastore, "dsName=nosuch", 1)
	status, _ = get(flat.Cookie, 0, 511)
	assert.Equal(t, http.StatusNotFound, status, "a datastore the lab does not have")
	flat.URL = other

	_, err = c.DiskFlatURL(ctx, snap.Moref, 424242)
	assert.ErrorIs(t, err, vsphere.ErrNotFound)
}

// pinnedHTTPClient trusts exactly the lab's certificate, like the vsphere client does.
func pinnedHTTPClient(t *testing.T, thumbprint string) *http.Client {
	t.Helper()
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			InsecureSkipVerify: true, // replaced by the thumbprint check below
			VerifyConnection: func(cs tls.ConnectionState) error {
				if got := thumbprintSHA1(cs.PeerCertificates[0].Raw); got != thumbprint {
					return errors.New("thumbprint " + got + " is not the lab's")
				}
				return nil
			},
		}},
	}
}

func TestKeepAliveHoldsSession(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	ctx := context.Background()
	require.NoError(t, lab.SetSessionTimeout(ctx, 300*time.Millisecond))

	cfg := config(lab)
	cfg.KeepAlive = 50 * time.Millisecond
	kept, err := vsphere.Connect(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = kept.Close(ctx) })

	cfg.KeepAlive = time.Hour
	idle, err := vsphere.Connect(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = idle.Close(ctx) })

	time.Sleep(time.Second)
	_, err = kept.FindVM(ctx, lab.VMMoref)
	assert.NoError(t, err, "the keepalive kept the session")
	_, err = idle.FindVM(ctx, lab.VMMoref)
	assert.Error(t, err, "an idle session expires: proves the timeout applies")
}
