package sna_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/worker"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/sna"
	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/nbdkit"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/tunnel"
	"github.com/diskferry/diskferry/internal/vsphere"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
)

const (
	hubID    = "hub-test"
	diskSize = 64 << 20
	// resumeDiskSize holds about 64 MiB of data.
	resumeDiskSize = 256 << 20
)

// rig is the SNA's world on one host: a vcsim lab (vCenter with CBT), a real sshd standing
// in for the hub's, and hub-side qemu-nbd exports created per test.
type rig struct {
	t        *testing.T
	lab      *vcsimtest.Lab
	vc       *vsphere.Client
	sshd     *testenv.SSHD
	dir      string
	log      *slog.Logger
	suite    testsuite.WorkflowTestSuite
	tunnels  *sna.Tunnels // of the last activities built
	nextPort int          // the next export port to lease
}

func newRig(t *testing.T, lab vcsimtest.Options) *rig {
	t.Helper()
	testenv.RequireCommand(t, "nbdkit")
	testenv.RequireCommand(t, "qemu-nbd")
	testenv.RequireCommand(t, "qemu-img")
	ctx := context.Background()
	r := &rig{t: t, dir: t.TempDir(), log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		nextPort: testenv.SSHDExportPortMin}
	r.lab = vcsimtest.NewLab(t, lab)
	vc, err := vsphere.Connect(ctx, vsphere.Config{
		URL: r.lab.URL, User: r.lab.User, Password: r.lab.Password, Thumbprint: r.lab.Thumbprint, Logger: r.log,
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = vc.Close(context.Background()) })
	r.vc = vc
	r.sshd = testenv.StartSSHD(t)
	return r
}

// activities builds the SNA activities with a tunnel pool to the rig's sshd; knownHosts
// overrides the pinned host keys when set.
func (r *rig) activities(knownHosts string, tweak func(*sna.Settings)) *sna.Activities {
	r.t.Helper()
	if knownHosts == "" {
		knownHosts = r.sshd.KnownHostsPath
	}
	tunnels := sna.NewTunnels(func(id string) (tunnel.Config, error) {
		if id != hubID {
			return tunnel.Config{}, fmt.Errorf("unknown hub %q", id)
		}
		return tunnel.Config{Addr: r.sshd.Addr, User: r.sshd.User, KeyFile: r.sshd.ClientKeyPath, KnownHostsFile: knownHosts}, nil
	}, r.log)
	r.t.Cleanup(func() { _ = tunnels.Close() })
	r.tunnels = tunnels
	s := sna.Settings{
		Transport:      sna.TransportHTTPS,
		Thumbprint:     r.lab.Thumbprint,
		Connections:    4,
		HeartbeatEvery: 50 * time.Millisecond,
	}
	if tweak != nil {
		tweak(&s)
	}
	return sna.New(r.vc, tunnels, s, r.log)
}

// env is a fresh activity environment (one per concurrent activity) with the activities
// registered under their contract names.
func (r *rig) env(a *sna.Activities) *testsuite.TestActivityEnvironment {
	env := r.suite.NewTestActivityEnvironment()
	a.Register(env)
	env.SetTestTimeout(2 * time.Minute)
	return env
}

// export is a hub-side qemu-nbd serving a qcow2 on the unix socket of its port, where the
// rig's sshd lets the SNA's key reach it.
type export struct {
	*qemu.Export
	Port  int // its port lease
	image string
	opts  qemu.ExportOptions
}

// startExport serves image (created empty at size unless it exists) on the socket of the
// next export port.
func (r *rig) startExport(image, name string, size int64) export {
	r.t.Helper()
	ctx := context.Background()
	if _, err := os.Stat(image); errors.Is(err, os.ErrNotExist) {
		require.NoError(r.t, qemu.CreateImage(ctx, image, size))
	}
	port := r.nextPort
	r.nextPort++
	opts := qemu.ExportOptions{
		Path: image, Socket: r.sshd.ExportSocket(port), Name: name, Connections: 4,
		PidFile: filepath.Join(r.dir, name+"-"+strconv.Itoa(port)+".pid"),
	}
	exp, err := qemu.Start(ctx, opts)
	require.NoError(r.t, err)
	r.t.Cleanup(func() {
		if running, err := qemu.Find(opts.PidFile); err == nil {
			_ = running.Stop(context.Background(), 0)
		}
	})
	return export{Export: exp, Port: port, image: image, opts: opts}
}

