package hub

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	sdklog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/nbdprobe"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.WithSharedMariaDB(m.Run)) }

const (
	mib      = int64(1) << 20
	hubID    = "hub-a"
	diskA    = int32(2000)
	diskB    = int32(2001)
	capacity = 8 * mib
)

// rig is the hub activities over a fresh catalog, repository and run dir.
type rig struct {
	acts     *Activities
	store    *catalog.Store
	ports    *catalog.Ports
	layout   repo.Layout
	settings Settings
	env      *testsuite.TestActivityEnvironment
}

func newStore(t *testing.T) *catalog.Store {
	t.Helper()
	db := testenv.MariaDB(t)
	ctx := context.Background()
	store, err := catalog.Open(ctx, db.DSN, slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	require.NoError(t, store.Migrate(ctx))
	return store
}

// exportPorts returns a small range of ports that were free a moment ago.
func exportPorts(t *testing.T, n int) catalog.PortRange {
	t.Helper()
	for range 20 {
		first := testenv.FreePort(t)
		if first+n-1 > 65535 {
			continue
		}
		free := true
		for p := first; p < first+n; p++ {
			l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
			if err != nil {
				free = false
				break
			}
			l.Close()
		}
		if free {
			return catalog.PortRange{First: first, Last: first + n - 1}
		}
	}
	t.Fatalf("no %d consecutive free ports", n)
	return catalog.PortRange{}
}

func newRig(t *testing.T, store *catalog.Store, rng catalog.PortRange, runDir, root string, settings Settings) *rig {
	t.Helper()
	testenv.RequireCommand(t, "qemu-img")
	testenv.RequireCommand(t, "qemu-nbd")
	ports, err := catalog.NewPorts(store, rng)
	require.NoError(t, err)
	layout, err := repo.New(root)
	require.NoError(t, err)
	if settings.HubID == "" {
		settings.HubID = hubID
	}
	if settings.HubHeartbeat == 0 {
		// Alive for the whole test however slow the machine: placement tests make a hub
		// stale by writing its last_seen (backdate).
		settings.HubHeartbeat = time.Hour
	}
	settings.RunDir, settings.StopTimeout = runDir, 5*time.Second
	acts, err := New(store, ports, layout, settings, slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	// What the hub worker does at start: new chains are placed on alive hubs only.
	space, err := layout.Space()
	require.NoError(t, err)
	require.NoError(t, store.RecordHub(context.Background(), catalog.Hub{ID: settings.HubID, FreeBytes: space.Free, UsedBytes: space.Used,
		Ports: rng}))
	var suite testsuite.WorkflowTestSuite
	suite.SetLogger(sdklog.NewStructuredLogger(slog.New(slog.DiscardHandler))) // failures show in assertions
	env := suite.NewTestActivityEnvironment()
	acts.RegisterShared(env)
	acts.RegisterHost(env)
	return &rig{acts: acts, store: store, ports: ports, layout: layout, settings: acts.settings, env: env}
}

func setup(t *testing.T) *rig {
	t.Helper()
	testenv.Integration(t)
	return newRig(t, newStore(t), exportPorts(t, 4), filepath.Join(testenv.ShortTempDir(t), "run"),
		filepath.Join(t.TempDir(), "repo"), Settings{})
}

// run executes an activity by its registered name and decodes the result into out (may be nil).
func (r *rig) run(t *testing.T, name string, in any, out any) error {
	t.Helper()
	val, err := r.env.ExecuteActivity(name, in)
	if err != nil {
		return err
	}
	if out != nil && val != nil && val.HasValue() {
		require.NoError(t, val.Get(out))
	}
	return nil
}

// requireAppError asserts err is an application error of the type, retryable or not.
func requireAppError(t *testing.T, err error, errType string, nonRetryable bool) *temporal.ApplicationError {
	t.Helper()
	require.Error(t, err)
	var appErr *temporal.ApplicationError
	require.True(t, errors.As(err, &appErr), "want an application error, got %T: %v", err, err)
	assert.Equal(t, errType, appErr.Type(), "error type of %v", err)
	assert.Equal(t, nonRetryable, appErr.NonRetryable(), "non-retryable of %v", err)
	return appErr
}

func testVM() activities.VM {
	return activities.VM{
		InstanceUUID: "vc-0001", Moref: "vm-42", Name: "web 01/../x", PowerState: "poweredOn", CBTEnabled: true,
		Disks: []activities.Disk{
			{Key: diskA, Label: "Hard disk 1", CapacityBytes: capacity, ChangeID: "52aa 01/10"},
			{Key: diskB, Label: "Hard disk 2", CapacityBytes: capacity, ChangeID: "52bb 02/7"},
		},
	}
}

func (r *rig) plan(t *testing.T, wf string, vm activities.VM, mode string, keys ...int32) (activities.Plan, error) {
	t.Helper()
	var plan activities.Plan
	err := r.run(t, activities.PlanBackupName, activities.PlanBackupInput{
		WorkflowID: wf, RunID: "run-" + wf, Site: "site-1", VM: vm, Mode: mode, DiskKeys: keys,
	}, &plan)
	return plan, err
}

func (r *rig) commit(t *testing.T, plan activities.Plan, paths map[int32]string, changeIDs map[int32]string) {
	t.Helper()
	in := activities.CommitPointInput{PointID: plan.PointID}
	for _, d := range plan.Disks {
		in.Disks = append(in.Disks, activities.DiskResult{
			Key: d.Key, Path: paths[d.Key], ParentPath: d.ParentPath, Mode: d.Mode, ChangeID: changeIDs[d.Key],
			CapacityBytes: d.CapacityBytes, BytesRead: mib, BytesWritten: mib, Digest: "d",
		})
	}
	require.NoError(t, r.run(t, activities.CommitPointName, in, nil))
}

func diskPlan(t *testing.T, plan activities.Plan, key int32) activities.DiskPlan {
	t.Helper()
	for _, d := range plan.Disks {
		if d.Key == key {
			return d
		}
	}
	t.Fatalf("plan has no disk %d: %+v", key, plan)
	return activities.DiskPlan{}
}

func TestPlanBackup(t *testing.T) {
	r := setup(t)
	vm := testVM()

	first, err := r.plan(t, "wf-1", vm, activities.ModeAuto)
	require.NoError(t, err)
	assert.Equal(t, activities.ModeFull, first.Mode)
	assert.Equal(t, hubID, first.HubID)
	require.Len(t, first.Disks, 2)
	for _, d := range first.Disks {
		assert.Equal(t, activities.ModeFull, d.Mode)
		assert.Contains(t, d.Reason, "no previous restore point")
	}
	again, err := r.plan(t, "wf-1", vm, activities.ModeAuto)
	require.NoError(t, err)
	assert.Equal(t, first.PointID, again.PointID, "a retried plan opens no second point")

	_, err = r.plan(t, "wf-other", vm, activities.ModeAuto)
	requireAppError(t, err, activities.ErrBackupRunning, true)

	r.commit(t, first, map[int32]string{diskA: "/repo/a.qcow2", diskB: "/repo/b.qcow2"},
		map[int32]string{diskA: "52aa 01/10", diskB: "52bb 02/7"})

	// Disk A unchanged: incremental on its previous point; disk B resized: full.
	resized := testVM()
	resized.Disks[1].CapacityBytes = 2 * capacity
	second, err := r.plan(t, "wf-2", resized, activities.ModeAuto)
	require.NoError(t, err)
	a, b := diskPlan(t, second, diskA), diskPlan(t, second, diskB)
	assert.Equal(t, activities.ModeIncremental, a.Mode)
	assert.Equal(t, "/repo/a.qcow2", a.ParentPath)
	assert.Equal(t, "52aa 01/10", a.PrevChangeID)
	assert.Equal(t, activities.ModeFull, b.Mode)
	assert.Contains(t, b.Reason, "resized")
	assert.Equal(t, activities.ModeFull, second.Mode, "full when any disk is full")
	require.NoError(t, r.run(t, activities.FailPointName, activities.FailPointInput{PointID: second.PointID, Error: "test"}, nil))

	incremental, err := r.plan(t, "wf-3", vm, activities.ModeIncremental)
	require.NoError(t, err)
	assert.Equal(t, activities.ModeIncremental, incremental.Mode)
	for _, d := range incremental.Disks {
		assert.Equal(t, activities.ModeIncremental, d.Mode, "disk %d", d.Key)
		assert.Empty(t, d.Reason)
	}
	require.NoError(t, r.run(t, activities.FailPointName, activities.FailPointInput{PointID: incremental.PointID, Error: "test"}, nil))

	cases := []struct {
		name   string
		mutate func(*activities.VM)
		mode   string
		reason string
	}{
		{"cbt reset", func(v *activities.VM) { v.Disks[0].ChangeID = "52cc 99/1" }, activities.ModeAuto, "reset"},
		{"cbt not active yet", func(v *activities.VM) { v.Disks[0].ChangeID = "" }, activities.ModeAuto, "no changeId yet"},
		{"cbt off", func(v *activities.VM) { v.CBTEnabled = false }, activities.ModeAuto, "changed block tracking is off"},
		{"full requested", func(*activities.VM) {}, activities.ModeFull, "full backup requested"},
	}
	for i, c := range cases {
		v := testVM()
		c.mutate(&v)
		plan, err := r.plan(t, fmt.Sprintf("wf-case-%d", i), v, c.mode, diskA)
		require.NoError(t, err, c.name)
		require.Len(t, plan.Disks, 1, c.name)
		assert.Equal(t, activities.ModeFull, plan.Disks[0].Mode, c.name)
		assert.Contains(t, plan.Disks[0].Reason, c.reason, c.name)
		require.NoError(t, r.run(t, activities.FailPointName, activities.FailPointInput{PointID: plan.PointID, Error: "test"}, nil))
	}

	_, err = r.plan(t, "wf-bad", vm, activities.ModeAuto, 9999)
	requireAppError(t, err, activities.ErrBadInput, true)
	_, err = r.plan(t, "wf-bad", vm, activities.ModeAuto, diskA, diskA)
	requireAppError(t, err, activities.ErrBadInput, true)
	_, err = r.plan(t, "wf-bad", vm, "sometimes")
	requireAppError(t, err, activities.ErrBadInput, true)
	noMoref := testVM()
	noMoref.Moref = ""
	_, err = r.plan(t, "wf-bad", noMoref, activities.ModeAuto)
	requireAppError(t, err, activities.ErrBadInput, true)
	// Names the catalog cannot keep fail at once, not after retries of a database error.
	for _, name := range []string{strings.Repeat("n", 10000), "web\n01", ""} {
		bad := testVM()
		bad.Name = name
		_, err = r.plan(t, "wf-bad", bad, activities.ModeAuto)
		requireAppError(t, err, activities.ErrBadInput, true)
	}
}

func TestPlanBackupTakesOverClosedWorkflowsPoint(t *testing.T) {
	testenv.Integration(t)
	closed := map[string]bool{"wf-terminated": true}
	r := newRig(t, newStore(t), exportPorts(t, 1), filepath.Join(testenv.ShortTempDir(t), "run"), filepath.Join(t.TempDir(), "repo"),
		Settings{WorkflowClosed: func(_ context.Context, id string) (bool, error) { return closed[id], nil }})
	abandoned, err := r.plan(t, "wf-terminated", testVM(), activities.ModeAuto)
	require.NoError(t, err)
	next, err := r.plan(t, "wf-next", testVM(), activities.ModeAuto)
	require.NoError(t, err)
	assert.NotEqual(t, abandoned.PointID, next.PointID)
	p, err := r.store.GetPoint(context.Background(), abandoned.PointID)
	require.NoError(t, err)
	assert.Equal(t, catalog.StatusFailed, p.Status)
	assert.Contains(t, p.Error, "closed")
}

// AllocatePorts leases a run's ports in one step, all or none; too few free is the
// retryable ErrPortsExhausted with the counts, more disks than the hub has ports BadInput.
func TestAllocatePortsAllOrNone(t *testing.T) {
	r := setup(t) // four ports
	alloc := func(wf string, keys ...int32) ([]int, error) {
		var ports []int
		err := r.run(t, activities.AllocatePortsName, activities.AllocatePortsInput{HubID: hubID, WorkflowID: wf, DiskKeys: keys}, &ports)
		return ports, err
	}
	rng := r.ports.Range()
	got, err := alloc("wf-1", diskA, diskB, 2002)
	require.NoError(t, err)
	assert.Equal(t, []int{rng.First, rng.First + 1, rng.First + 2}, got)
	_, err = alloc("wf-2", diskA, diskB)
	appErr := requireAppError(t, err, activities.ErrPortsExhausted, false)
	var details activities.PortsExhausted
	require.NoError(t, appErr.Details(&details))
	assert.Equal(t, activities.PortsExhausted{HubID: hubID, Ports: 4, First: rng.First, Last: rng.Last, Needed: 2, Free: 1}, details)
	leases, err := r.ports.ListLeases(context.Background(), hubID)
	require.NoError(t, err)
	assert.Len(t, leases, 3, "the refused run holds no port")

	_, err = alloc("wf-3", 1, 2, 3, 4, 5)
	appErr = requireAppError(t, err, activities.ErrBadInput, true)
	assert.Contains(t, appErr.Error(), "5 disks need a port each")
}

// A run refused ports waits in the hub's line (the details say how many are ahead); a
// release wakes exactly the runs in line the free ports now fit, in line order, and a run
// released while in line leaves it.
func TestReleasePortsWakesTheRunsThatNowFit(t *testing.T) {
	testenv.Integration(t)
	var mu sync.Mutex
	var woken []string
	r := newRig(t, newStore(t), exportPorts(t, 4), filepath.Join(testenv.ShortTempDir(t), "run"), filepath.Join(t.TempDir(), "repo"),
		Settings{PortsFree: func(_ context.Context, id string) error {
			mu.Lock()
			defer mu.Unlock()
			woken = append(woken, id)
			return nil
		}})
	wokenSoFar := func() []string {
		mu.Lock()
		defer mu.Unlock()
		w := woken
		woken = nil
		return w
	}
	alloc := func(wf string, keys ...int32) error {
		return r.run(t, activities.AllocatePortsName, activities.AllocatePortsInput{HubID: hubID, WorkflowID: wf, DiskKeys: keys}, nil)
	}
	release := func(wf string) {
		require.NoError(t, r.run(t, activities.ReleasePortsName, activities.ReleasePortsInput{HubID: hubID, WorkflowID: wf}, nil))
	}
	require.NoError(t, alloc("wf-a", 1, 2))
	require.NoError(t, alloc("wf-b", 1, 2))
	requireAppError(t, alloc("wf-three", 1, 2, 3), activities.ErrPortsExhausted, false)
	requireAppError(t, alloc("wf-gives-up", 1), activities.ErrPortsExhausted, false)
	appErr := requireAppError(t, alloc("wf-one", 1), activities.ErrPortsExhausted, false)
	var details activities.PortsExhausted
	require.NoError(t, appErr.Details(&details))
	assert.Equal(t, 2, details.Ahead, "wf-three and wf-gives-up are ahead")
	assert.Contains(t, appErr.Error(), "2 jobs ahead in line")

	release("wf-a")
	assert.Empty(t, wokenSoFar(), "two free ports do not fit wf-three, first in line")
	release("wf-gives-up")
	assert.Empty(t, wokenSoFar(), "leaving the line frees no port")
	release("wf-b")
	assert.Equal(t, []string{"wf-three", "wf-one"}, wokenSoFar(), "four free ports fit the line, in order")
	require.NoError(t, alloc("wf-three", 1, 2, 3))
	require.NoError(t, alloc("wf-one", 1))
	release("wf-three")
	assert.Empty(t, wokenSoFar(), "nobody waits any more")
}

func TestAllocateAndReleasePorts(t *testing.T) {
	r := setup(t) // four ports
	alloc := func(wf string, key int32) (int, error) {
		var port int
		err := r.run(t, activities.AllocatePortName, activities.AllocatePortInput{HubID: hubID, WorkflowID: wf, DiskKey: key}, &port)
		return port, err
	}
	rng := r.ports.Range()
	p1, err := alloc("wf-1", diskA)
	require.NoError(t, err)
	again, err := alloc("wf-1", diskA)
	require.NoError(t, err)
	assert.Equal(t, p1, again, "same (workflow, disk), same port")
	assert.Equal(t, rng.First, p1)
	seen := map[int]bool{p1: true}
	for i, key := range []int32{diskB, 2002, 2003} {
		p, err := alloc("wf-1", key)
		require.NoError(t, err, "allocation %d", i)
		assert.False(t, seen[p], "port %d leased twice", p)
		seen[p] = true
	}
	_, err = alloc("wf-2", diskA)
	appErr := requireAppError(t, err, activities.ErrPortsExhausted, false)
	assert.Contains(t, appErr.Error(), hubID)
	var details activities.PortsExhausted
	require.NoError(t, appErr.Details(&details))
	assert.Equal(t, activities.PortsExhausted{HubID: hubID, Ports: 4, First: rng.First, Last: rng.Last, Needed: 1}, details)

	release := activities.ReleasePortsInput{HubID: hubID, WorkflowID: "wf-1"}
	require.NoError(t, r.run(t, activities.ReleasePortsName, release, nil))
	require.NoError(t, r.run(t, activities.ReleasePortsName, release, nil), "release is idempotent")
	p, err := alloc("wf-2", diskA)
	require.NoError(t, err)
	assert.Equal(t, rng.First, p)

	_, err = alloc("", diskA)
	requireAppError(t, err, activities.ErrBadInput, true)
}

// fullTarget plans a full point of the test VM's first disk and prepares its target.
func (r *rig) fullTarget(t *testing.T, wf string) (activities.Plan, activities.Target) {
	t.Helper()
	plan, err := r.plan(t, wf, testVM(), activities.ModeAuto, diskA)
	require.NoError(t, err)
	var target activities.Target
	require.NoError(t, r.run(t, activities.PrepareTargetName,
		activities.PrepareTargetInput{PointID: plan.PointID, VM: testVM(), Disk: plan.Disks[0]}, &target))
	return plan, target
}

func TestPrepareTargetFullAndOverlay(t *testing.T) {
	r := setup(t)
	ctx := context.Background()
	plan, target := r.fullTarget(t, "wf-1")
	want, err := r.layout.TargetPath(testVM().Name, testVM().Moref, plan.PointID, diskA)
	require.NoError(t, err)
	assert.Equal(t, want, target.Path)
	assert.True(t, strings.HasPrefix(target.Path, r.layout.Root+"/web_01_.._x-vm-42/"), target.Path)
	info, err := qemu.Info(ctx, target.Path)
	require.NoError(t, err)
	assert.Equal(t, "qcow2", info.Format)
	assert.Equal(t, capacity, info.VirtualSize)
	assert.Empty(t, info.BackingFile)

	// A retry replaces the file the first attempt made.
	require.NoError(t, os.WriteFile(target.Path, []byte("half-made"), 0o600))
	require.NoError(t, r.run(t, activities.PrepareTargetName,
		activities.PrepareTargetInput{PointID: plan.PointID, VM: testVM(), Disk: plan.Disks[0]}, &target))
	_, err = qemu.Check(ctx, target.Path)
	require.NoError(t, err)

	r.commit(t, plan, map[int32]string{diskA: target.Path}, map[int32]string{diskA: "52aa 01/10"})
	// A complete point's file is never replaced.
	err = r.run(t, activities.PrepareTargetName, activities.PrepareTargetInput{PointID: plan.PointID, VM: testVM(), Disk: plan.Disks[0]}, nil)
	requireAppError(t, err, activities.ErrBadInput, true)
	_, err = qemu.Check(ctx, target.Path)
	require.NoError(t, err)

	next, err := r.plan(t, "wf-2", testVM(), activities.ModeAuto, diskA)
	require.NoError(t, err)
	require.Equal(t, activities.ModeIncremental, next.Disks[0].Mode)
	var overlay activities.Target
	require.NoError(t, r.run(t, activities.PrepareTargetName,
		activities.PrepareTargetInput{PointID: next.PointID, VM: testVM(), Disk: next.Disks[0]}, &overlay))
	out, err := exec.Command("qemu-img", "info", "-U", overlay.Path).CombinedOutput()
	require.NoError(t, err, string(out))
	assert.Contains(t, string(out), "backing file: "+target.Path)
	assert.Contains(t, string(out), "backing file format: qcow2")

	point, err := r.store.GetPoint(ctx, next.PointID)
	require.NoError(t, err)
	require.Len(t, point.Disks, 1)
	assert.Equal(t, target.Path, point.Disks[0].ParentPath)

	outside := next.Disks[0]
	outside.ParentPath = "/etc/passwd"
	err = r.run(t, activities.PrepareTargetName, activities.PrepareTargetInput{PointID: next.PointID, VM: testVM(), Disk: outside}, nil)
	requireAppError(t, err, activities.ErrBadInput, true)
	missing := next.Disks[0]
	missing.ParentPath = filepath.Join(filepath.Dir(target.Path), "disk-77.qcow2")
	err = r.run(t, activities.PrepareTargetName, activities.PrepareTargetInput{PointID: next.PointID, VM: testVM(), Disk: missing}, nil)
	requireAppError(t, err, activities.ErrNotFound, true)
	err = r.run(t, activities.PrepareTargetName, activities.PrepareTargetInput{PointID: "nope", VM: testVM(), Disk: next.Disks[0]}, nil)
	requireAppError(t, err, activities.ErrNotFound, true)
}

func TestDiscardTarget(t *testing.T) {
	r := setup(t)
	plan, err := r.plan(t, "wf-1", testVM(), activities.ModeAuto)
	require.NoError(t, err)
	var targets []activities.Target
	for _, d := range plan.Disks {
		var target activities.Target
		require.NoError(t, r.run(t, activities.PrepareTargetName, activities.PrepareTargetInput{PointID: plan.PointID, VM: testVM(), Disk: d}, &target))
		targets = append(targets, target)
	}
	pointDir := filepath.Dir(targets[0].Path)
	// A target verified before the run failed has its manifest (and maybe a partial one).
	for _, target := range targets {
		require.NoError(t, os.WriteFile(repo.ManifestPath(target.Path), []byte("manifest"), 0o600))
	}
	require.NoError(t, os.WriteFile(repo.ManifestPath(targets[1].Path)+".tmp", []byte("partial"), 0o600))

	vm := testVM()
	discard := func(key int32) error {
		return r.run(t, activities.DiscardTargetName, activities.DiscardTargetInput{
			PointID: plan.PointID, VMName: vm.Name, VMMoref: vm.Moref, DiskKey: key,
		}, nil)
	}
	require.NoError(t, discard(targets[0].DiskKey))
	assert.NoFileExists(t, targets[0].Path)
	assert.NoFileExists(t, repo.ManifestPath(targets[0].Path))
	assert.FileExists(t, repo.ManifestPath(targets[1].Path), "a sibling's manifest stays")
	assert.DirExists(t, pointDir, "a sibling target keeps the point directory")
	require.NoError(t, discard(targets[0].DiskKey), "discard is idempotent")
	require.NoError(t, discard(targets[1].DiskKey))
	assert.NoDirExists(t, pointDir, "the empty point directory goes")
	assert.DirExists(t, filepath.Dir(pointDir), "the VM directory stays")
	require.NoError(t, discard(targets[1].DiskKey))

	// Hostile names are sanitised into the repository: nothing outside it is touched.
	victim := filepath.Join(filepath.Dir(r.layout.Root), "disk-2000.qcow2")
	require.NoError(t, os.WriteFile(victim, []byte("keep"), 0o600))
	for _, name := range []string{"../..", "../" + filepath.Base(r.layout.Root), "/"} {
		require.NoError(t, r.run(t, activities.DiscardTargetName, activities.DiscardTargetInput{
			PointID: plan.PointID, VMName: name, VMMoref: "..", DiskKey: 2000,
		}, nil))
	}
	assert.FileExists(t, victim)

	// An unknown point is a clear, final error.
	err = r.run(t, activities.DiscardTargetName, activities.DiscardTargetInput{PointID: "no-such-point", VMName: vm.Name, VMMoref: vm.Moref, DiskKey: 1}, nil)
	requireAppError(t, err, activities.ErrNotFound, true)
}

// export allocates a port and starts the target's export for workflow wf.
func (r *rig) export(t *testing.T, wf string, target activities.Target) activities.Export {
	t.Helper()
	var port int
	require.NoError(t, r.run(t, activities.AllocatePortName, activities.AllocatePortInput{HubID: hubID, WorkflowID: wf, DiskKey: target.DiskKey}, &port))
	var exp activities.Export
	require.NoError(t, r.run(t, activities.StartExportName, activities.StartExportInput{
		WorkflowID: wf, DiskKey: target.DiskKey, Path: target.Path, Port: port, Connections: 4,
	}, &exp))
	t.Cleanup(func() { _ = qemu.StopPidFile(context.Background(), r.acts.pidFile(port), time.Second) })
	return exp
}

// exportURI is the NBD URI of an export on the hub.
func exportURI(exp activities.Export) string {
	return "nbd+unix:///" + exp.Name + "?socket=" + exp.Socket
}

// handshake reports whether the export's socket completes an NBD newstyle greeting.
func handshake(exp activities.Export) error {
	c, err := net.DialTimeout("unix", exp.Socket, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return nbdprobe.Greet(ctx, c)
}

func processAlive(pid int) bool {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && len(raw) > 0
}

func TestStartAndStopExport(t *testing.T) {
	r := setup(t)
	ctx := context.Background()
	_, target := r.fullTarget(t, "wf-1")
	exp := r.export(t, "wf-1", target)
	assert.Equal(t, "disk-2000", exp.Name)
	assert.Equal(t, ExportSocket(r.settings.RunDir, exp.Port), exp.Socket)
	require.NoError(t, handshake(exp))
	require.True(t, processAlive(exp.PID))
	nbdinfo := testenv.RequireCommand(t, "nbdinfo")
	out, err := exec.Command(nbdinfo, "--size", exportURI(exp)).CombinedOutput()
	require.NoError(t, err, string(out))
	assert.Equal(t, strconv.FormatInt(capacity, 10), strings.TrimSpace(string(out)))

	rows, err := r.store.ListExports(ctx, hubID)
	require.NoError(t, err)
	require.Len(t, rows, 1)
	assert.Equal(t, catalog.Export{Hub: hubID, Port: exp.Port, PID: exp.PID, Path: target.Path, WorkflowID: "wf-1", DiskKey: diskA},
		catalog.Export{Hub: rows[0].Hub, Port: rows[0].Port, PID: rows[0].PID, Path: rows[0].Path, WorkflowID: rows[0].WorkflowID, DiskKey: rows[0].DiskKey})

	var again activities.Export
	require.NoError(t, r.run(t, activities.StartExportName, activities.StartExportInput{
		WorkflowID: "wf-1", DiskKey: diskA, Path: target.Path, Port: exp.Port, Connections: 4,
	}, &again))
	assert.Equal(t, exp, again, "a retried start returns the running export")

	// A crash between starting qemu-nbd and recording it: the retry records it.
	require.NoError(t, r.store.RemoveExport(ctx, hubID, exp.Port))
	require.NoError(t, r.run(t, activities.StartExportName, activities.StartExportInput{
		WorkflowID: "wf-1", DiskKey: diskA, Path: target.Path, Port: exp.Port, Connections: 4,
	}, &again))
	rows, err = r.store.ListExports(ctx, hubID)
	require.NoError(t, err)
	require.Len(t, rows, 1)
	assert.Equal(t, exp.PID, rows[0].PID)

	err = r.run(t, activities.StartExportName, activities.StartExportInput{
		WorkflowID: "wf-1", DiskKey: diskB, Path: target.Path, Port: exp.Port + 1, Connections: 4,
	}, nil)
	requireAppError(t, err, activities.ErrBadInput, true) // no lease
	err = r.run(t, activities.StartExportName, activities.StartExportInput{
		WorkflowID: "wf-1", DiskKey: diskA, Path: "/etc/passwd", Port: exp.Port, Connections: 4,
	}, nil)
	requireAppError(t, err, activities.ErrBadInput, true)

	stop := activities.StopExportInput{Port: exp.Port, Path: target.Path}
	require.NoError(t, r.run(t, activities.StopExportName, stop, nil))
	assert.False(t, processAlive(exp.PID), "qemu-nbd %d still runs", exp.PID)
	assert.Error(t, handshake(exp))
	assert.NoFileExists(t, exp.Socket)
	assert.NoFileExists(t, r.acts.pidFile(exp.Port))
	rows, err = r.store.ListExports(ctx, hubID)
	require.NoError(t, err)
	assert.Empty(t, rows)
	require.NoError(t, r.run(t, activities.StopExportName, stop, nil), "stop is idempotent")
	_, err = qemu.Check(ctx, target.Path)
	require.NoError(t, err, "the image is closed cleanly")
}

func TestVerifyTarget(t *testing.T) {
	r := setup(t)
	ctx := context.Background()
	nbdcopy := testenv.RequireCommand(t, "nbdcopy")
	qemuIO := testenv.RequireCommand(t, "qemu-io")

	// A source with data at a few places and holes elsewhere.
	src := filepath.Join(t.TempDir(), "source.raw")
	data := make([]byte, mib)
	for i := range data {
		data[i] = byte(i*7 + i/4096)
	}
	testenv.WriteFileAt(t, src, 0, data[:64<<10])
	testenv.WriteFileAt(t, src, 3*mib+4096, data)
	require.NoError(t, os.Truncate(src, capacity))

	plan, target := r.fullTarget(t, "wf-1")
	exp := r.export(t, "wf-1", target)
	out, err := exec.Command(nbdcopy, "--connections=2", src, exportURI(exp)).CombinedOutput()
	require.NoError(t, err, string(out))
	require.NoError(t, r.run(t, activities.StopExportName, activities.StopExportInput{Port: exp.Port, Path: target.Path}, nil))

	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	want, err := blockcopy.ComputeDigest(ctx, source.URI, blockcopy.Options{BlockSize: mib, Connections: 2})
	require.NoError(t, err)

	var verified int64
	r.acts.settings.CountVerified = func(n int64) { verified += n }
	in := activities.VerifyTargetInput{Path: target.Path, BlockSize: mib, Digest: want}
	var v activities.Verification
	require.NoError(t, r.run(t, activities.VerifyTargetName, in, &v))
	assert.Equal(t, target.Path, v.Path)
	assert.Equal(t, capacity, v.VirtualBytes)
	assert.Positive(t, v.AllocatedBytes)
	assert.Equal(t, capacity, verified)
	// The point keeps its block manifest, which matches the source block for block.
	assert.Equal(t, repo.ManifestPath(target.Path), v.Manifest)
	check, err := blockcopy.VerifyManifest(ctx, source.URI, v.Manifest, blockcopy.Options{})
	require.NoError(t, err)
	assert.Equal(t, &blockcopy.Verification{Blocks: capacity / mib, Bytes: capacity}, check)
	kept, err := os.ReadFile(v.Manifest)
	require.NoError(t, err)

	// Areas covering every byte the copy wrote; the checks outside them are in verify_test.go.
	areas := []activities.Extent{{Start: 0, Length: 64 << 10}, {Start: 3 * mib, Length: 2 * mib}}
	wantAreas, err := blockcopy.ComputeDigest(ctx, source.URI, blockcopy.Options{
		BlockSize: mib, Connections: 2, Areas: toBlockExtents(areas),
	})
	require.NoError(t, err)
	require.NoError(t, r.run(t, activities.VerifyTargetName, activities.VerifyTargetInput{Path: target.Path, BlockSize: mib, Digest: wantAreas, Areas: areas}, nil))
	require.NoError(t, r.run(t, activities.VerifyTargetName, in, nil))

	// One byte differs from the source.
	off := 3*mib + 4096 + 100
	out, err = exec.Command(qemuIO, "-f", "qcow2", "-c", fmt.Sprintf("write -P %d %d 1", data[100]^0xff, off), target.Path).CombinedOutput()
	require.NoError(t, err, string(out))
	err = r.run(t, activities.VerifyTargetName, in, nil)
	appErr := requireAppError(t, err, activities.ErrBadInput, true)
	assert.Contains(t, appErr.Error(), "differs from the copy's")
	err = r.run(t, activities.VerifyTargetName, activities.VerifyTargetInput{Path: target.Path, BlockSize: mib, Digest: wantAreas, Areas: areas}, nil)
	requireAppError(t, err, activities.ErrBadInput, true)
	// A failed verification leaves the manifest of the last good one, which names the block.
	after, err := os.ReadFile(v.Manifest)
	require.NoError(t, err)
	assert.Equal(t, kept, after)
	assert.NoFileExists(t, v.Manifest+".tmp")
	damaged := testenv.StartQemuNBD(t, target.Path, testenv.QemuNBDOptions{Args: []string{"--read-only"}})
	check, err = blockcopy.VerifyManifest(ctx, damaged.URI, v.Manifest, blockcopy.Options{})
	require.NoError(t, err)
	assert.Equal(t, []blockcopy.Extent{{Start: 3 * mib, Length: mib}}, check.First)

	leftovers, err := filepath.Glob(filepath.Join(r.settings.RunDir, verifyDirPrefix+"*"))
	require.NoError(t, err)
	assert.Empty(t, leftovers, "verification leaves nothing in the run dir")
	require.NoError(t, r.run(t, activities.FailPointName, activities.FailPointInput{PointID: plan.PointID, Error: "verify"}, nil))
}

func TestCommitAndFailPoint(t *testing.T) {
	r := setup(t)
	ctx := context.Background()
	plan, target := r.fullTarget(t, "wf-1")

	err := r.run(t, activities.CommitPointName, activities.CommitPointInput{PointID: plan.PointID}, nil)
	requireAppError(t, err, activities.ErrBadInput, true) // no disks
	err = r.run(t, activities.CommitPointName, activities.CommitPointInput{PointID: "missing", Disks: []activities.DiskResult{
		{Key: diskA, Path: target.Path, Mode: activities.ModeFull},
	}}, nil)
	requireAppError(t, err, activities.ErrNotFound, true)

	r.commit(t, plan, map[int32]string{diskA: target.Path}, map[int32]string{diskA: "52aa 01/10"})
	r.commit(t, plan, map[int32]string{diskA: target.Path}, map[int32]string{diskA: "52aa 01/10"}) // idempotent
	point, err := r.store.GetPoint(ctx, plan.PointID)
	require.NoError(t, err)
	assert.Equal(t, catalog.StatusComplete, point.Status)
	require.Len(t, point.Disks, 1)
	assert.Equal(t, "52aa 01/10", point.Disks[0].ChangeID)
	assert.Equal(t, mib, point.BytesWritten)

	err = r.run(t, activities.FailPointName, activities.FailPointInput{PointID: plan.PointID, Error: "late"}, nil)
	requireAppError(t, err, activities.ErrBadInput, true) // a complete point stays complete
	vm := testVM()
	err = r.run(t, activities.DiscardTargetName, activities.DiscardTargetInput{
		PointID: plan.PointID, VMName: vm.Name, VMMoref: vm.Moref, DiskKey: diskA,
	}, nil)
	requireAppError(t, err, activities.ErrBadInput, true)
	assert.FileExists(t, target.Path, "a complete point's file is never discarded")

	next, err := r.plan(t, "wf-2", testVM(), activities.ModeAuto, diskA)
	require.NoError(t, err)
	fail := activities.FailPointInput{PointID: next.PointID, Error: "copy failed: boom"}
	require.NoError(t, r.run(t, activities.FailPointName, fail, nil))
	require.NoError(t, r.run(t, activities.FailPointName, activities.FailPointInput{PointID: next.PointID, Error: "second"}, nil))
	failed, err := r.store.GetPoint(ctx, next.PointID)
	require.NoError(t, err)
	assert.Equal(t, catalog.StatusFailed, failed.Status)
	assert.Equal(t, "copy failed: boom", failed.Error, "the first error stays")
	require.NoError(t, r.run(t, activities.FailPointName, activities.FailPointInput{PointID: "unknown", Error: "x"}, nil))

	err = r.run(t, activities.CommitPointName, activities.CommitPointInput{PointID: next.PointID, Disks: []activities.DiskResult{
		{Key: diskA, Path: target.Path, Mode: activities.ModeFull},
	}}, nil)
	requireAppError(t, err, activities.ErrBadInput, true) // a failed point stays failed
}

// PlanBackup keeps the VM's shape from InspectVM with the point it opens; a VM inspected by
// an SNA that does not capture it yet gives a point whose shape reads as not captured.
func TestPlanBackupKeepsVMConfig(t *testing.T) {
	r := setup(t)
	vm := testVM()
	vm.Config = &activities.VMConfig{
		NumCPUs: 2, CoresPerSocket: 1, MemoryMB: 2048, Firmware: "bios", GuestID: "otherLinux64Guest",
		Disks: []activities.DiskLayout{
			{Key: diskA, CapacityBytes: capacity, ControllerKey: 1000, ControllerType: "pvscsi", UnitNumber: 0, Provisioning: "thin"},
			{Key: diskB, CapacityBytes: capacity, ControllerKey: 15000, ControllerType: "sata", BusNumber: 0, UnitNumber: 1},
		},
		NICs: []activities.NIC{{Key: 4000, AdapterType: "e1000e", Network: "backend", NetworkKind: "distributed",
			AddressType: "generated", MACAddress: "00:50:56:aa:bb:cc"}},
	}
	plan, err := r.plan(t, "wf-1", vm, activities.ModeAuto)
	require.NoError(t, err)
	point, err := r.store.GetPoint(context.Background(), plan.PointID)
	require.NoError(t, err)
	require.NotNil(t, point.VMConfig)
	assert.Equal(t, &catalog.VMConfig{
		NumCPUs: 2, CoresPerSocket: 1, MemoryMB: 2048, Firmware: "bios", GuestID: "otherLinux64Guest",
		Disks: []catalog.DiskLayout{
			{Key: diskA, CapacityBytes: capacity, ControllerKey: 1000, ControllerType: "pvscsi", UnitNumber: 0, Provisioning: "thin"},
			{Key: diskB, CapacityBytes: capacity, ControllerKey: 15000, ControllerType: "sata", BusNumber: 0, UnitNumber: 1},
		},
		NICs: []catalog.NIC{{Key: 4000, AdapterType: "e1000e", Network: "backend", NetworkKind: "distributed",
			AddressType: "generated", MACAddress: "00:50:56:aa:bb:cc"}},
	}, point.VMConfig)
	require.NoError(t, r.run(t, activities.FailPointName, activities.FailPointInput{PointID: plan.PointID, Error: "test"}, nil))

	plan, err = r.plan(t, "wf-2", testVM(), activities.ModeAuto)
	require.NoError(t, err)
	point, err = r.store.GetPoint(context.Background(), plan.PointID)
	require.NoError(t, err)
	assert.Nil(t, point.VMConfig)
}
