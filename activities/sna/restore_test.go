package sna_test

import (
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/worker"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/sna"
	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/limits"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
)

const restoreDiskSize = 32 << 20

// pointImage makes a restore point's qcow2: random data in a few places, holes between,
// converted from a raw image the way a chain is flattened (the bytes are what counts).
func (r *rig) pointImage(name string, size int64) string {
	r.t.Helper()
	raw := filepath.Join(r.dir, name+".raw")
	require.NoError(r.t, os.WriteFile(raw, nil, 0o600))
	require.NoError(r.t, os.Truncate(raw, size))
	for _, at := range []int64{0, 3 << 20, size/2 + 4096, size - (1 << 20)} {
		data := make([]byte, 700<<10)
		_, err := rand.Read(data)
		require.NoError(r.t, err)
		testenv.WriteFileAt(r.t, raw, at, data[:min(int64(len(data)), size-at)])
	}
	image := filepath.Join(r.dir, name+".qcow2")
	out, err := exec.Command(testenv.RequireCommand(r.t, "qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2", raw, image).CombinedOutput()
	require.NoError(r.t, err, "%s", out)
	return image
}

// startPointExport serves a point read-only on the next export port, as the hub's
// StartExport{ReadOnly: true} does.
func (r *rig) startPointExport(image, name string) export {
	r.t.Helper()
	port := r.nextPort
	r.nextPort++
	opts := qemu.ExportOptions{
		Path: image, Socket: r.sshd.ExportSocket(port), Name: name, Connections: 4, ReadOnly: true,
		PidFile: filepath.Join(r.dir, name+"-"+strconv.Itoa(port)+".pid"),
	}
	exp, err := qemu.Start(context.Background(), opts)
	require.NoError(r.t, err)
	r.t.Cleanup(func() { _ = exp.Stop(context.Background(), 0) })
	return export{Export: exp, Port: port, image: image, opts: opts}
}

func (r *rig) requireFlatIs(backingFile, image string) {
	r.t.Helper()
	flat, err := r.lab.FlatPath(backingFile)
	require.NoError(r.t, err)
	res, err := qemu.Compare(context.Background(), qemu.Raw(flat), qemu.QCOW2(image))
	require.NoError(r.t, err)
	require.True(r.t, res.Equal, "%s against %s: %s", flat, image, res.Message)
}

// The restore of a 2-disk point into a new VM over https: create the VM of the point's
// shape, tunnel to the read-only exports, write each disk, read it back; the new VM's flat
// files are the points' disks byte for byte. A corrupted flat file fails the read-back.
func TestRestoreIntoNewVMOverHTTPSRoundTrip(t *testing.T) {
	r := newRig(t, vcsimtest.Options{Disks: 2, DiskSize: restoreDiskSize})
	var mu sync.Mutex
	var beats []activities.CopyProgress
	tap := &heartbeatTap{record: func(p activities.CopyProgress) {
		mu.Lock()
		beats = append(beats, p)
		mu.Unlock()
	}}
	a := r.activities("", nil)
	env := r.env(a)
	env.SetWorkerOptions(worker.Options{Interceptors: []interceptor.WorkerInterceptor{tap}})

	src := execute[activities.VM](t, env, activities.InspectVMName, activities.InspectVMInput{VM: r.lab.VMMoref})
	create := activities.CreateRestoreVMInput{WorkflowID: "restore-wf-1", Spec: activities.RestoreVMSpec{
		Name: src.Name + "-restore-p1", Config: src.Config, SourceVMMoref: src.Moref}}
	vm := execute[activities.RestoreVM](t, env, activities.CreateRestoreVMName, create)
	require.Len(t, vm.Disks, 2)
	again := execute[activities.RestoreVM](t, env, activities.CreateRestoreVMName, create)
	require.Equal(t, vm, again, "a retried create finds the VM")

	exports := make([]export, 2)
	images := make([]string, 2)
	for i, d := range src.Disks {
		images[i] = r.pointImage("point-"+strconv.Itoa(int(d.Key)), restoreDiskSize)
		exports[i] = r.startPointExport(images[i], "disk-"+strconv.Itoa(int(d.Key)))
	}
	fw := execute[activities.Forwards](t, env, activities.EnsureTunnelName, tunnelInput(exports...))
	for _, e := range exports {
		sock := fw.Sockets[e.Port]
		require.NotEmpty(t, sock, "port %d", e.Port)
		st, err := os.Stat(sock)
		require.NoError(t, err)
		require.Equal(t, os.ModeSocket, st.Mode().Type(), "the forward's SNA-side socket")
	}

	for i, m := range vm.Disks {
		require.Equal(t, src.Disks[i].Key, m.PointKey)
		in := activities.WriteDiskInput{HubID: hubID, SourcePort: exports[i].Port, SourceSocket: exports[i].Socket,
			ExportName: exports[i].opts.Name, VMMoref: vm.Moref, DiskKey: m.VMKey, CapacityBytes: restoreDiskSize}
		res := execute[activities.WriteDiskResult](t, env, activities.WriteDiskName, in)
		require.Equal(t, m.VMKey, res.DiskKey)
		want, err := blockcopy.ComputeDigest(context.Background(), exports[i].URI(), blockcopy.Options{BlockSize: res.BlockSize})
		require.NoError(t, err)
		require.Equal(t, want, res.Digest, "the digest of the whole point disk")
		require.Zero(t, res.BytesRecopied)
		r.requireFlatIs(m.BackingFile, images[i])

		back := execute[activities.ReadBackResult](t, env, activities.ReadBackDiskName,
			activities.ReadBackDiskInput{VMMoref: vm.Moref, DiskKey: m.VMKey, BlockSize: res.BlockSize, Digest: res.Digest})
		require.Equal(t, int64(restoreDiskSize), back.BytesRead)

		if i == 1 {
			flat, err := r.lab.FlatPath(m.BackingFile)
			require.NoError(t, err)
			testenv.WriteFileAt(t, flat, 5<<20, []byte("bit rot"))
			_, err = env.ExecuteActivity(activities.ReadBackDiskName,
				activities.ReadBackDiskInput{VMMoref: vm.Moref, DiskKey: m.VMKey, BlockSize: res.BlockSize, Digest: res.Digest})
			appErr := requireAppError(t, err, activities.ErrMismatch)
			require.Contains(t, appErr.Error(), "disk "+strconv.Itoa(int(m.VMKey))+" of VM "+vm.Moref)
		}
	}
	mu.Lock()
	require.NotEmpty(t, beats)
	last := beats[len(beats)-1]
	mu.Unlock()
	require.Equal(t, int64(restoreDiskSize), last.BytesTotal)

	execute[struct{}](t, env, activities.DestroyRestoreVMName,
		activities.DestroyRestoreVMInput{WorkflowID: "restore-wf-1", Name: vm.Name, Moref: vm.Moref})
	execute[struct{}](t, env, activities.DestroyRestoreVMName,
		activities.DestroyRestoreVMInput{WorkflowID: "restore-wf-1", Name: vm.Name}) // gone: success
	_, err := r.vc.FindVM(context.Background(), vm.Moref)
	require.Error(t, err)
}

// A retried https attempt starts over and says how much it redid; a powered-on VM is
// refused before anything is written.
func TestWriteDiskRetryRecopiesAndPoweredOnIsRefused(t *testing.T) {
	r := newRig(t, vcsimtest.Options{Disks: 1, DiskSize: restoreDiskSize})
	a := r.activities("", nil)
	env := r.env(a)
	key := r.lab.Disks[0].Key
	image := r.pointImage("point", restoreDiskSize)
	exp := r.startPointExport(image, "disk-"+strconv.Itoa(int(key)))
	execute[activities.Forwards](t, env, activities.EnsureTunnelName, tunnelInput(exp))
	in := activities.WriteDiskInput{HubID: hubID, SourcePort: exp.Port, SourceSocket: exp.Socket,
		ExportName: exp.opts.Name, VMMoref: r.lab.VMMoref, DiskKey: key, CapacityBytes: restoreDiskSize}

	before, err := os.ReadFile(r.lab.Disks[0].FlatPath)
	require.NoError(t, err)
	execute[struct{}](t, env, activities.SetPowerName, activities.SetPowerInput{VMMoref: r.lab.VMMoref, State: activities.PowerOn})
	_, err = env.ExecuteActivity(activities.WriteDiskName, in)
	appErr := requireAppError(t, err, activities.ErrPoweredOn)
	require.Contains(t, appErr.Error(), "poweredOn")
	after, err := os.ReadFile(r.lab.Disks[0].FlatPath)
	require.NoError(t, err)
	require.Equal(t, before, after, "nothing written")

	execute[struct{}](t, env, activities.SetPowerName, activities.SetPowerInput{VMMoref: r.lab.VMMoref, State: activities.PowerOff})
	execute[struct{}](t, env, activities.SetPowerName, activities.SetPowerInput{VMMoref: r.lab.VMMoref, State: activities.PowerOff})
	retry := r.env(a)
	retry.SetHeartbeatDetails(activities.CopyProgress{BytesDone: 12 << 20, BytesTotal: restoreDiskSize})
	res := execute[activities.WriteDiskResult](t, retry, activities.WriteDiskName, in)
	require.Equal(t, int64(12<<20), res.BytesRecopied, "the datastore takes the file whole: the retry redid what was sent")
	r.requireFlatIs(r.lab.Disks[0].BackingFile, image)
}

// The refusals that create nothing reach the workflow as non-retryable BadInput errors
// naming the field.
func TestCreateRestoreVMRefusals(t *testing.T) {
	r := newRig(t, vcsimtest.Options{Disks: 1, DiskSize: restoreDiskSize})
	env := r.env(r.activities("", nil))
	src := execute[activities.VM](t, env, activities.InspectVMName, activities.InspectVMInput{VM: r.lab.VMMoref})

	_, err := env.ExecuteActivity(activities.CreateRestoreVMName, activities.CreateRestoreVMInput{WorkflowID: "wf",
		Spec: activities.RestoreVMSpec{Name: r.lab.VMName, Config: src.Config, SourceVMMoref: src.Moref}})
	appErr := requireAppError(t, err, activities.ErrBadInput)
	require.Contains(t, appErr.Error(), "name: a VM named "+r.lab.VMName+" already exists in vCenter")

	big := *src.Config
	big.Disks = append([]activities.DiskLayout(nil), big.Disks...)
	big.Disks[0].CapacityBytes = 1 << 60
	_, err = env.ExecuteActivity(activities.CreateRestoreVMName, activities.CreateRestoreVMInput{WorkflowID: "wf",
		Spec: activities.RestoreVMSpec{Name: "big", Config: &big, SourceVMMoref: src.Moref}})
	appErr = requireAppError(t, err, activities.ErrBadInput)
	require.Contains(t, appErr.Error(), "datastore: "+r.lab.Datastore+" has ")
	require.Contains(t, appErr.Error(), "free, the disks need")
	_, err = r.vc.FindVM(context.Background(), "big")
	require.Error(t, err, "nothing created")

	_, err = env.ExecuteActivity(activities.CreateRestoreVMName, activities.CreateRestoreVMInput{WorkflowID: "wf",
		Spec: activities.RestoreVMSpec{Name: "x"}})
	requireAppError(t, err, activities.ErrBadInput)
}

// An https restore is paced like a backup's copy: by its job's limit (WriteDiskInput's,
// from RestoreInput.Bandwidth) and by the site's (DISKFERRY_SITE_BANDWIDTH). A token bucket
// lets through at most its burst plus the rate times the time taken, so the margin only
// covers the burst, never the machine's speed.
func TestWriteDiskOverHTTPSIsPaced(t *testing.T) {
	const rate = 8 << 20
	r := newRig(t, vcsimtest.Options{Disks: 1, DiskSize: restoreDiskSize})
	key := r.lab.Disks[0].Key
	image := r.pointImage("point", restoreDiskSize)
	exp := r.startPointExport(image, "disk-"+strconv.Itoa(int(key)))
	for _, c := range []struct {
		name      string
		job, site int64
	}{
		{name: "job limit", job: rate},
		{name: "site limit", site: rate},
	} {
		a := r.activities("", func(s *sna.Settings) { s.SiteBandwidth = c.site })
		env := r.env(a)
		execute[struct{}](t, env, activities.SetPowerName, activities.SetPowerInput{VMMoref: r.lab.VMMoref, State: activities.PowerOff})
		execute[activities.Forwards](t, env, activities.EnsureTunnelName, tunnelInput(exp))
		in := activities.WriteDiskInput{HubID: hubID, SourcePort: exp.Port, SourceSocket: exp.Socket, ExportName: exp.opts.Name,
			VMMoref: r.lab.VMMoref, DiskKey: key, CapacityBytes: restoreDiskSize, BandwidthBytesPerSec: c.job}
		start := time.Now()
		res := execute[activities.WriteDiskResult](t, env, activities.WriteDiskName, in)
		elapsed := time.Since(start)
		require.Equal(t, int64(restoreDiskSize), res.BytesWritten+res.BytesZeroed, "%s: the whole flat file was sent", c.name)
		speed := float64(restoreDiskSize) / elapsed.Seconds()
		t.Logf("%s: %d bytes in %s: %s under a limit of %s", c.name, restoreDiskSize, elapsed, limits.FormatRate(int64(speed)), limits.FormatRate(rate))
		require.LessOrEqual(t, speed, 1.5*rate, "%s: %d bytes in %s is %s, over the limit of %s",
			c.name, restoreDiskSize, elapsed, limits.FormatRate(int64(speed)), limits.FormatRate(rate))
		r.requireFlatIs(r.lab.Disks[0].BackingFile, image)
	}
}