// tunnelInput is the EnsureTunnel input for exports, as the workflow builds it.
func tunnelInput(exports ...export) activities.EnsureTunnelInput {
	in := activities.EnsureTunnelInput{HubID: hubID, Sockets: map[int]string{}}
	for _, e := range exports {
		in.Ports = append(in.Ports, e.Port)
		in.Sockets[e.Port] = e.Socket
	}
	return in
}

func execute[T any](t *testing.T, env *testsuite.TestActivityEnvironment, name string, args ...any) T {
	t.Helper()
	val, err := env.ExecuteActivity(name, args...)
	require.NoError(t, err, "%s", name)
	var out T
	if val != nil && val.HasValue() {
		require.NoError(t, val.Get(&out))
	}
	return out
}

func (r *rig) snapshot(env *testsuite.TestActivityEnvironment, vm activities.VM, name string) activities.Snapshot {
	r.t.Helper()
	s := execute[activities.Snapshot](r.t, env, activities.CreateSnapshotName,
		activities.CreateSnapshotInput{VMMoref: vm.Moref, Name: name})
	r.t.Cleanup(func() { _, _ = env.ExecuteActivity(activities.RemoveSnapshotName, s) })
	return s
}

// compareFlat asserts the image reads exactly like the lab disk's flat file.
func (r *rig) compareFlat(image string, key int32) {
	r.t.Helper()
	disk, err := r.lab.Disk(key)
	require.NoError(r.t, err)
	res, err := qemu.Compare(context.Background(), qemu.QCOW2(image), qemu.Raw(disk.FlatPath))
	require.NoError(r.t, err)
	require.True(r.t, res.Equal, "disk %d: %s", key, res.Message)
}

// requireDigest recomputes the copy's digest from the target, as the hub's VerifyTarget does.
func requireDigest(t *testing.T, exp export, res activities.CopyDiskResult) {
	t.Helper()
	var areas []blockcopy.Extent
	if res.Areas != nil {
		areas = make([]blockcopy.Extent, len(res.Areas))
		for i, a := range res.Areas {
			areas[i] = blockcopy.Extent{Start: a.Start, Length: a.Length}
		}
	}
	want, err := blockcopy.ComputeDigest(context.Background(), exp.URI(), blockcopy.Options{Areas: areas, BlockSize: res.BlockSize})
	require.NoError(t, err)
	require.Equal(t, want, res.Digest, "digest of disk %d", res.DiskKey)
}

func allocatedBytes(l *vcsimtest.Lab, key int32) int64 {
	var n int64
	for _, e := range l.Allocated(key) {
		n += e.Length
	}
	return n
}

// The whole backup path of a 2-disk VM: inspect, snapshot, tunnel, full copy of both disks
// in parallel, then changes, a second snapshot and an incremental copy into overlays.
func TestFullThenIncrementalThroughTunnel(t *testing.T) {
	r := newRig(t, vcsimtest.Options{Disks: 2, DiskSize: diskSize, CBT: true, Seed: 11})
	a := r.activities("", nil)
	env := r.env(a)

	vm := execute[activities.VM](t, env, activities.InspectVMName, activities.InspectVMInput{VM: r.lab.VMPath})
	require.Equal(t, r.lab.VMMoref, vm.Moref)
	require.True(t, vm.CBTEnabled)
	require.Len(t, vm.Disks, 2)
	for i, d := range vm.Disks {
		require.Equal(t, r.lab.Disks[i].Key, d.Key)
		require.Equal(t, int64(diskSize), d.CapacityBytes)
		require.Equal(t, r.lab.Disks[i].BackingFile, d.BackingFile)
		require.NotEmpty(t, d.ChangeID)
	}

	// Snapshot: a retried create finds the first one; remove twice is fine.
	snap := r.snapshot(env, vm, "diskferry-wf-full")
	again := execute[activities.Snapshot](t, env, activities.CreateSnapshotName,
		activities.CreateSnapshotInput{VMMoref: vm.Moref, Name: "diskferry-wf-full"})
	require.Equal(t, snap, again)

	// Hub side: one fresh qcow2 export per disk; SNA side: the tunnel.
	exports := make([]export, len(vm.Disks))
	for i, d := range vm.Disks {
		exports[i] = r.startExport(filepath.Join(r.dir, fmt.Sprintf("full-%d.qcow2", d.Key)), fmt.Sprintf("full-%d", d.Key), diskSize)
	}
	tin := tunnelInput(exports...)
	execute[struct{}](t, env, activities.EnsureTunnelName, tin)
	execute[struct{}](t, env, activities.EnsureTunnelName, tin) // idempotent

	copyAll := func(snap activities.Snapshot, exports []export, mode string, prev map[int32]string) []activities.CopyDiskResult {
		t.Helper()
		results := make([]activities.CopyDiskResult, len(vm.Disks))
		errs := make([]error, len(vm.Disks))
		var wg sync.WaitGroup
		for i, d := range vm.Disks {
			wg.Go(func() {
				val, err := r.env(a).ExecuteActivity(activities.CopyDiskName, activities.CopyDiskInput{
					Snapshot: snap, DiskKey: d.Key, CapacityBytes: d.CapacityBytes,
					TargetPort: exports[i].Port, HubID: hubID, TargetSocket: exports[i].Socket, ExportName: exports[i].Name,
					Mode: mode, PrevChangeID: prev[d.Key], Connections: 4,
				})
				if err == nil {
					err = val.Get(&results[i])
				}
				errs[i] = err
			})
		}
		wg.Wait()
		require.NoError(t, errors.Join(errs...))
		return results
	}

	full := copyAll(snap, exports, activities.ModeFull, nil)
	for i, d := range vm.Disks {
		res := full[i]
		require.Equal(t, d.Key, res.DiskKey)
		// Only the CBT-allocated areas are read: the rest of a fresh qcow2 is already zero.
		require.Equal(t, allocatedBytes(r.lab, d.Key), res.BytesRead, "disk %d", d.Key)
		require.Less(t, res.BytesRead, int64(diskSize))
		require.Zero(t, res.BytesRecopied)
		requireDigest(t, exports[i], res)
	}
	ids := execute[map[int32]string](t, env, activities.ReadChangeIDsName, activities.ReadChangeIDsInput{Snapshot: snap})
	for _, d := range vm.Disks {
		require.Equal(t, r.lab.ChangeID(d.Key), ids[d.Key])
	}
	execute[struct{}](t, env, activities.RemoveSnapshotName, snap)
	execute[struct{}](t, env, activities.RemoveSnapshotName, snap) // already gone counts as removed

	// A create whose reply was lost leaves only the name to the compensation.
	lost := r.snapshot(env, vm, "diskferry-wf-lost")
	other := r.snapshot(env, vm, "diskferry-wf-lost-not")
	execute[struct{}](t, env, activities.RemoveSnapshotName, activities.Snapshot{VMMoref: vm.Moref, Name: lost.Name})
	vmObj, err := r.vc.FindVM(context.Background(), vm.Moref)
	require.NoError(t, err)
	left, err := r.vc.ListSnapshots(context.Background(), vmObj)
	require.NoError(t, err)
	require.Len(t, left, 1, "only the exactly named snapshot is removed")
	require.Equal(t, other.Moref, left[0].Moref)
	execute[struct{}](t, env, activities.RemoveSnapshotName, other)

	execute[struct{}](t, env, activities.DropTunnelName, tin)
	execute[struct{}](t, env, activities.DropTunnelName, tin) // idempotent
	m, err := r.tunnels.Get(hubID)
	require.NoError(t, err)
	_, err = net.DialTimeout("unix", m.SocketPath(exports[0].Port), time.Second)
	require.Error(t, err, "the SNA-side listener is gone after DropTunnel")

	for i, d := range vm.Disks {
		require.NoError(t, exports[i].Stop(context.Background(), 0))
		// vcsim makes no delta disks: the flat file is the snapshot's content until written.
		r.compareFlat(exports[i].image, d.Key)
	}

	// Changes on disk 0 only; disk 1 stays as it was.
	changed := vm.Disks[0].Key
	var changedBytes int64
	for _, w := range []struct{ off, n int64 }{{5<<20 + 4096, 300 << 10}, {17 << 20, 1 << 20}, {40<<20 + 512, 7 << 10}} {
		_, err := r.lab.WriteRandom(changed, w.off, w.n)
		require.NoError(t, err)
		changedBytes += w.n
	}
	snap2 := r.snapshot(env, vm, "diskferry-wf-incr")
	overlays := make([]export, len(vm.Disks))
	for i, d := range vm.Disks {
		overlay := filepath.Join(r.dir, fmt.Sprintf("incr-%d.qcow2", d.Key))
		require.NoError(t, qemu.CreateOverlay(context.Background(), overlay, exports[i].image))
		overlays[i] = r.startExport(overlay, fmt.Sprintf("incr-%d", d.Key), diskSize)
	}
	tin2 := tunnelInput(overlays...)
	execute[struct{}](t, env, activities.EnsureTunnelName, tin2)
	incr := copyAll(snap2, overlays, activities.ModeIncremental, ids)

	require.LessOrEqual(t, incr[0].BytesRead, changedBytes*105/100)
	require.LessOrEqual(t, incr[0].BytesWritten+incr[0].BytesZeroed, changedBytes*105/100)
	require.Greater(t, incr[0].BytesWritten, int64(0))
	require.NotEmpty(t, incr[0].Areas)
	require.Zero(t, incr[1].BytesRead, "unchanged disk reads nothing")
	require.Zero(t, incr[1].BytesWritten, "unchanged disk writes nothing")
	// An unchanged disk copies no areas, which must reach the hub as [] and not as nil (the
	// whole disk), or VerifyTarget hashes the whole disk and rejects the copy.
	require.NotNil(t, incr[1].Areas, "CopyDiskResult.Areas [] became nil through JSON: drop omitempty in activities/contract.go")
	t.Logf("incremental: changed %d bytes, read %d, written %d", changedBytes, incr[0].BytesRead, incr[0].BytesWritten)
	for i, d := range vm.Disks {
		requireDigest(t, overlays[i], incr[i])
		require.NoError(t, overlays[i].Stop(context.Background(), 0))
		r.compareFlat(overlays[i].image, d.Key)
	}
	execute[struct{}](t, env, activities.DropTunnelName, tin2)
}

// slowCopy is a full copy of a resumeDiskSize disk holding total bytes of data, from a
// source slowed to about 4 s for the data (no initial burst) and checkpointing every 200 ms,
// into a fresh export reached through the tunnel: long enough for a test to break it mid-way
// with a checkpoint behind it.
type slowCopy struct {
	r     *rig
	slow  *sna.Activities // the activities reading slowly
	env   *testsuite.TestActivityEnvironment
	exp   export
	in    activities.CopyDiskInput
	key   int32
	total int64
}

func newSlowCopy(t *testing.T, seed uint64, name string, connections int) slowCopy {
	t.Helper()
	r := newRig(t, vcsimtest.Options{Disks: 1, DiskSize: resumeDiskSize, CBT: true, Seed: seed})
	c := slowCopy{r: r, key: r.lab.Disks[0].Key}
	c.total = allocatedBytes(r.lab, c.key)
	c.slow = r.activities("", func(s *sna.Settings) {
		s.SourceFilters = []nbdkit.Filter{{Name: "rate", Params: map[string]string{
			"rate": strconv.FormatInt(c.total*8/4, 10), "burstiness": "0.1",
		}}}
		s.CheckpointEvery = 200 * time.Millisecond
	})
	c.env = r.env(c.slow)
	vm := execute[activities.VM](t, c.env, activities.InspectVMName, activities.InspectVMInput{VM: r.lab.VMMoref})
	snap := r.snapshot(c.env, vm, "diskferry-wf-"+name)
	c.exp = r.startExport(filepath.Join(r.dir, name+".qcow2"), name, resumeDiskSize)
	execute[struct{}](t, c.env, activities.EnsureTunnelName, tunnelInput(c.exp))
	c.in = activities.CopyDiskInput{
		Snapshot: snap, DiskKey: c.key, CapacityBytes: resumeDiskSize,
		TargetPort: c.exp.Port, HubID: hubID, TargetSocket: c.exp.Socket, ExportName: c.exp.Name,
		Mode: activities.ModeFull, Connections: connections,
	}
	return c
}

// A copy killed mid-way resumes from the checkpoint of its last heartbeat on the next
// attempt, re-copies only what lay beyond it (and reports that), and ends identical to the
// source with a digest that spans both attempts.
func TestCopyResumesFromCheckpoint(t *testing.T) {
	// Big enough that the chunks in flight when the first attempt stops are a small part of
	// it; one connection keeps few chunks in flight, so the first attempt stops early.
	c := newSlowCopy(t, 12, "resume", 1)
	r, slow, env, exp, in, key, total := c.r, c.slow, c.env, c.exp, c.in, c.key, c.total

	// The worker "dies" at the first heartbeat past a quarter of the data that carries a
	// checkpoint: that heartbeat is the last the server got, its successor starts from it.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	var lastBeat activities.CopyProgress
	heartbeats := &heartbeatTap{record: func(p activities.CopyProgress) {
		mu.Lock()
		defer mu.Unlock()
		if ctx.Err() == nil && p.Checkpoint > 0 && p.BytesDone >= total/4 {
			lastBeat = p
			cancel()
		}
	}}
	first := r.suite.NewTestActivityEnvironment()
	first.SetWorkerOptions(worker.Options{BackgroundActivityContext: ctx, Interceptors: []interceptor.WorkerInterceptor{heartbeats}})
	slow.Register(first)
	_, err := first.ExecuteActivity(activities.CopyDiskName, in)
	require.Error(t, err, "the first attempt was stopped")
	mu.Lock()
	progress := lastBeat
	mu.Unlock()
	require.Greater(t, progress.Checkpoint, int64(0))
	require.Less(t, progress.BytesDone, total, "the first attempt stopped mid-way")

	// The second attempt runs in a restarted SNA: the forward EnsureTunnel made is gone.
	execute[struct{}](t, env, activities.DropTunnelName, tunnelInput(exp))
	second := r.env(r.activities("", nil))
	second.SetHeartbeatDetails(progress)
	res := execute[activities.CopyDiskResult](t, second, activities.CopyDiskName, in)
	t.Logf("resume: checkpoint at %d with %d stretches finished ahead, %d of %d bytes done at the last heartbeat; the second attempt read %d, re-copied %d",
		progress.Checkpoint, len(progress.Ahead), progress.BytesDone, total, res.BytesRead, res.BytesRecopied)
	require.Less(t, res.BytesRead, total, "the second attempt skipped what lay below the checkpoint")
	// Work the first attempt finished after the heartbeated checkpoint was flushed is redone
	// and reported (what was finished ahead of it by then is not); the rest was read once.
	require.GreaterOrEqual(t, res.BytesRecopied, int64(0))
	require.LessOrEqual(t, res.BytesRecopied, progress.BytesDone)
	require.Equal(t, total, res.BytesRead+progress.BytesDone-res.BytesRecopied,
		"the second attempt read exactly what the checkpoint did not cover")
	requireDigest(t, exp, res)
	require.NoError(t, exp.Stop(context.Background(), 0))
	r.compareFlat(exp.image, key)
}

// A copy whose hub export is killed mid-way fails naming the dead export, not the tunnel;
// once the export is back on the same socket (the hub's reconcile restarts it), the
// next attempt goes through the same forward and resumes from the checkpoint.
func TestCopyResumesAfterExportKilled(t *testing.T) {
	c := newSlowCopy(t, 13, "killed", 2)
	r, a, exp, in, key, total := c.r, c.slow, c.exp, c.in, c.key, c.total

	// SIGKILL of qemu-nbd at the first heartbeat past a quarter of the data with a checkpoint.
	var mu sync.Mutex
	var lastBeat activities.CopyProgress
	killed := false
	heartbeats := &heartbeatTap{record: func(p activities.CopyProgress) {
		mu.Lock()
		defer mu.Unlock()
		if !killed && p.Checkpoint > 0 && p.BytesDone >= total/4 {
			lastBeat = p
			killed = true
			require.NoError(t, syscall.Kill(exp.PID, syscall.SIGKILL))
		}
	}}
	first := r.suite.NewTestActivityEnvironment()
	first.SetWorkerOptions(worker.Options{Interceptors: []interceptor.WorkerInterceptor{heartbeats}})
	first.SetTestTimeout(2 * time.Minute)
	a.Register(first)
	_, err := first.ExecuteActivity(activities.CopyDiskName, in)
	require.Error(t, err, "the copy survived its export")
	require.Contains(t, err.Error(), fmt.Sprintf("export on hub %s port %d is not running (qemu-nbd gone?)", hubID, exp.Port))
	mu.Lock()
	progress := lastBeat
	mu.Unlock()
	require.Greater(t, progress.Checkpoint, int64(0))

	// The retried attempt while the export is still down fails the same way, quickly.
	retry := r.env(a)
	retry.SetHeartbeatDetails(progress)
	_, err = retry.ExecuteActivity(activities.CopyDiskName, in)
	require.ErrorContains(t, err, "is not running (qemu-nbd gone?)")

	// What the hub's reconcile does: the same target on the same socket.
	restarted, err := qemu.Start(context.Background(), exp.opts)
	require.NoError(t, err)
	require.NotEqual(t, exp.PID, restarted.PID)
	again := r.env(a)
	again.SetHeartbeatDetails(progress)
	res := execute[activities.CopyDiskResult](t, again, activities.CopyDiskName, in)
	require.Less(t, res.BytesRead, total, "the attempt after the restart resumed from the checkpoint")
	requireDigest(t, export{Export: restarted}, res)
	require.NoError(t, restarted.Stop(context.Background(), 0))
	r.compareFlat(exp.image, key)
}

// A copy whose source server (nbdkit, a child of the worker) is killed mid-way fails with a
// retryable error naming the dead source; the next attempt starts its own source and
// resumes from the checkpoint: it reads less than the disk's data, and the target equals
// the disk.
func TestCopyResumesAfterSourceKilled(t *testing.T) {
	c := newSlowCopy(t, 17, "source-killed", 2)
	r, a, exp, in, key, total := c.r, c.slow, c.exp, c.in, c.key, c.total

	// SIGKILL of this process's nbdkit child at the first heartbeat past a quarter of the
	// data with a checkpoint.
	var mu sync.Mutex
	var lastBeat activities.CopyProgress
	killedPID := 0
	heartbeats := &heartbeatTap{record: func(p activities.CopyProgress) {
		mu.Lock()
		defer mu.Unlock()
		if killedPID == 0 && p.Checkpoint > 0 && p.BytesDone >= total/4 {
			pids := testenv.LiveChildren(os.Getpid(), "nbdkit")
			require.Len(t, pids, 1, "the copy's source")
			lastBeat, killedPID = p, pids[0]
			require.NoError(t, syscall.Kill(killedPID, syscall.SIGKILL))
		}
	}}
	first := r.suite.NewTestActivityEnvironment()
	first.SetWorkerOptions(worker.Options{Interceptors: []interceptor.WorkerInterceptor{heartbeats}})
	first.SetTestTimeout(2 * time.Minute)
	a.Register(first)
	_, err := first.ExecuteActivity(activities.CopyDiskName, in)
	require.Error(t, err, "the copy survived its source")
	require.ErrorContains(t, err, fmt.Sprintf("the source (nbdkit, pid %d) exited during the copy", killedPID))
	var appErr *temporal.ApplicationError
	require.False(t, errors.As(err, &appErr) && appErr.NonRetryable(), "a dead source is retried: %v", err)
	mu.Lock()
	progress := lastBeat
	mu.Unlock()
	require.NotZero(t, killedPID, "the source was never killed")
	require.Greater(t, progress.Checkpoint, int64(0))

	again := r.env(a)
	again.SetHeartbeatDetails(progress)
	res := execute[activities.CopyDiskResult](t, again, activities.CopyDiskName, in)
	require.Less(t, res.BytesRead, total, "the next attempt resumed from the checkpoint")
	require.Empty(t, testenv.LiveChildren(os.Getpid(), "nbdkit"), "the attempt stopped its source")
	requireDigest(t, exp, res)
	require.NoError(t, exp.Stop(context.Background(), 0))
	r.compareFlat(exp.image, key)
}

// A hub presenting a host key other than the pinned one is refused with a clear,
// non-retryable error.
func TestEnsureTunnelRejectsWrongHostKey(t *testing.T) {
	r := newRig(t, vcsimtest.Options{Disks: 1, DiskSize: 1 << 20})
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	other, err := ssh.NewPublicKey(pub)
	require.NoError(t, err)
	knownHosts := filepath.Join(t.TempDir(), "known_hosts")
	require.NoError(t, os.WriteFile(knownHosts, []byte(knownhosts.Line([]string{r.sshd.Addr}, other)+"\n"), 0o600))

	env := r.env(r.activities(knownHosts, nil))
	_, err = env.ExecuteActivity(activities.EnsureTunnelName, activities.EnsureTunnelInput{HubID: hubID, Ports: []int{testenv.SSHDExportPortMin},
		Sockets: map[int]string{testenv.SSHDExportPortMin: r.sshd.ExportSocket(testenv.SSHDExportPortMin)}})
	require.Error(t, err)
	var appErr *temporal.ApplicationError
	require.True(t, errors.As(err, &appErr), "error %v is an application error", err)
	require.Equal(t, sna.ErrHostKeyMismatch, appErr.Type())
	require.True(t, appErr.NonRetryable())
	require.Contains(t, appErr.Error(), "does not match known_hosts")
}

// A vCenter whose certificate is not the pinned one is refused, naming both thumbprints.
func TestConnectRejectsWrongThumbprint(t *testing.T) {
	testenv.Integration(t)
	lab := vcsimtest.NewLab(t, vcsimtest.Options{Disks: 1, DiskSize: 1 << 20})
	wrong := "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33"
	_, err := vsphere.Connect(context.Background(), vsphere.Config{
		URL: lab.URL, User: lab.User, Password: lab.Password, Thumbprint: wrong,
		Logger: slog.New(slog.DiscardHandler),
	})
	require.Error(t, err)
	var mismatch *vsphere.ThumbprintMismatchError
	require.True(t, errors.As(err, &mismatch), "error %v names the thumbprint mismatch", err)
	require.Contains(t, err.Error(), "does not match the pinned thumbprint")
	require.Contains(t, err.Error(), lab.Thumbprint)
	require.NotContains(t, err.Error(), lab.Password)
}

// heartbeatTap sees every heartbeat an activity records (the test environment's listener
// only sees the throttled ones sent to the server).
type heartbeatTap struct {
	interceptor.WorkerInterceptorBase
	record func(activities.CopyProgress)
}

func (h *heartbeatTap) InterceptActivity(_ context.Context, next interceptor.ActivityInboundInterceptor) interceptor.ActivityInboundInterceptor {
	in := &heartbeatTapInbound{tap: h}
	in.Next = next
	return in
}

type heartbeatTapInbound struct {
	interceptor.ActivityInboundInterceptorBase
	tap *heartbeatTap
}

func (i *heartbeatTapInbound) Init(outbound interceptor.ActivityOutboundInterceptor) error {
	out := &heartbeatTapOutbound{tap: i.tap}
	out.Next = outbound
	return i.Next.Init(out)
}

type heartbeatTapOutbound struct {
	interceptor.ActivityOutboundInterceptorBase
	tap *heartbeatTap
}

func (o *heartbeatTapOutbound) RecordHeartbeat(ctx context.Context, details ...any) {
	for _, d := range details {
		if p, ok := d.(activities.CopyProgress); ok {
			o.tap.record(p)
		}
	}
	o.Next.RecordHeartbeat(ctx, details...)
}

// InspectVM's result carries the VM's shape through the activity payload: what the hub keeps
// with the point for a restore into a new VM.
func TestInspectVMCarriesConfig(t *testing.T) {
	r := newRig(t, vcsimtest.Options{Disks: 2, DiskSize: diskSize})
	env := r.env(r.activities("", nil))
	vm := execute[activities.VM](t, env, activities.InspectVMName, activities.InspectVMInput{VM: r.lab.VMMoref})
	require.NotNil(t, vm.Config)
	cfg := *vm.Config
	require.Equal(t, int32(1), cfg.NumCPUs)
	require.Equal(t, int32(1), cfg.CoresPerSocket)
	require.Equal(t, int32(256), cfg.MemoryMB, "the lab VM's memory")
	require.Equal(t, "otherLinux64Guest", cfg.GuestID)
	require.Len(t, cfg.Disks, 2)
	for i, d := range cfg.Disks {
		require.Equal(t, r.lab.Disks[i].Key, d.Key)
		require.Equal(t, int64(diskSize), d.CapacityBytes)
		require.Equal(t, "pvscsi", d.ControllerType)
		require.Equal(t, int32(0), d.BusNumber)
		require.Equal(t, "thin", d.Provisioning)
	}
	require.NotEqual(t, cfg.Disks[0].UnitNumber, cfg.Disks[1].UnitNumber)
	require.Empty(t, cfg.NICs, "the lab VM has no NIC")
}
