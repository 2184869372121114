package hub

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/testenv"
)

// hubRig is the activities of hub id on a shared catalog, with a repository of its own.
func hubRig(t *testing.T, store *catalog.Store, id string) *rig {
	t.Helper()
	return newRig(t, store, exportPorts(t, 1), filepath.Join(testenv.ShortTempDir(t), "run"), filepath.Join(t.TempDir(), "repo"),
		Settings{HubID: id, HubHeartbeat: placementHeartbeat})
}

// placementHeartbeat makes a hub alive for 30 minutes after its heartbeat, whatever the
// machine's load; a stale hub is backdated by more.
const placementHeartbeat = 10 * time.Minute

// seen records hub id as its worker does, seen now with free bytes free.
func seen(t *testing.T, store *catalog.Store, id string, free int64) {
	t.Helper()
	require.NoError(t, store.RecordHub(context.Background(), catalog.Hub{ID: id, FreeBytes: free, UsedBytes: 1,
		Ports: catalog.PortRange{First: 20100, Last: 20103}}))
}

// backdate makes hub id's worker last seen ago: stale, as a hub whose worker stopped.
func backdate(t *testing.T, store *catalog.Store, id string, ago time.Duration) {
	t.Helper()
	res, err := store.DB().ExecContext(context.Background(), "UPDATE hubs SET last_seen = ? WHERE id = ?",
		time.Now().UTC().Add(-ago), id)
	require.NoError(t, err)
	n, err := res.RowsAffected()
	require.NoError(t, err)
	require.EqualValues(t, 1, n, "hub %s", id)
}

func vmNamed(name, moref string) activities.VM {
	vm := testVM()
	vm.Name, vm.Moref = name, moref
	return vm
}

// A VM without a complete point goes to the alive hub with the most free bytes (the
// smallest id on a tie), whichever hub worker plans it; a stale hub, or one never seen, is
// never chosen however much room it has; none alive is a retryable NoHub naming them all.
func TestPlanBackupPlacesNewChainOnFreestAliveHub(t *testing.T) {
	testenv.Integration(t)
	store := newStore(t)
	a, b := hubRig(t, store, "hub-a"), hubRig(t, store, "hub-b")
	seen(t, store, "hub-a", 1000)
	seen(t, store, "hub-b", 2000)
	seen(t, store, "hub-c", 1<<50)
	backdate(t, store, "hub-c", time.Hour)
	// hub-0 is named by a lease only: its worker never recorded itself.
	_, err := a.ports.Allocate(context.Background(), "hub-0", "wf-lease", diskA)
	require.NoError(t, err)

	plan, err := a.plan(t, "wf-1", vmNamed("vm1", "vm-1"), activities.ModeAuto)
	require.NoError(t, err)
	assert.Equal(t, "hub-b", plan.HubID, "the freer alive hub, though hub-a's worker planned it")
	assert.Empty(t, plan.Note)
	point, err := store.GetPoint(context.Background(), plan.PointID)
	require.NoError(t, err)
	assert.Equal(t, "hub-b", point.Hub, "the point is opened on the chosen hub")

	// vm1's backup, running on hub-b, may still write its two disks there.
	seen(t, store, "hub-a", 2000-2*capacity)
	plan, err = b.plan(t, "wf-2", vmNamed("vm2", "vm-2"), activities.ModeAuto)
	require.NoError(t, err)
	assert.Equal(t, "hub-a", plan.HubID, "a tie goes to the smallest id")

	backdate(t, store, "hub-a", time.Hour)
	plan, err = b.plan(t, "wf-3", vmNamed("vm3", "vm-3"), activities.ModeAuto)
	require.NoError(t, err)
	assert.Equal(t, "hub-b", plan.HubID, "a stale hub is never chosen for a new chain")

	backdate(t, store, "hub-b", 45*time.Minute)
	_, err = a.plan(t, "wf-4", vmNamed("vm4", "vm-4"), activities.ModeAuto)
	appErr := requireAppError(t, err, activities.ErrNoHub, false)
	for _, want := range []string{
		`no hub is alive to start its chain`, `hub hub-0 last seen never`, `hub hub-a last seen 1h0m\d+s ago`,
		`hub hub-b last seen 45m\d+s ago`, `hub hub-c last seen 1h0m\d+s ago`, `within 30m0s\); start a hub worker`,
	} {
		assert.Regexp(t, want, appErr.Error())
	}
	vms, findErr := store.FindVMs(context.Background(), "vm4")
	require.NoError(t, findErr)
	require.Len(t, vms, 1)
	_, err = store.RunningPointForVM(context.Background(), vms[0].ID)
	require.ErrorIs(t, err, catalog.ErrNotFound, "no point is opened without a hub")
}

// New VMs whose backups start together spread over the hubs: a hub's room is its free bytes
// less the disks of the backups running on it, so the second VM does not land on the hub the
// first one is filling though both hubs had the same free bytes at their last heartbeat.
func TestPlanBackupSpreadsABurstOfNewVMs(t *testing.T) {
	testenv.Integration(t)
	store := newStore(t)
	a := hubRig(t, store, "hub-a")
	hubRig(t, store, "hub-b")
	seen(t, store, "hub-a", 100*capacity)
	seen(t, store, "hub-b", 100*capacity)

	var got []string
	for i, name := range []string{"vm1", "vm2", "vm3", "vm4"} {
		plan, err := a.plan(t, "wf-"+name, vmNamed(name, "vm-"+name), activities.ModeAuto)
		require.NoError(t, err, "VM %d", i+1)
		got = append(got, plan.HubID)
	}
	assert.Equal(t, []string{"hub-a", "hub-b", "hub-a", "hub-b"}, got)
	hubs, err := store.ListHubs(context.Background())
	require.NoError(t, err)
	require.Len(t, hubs, 2)
	for _, h := range hubs {
		assert.Equal(t, 4*capacity, h.PendingBytes, "hub %s: two running backups of two disks", h.ID)
	}
}

// A VM with a complete point stays on the hub of its chain, even when another hub is freer,
// the other hub's worker plans it, or the chain's hub is down (the plan then says it waits
// for that hub's worker). Restore and retention go to the chain's hub too.
func TestPlanBackupKeepsTheChainOnItsHub(t *testing.T) {
	testenv.Integration(t)
	store := newStore(t)
	hubRig(t, store, "hub-a")
	b := hubRig(t, store, "hub-b")
	seen(t, store, "hub-a", 2000)
	seen(t, store, "hub-b", 1000)
	vm := testVM()

	full, err := b.plan(t, "wf-full", vm, activities.ModeAuto)
	require.NoError(t, err)
	require.Equal(t, "hub-a", full.HubID)
	b.commit(t, full, map[int32]string{diskA: "/repo/a.qcow2", diskB: "/repo/b.qcow2"},
		map[int32]string{diskA: "52aa 01/10", diskB: "52bb 02/7"})

	seen(t, store, "hub-b", 1<<40)
	incr, err := b.plan(t, "wf-incr", vm, activities.ModeAuto)
	require.NoError(t, err)
	assert.Equal(t, "hub-a", incr.HubID, "an incremental stays beside its chain")
	assert.Equal(t, activities.ModeIncremental, incr.Mode)
	assert.Empty(t, incr.Note, "the chain's hub is alive")
	require.NoError(t, b.run(t, activities.FailPointName, activities.FailPointInput{PointID: incr.PointID, Error: "test"}, nil))

	forced, err := b.plan(t, "wf-forced", vm, activities.ModeFull)
	require.NoError(t, err)
	assert.Equal(t, "hub-a", forced.HubID, "a full backup of a VM with a chain stays on its hub")
	require.NoError(t, b.run(t, activities.FailPointName, activities.FailPointInput{PointID: forced.PointID, Error: "test"}, nil))

	backdate(t, store, "hub-a", time.Hour)
	waiting, err := b.plan(t, "wf-waiting", vm, activities.ModeAuto)
	require.NoError(t, err)
	assert.Equal(t, "hub-a", waiting.HubID, "never a hub without the chain")
	assert.Regexp(t, `^hub hub-a holding VM `+regexp.QuoteMeta(vm.Name)+`'s chain was last seen 1h0m\d+s ago; waiting for its worker$`,
		waiting.Note)
	require.NoError(t, b.run(t, activities.FailPointName, activities.FailPointInput{PointID: waiting.PointID, Error: "test"}, nil))

	var src activities.RestoreSource
	require.NoError(t, b.run(t, activities.ResolvePointName, activities.ResolvePointInput{VM: vm.Moref}, &src))
	assert.Equal(t, "hub-a", src.HubID, "a restore reads the point on its hub")
	retention, err := b.planRetention(t, activities.PlanRetentionInput{VM: vm.Moref})
	require.NoError(t, err)
	assert.Equal(t, "hub-a", retention.HubID, "retention is applied on the chain's hub")
}

// New VMs whose PlanBackups run at the very same moment, on both hubs' workers, still
// spread evenly: each placement sees the points the others opened (the choice and the
// opening of the point are one step under the hubs' lock).
func TestPlanBackupPlacesConcurrentNewVMsEvenly(t *testing.T) {
	testenv.Integration(t)
	store := newStore(t)
	rigs := []*rig{hubRig(t, store, "hub-a"), hubRig(t, store, "hub-b")}
	seen(t, store, "hub-a", 100*capacity)
	seen(t, store, "hub-b", 100*capacity)

	const n = 8
	hubs := make([]string, n)
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			name := fmt.Sprintf("vm%d", i)
			<-start
			plan, err := rigs[i%2].acts.PlanBackup(context.Background(), activities.PlanBackupInput{
				// A site each: the placements share no row but the hubs'.
				WorkflowID: "wf-" + name, RunID: "run-" + name, Site: "site-" + name, VM: vmNamed(name, "vm-"+name), Mode: activities.ModeAuto,
			})
			hubs[i], errs[i] = plan.HubID, err
		})
	}
	close(start)
	wg.Wait()
	count := map[string]int{}
	for i := range n {
		require.NoError(t, errs[i], "VM %d", i)
		count[hubs[i]]++
	}
	assert.Equal(t, map[string]int{"hub-a": n / 2, "hub-b": n / 2}, count, "placements: %v", hubs)
	listed, err := store.ListHubs(context.Background())
	require.NoError(t, err)
	for _, h := range listed {
		assert.Equal(t, n/2*2*capacity, h.PendingBytes, "hub %s: %d running backups of two disks", h.ID, n/2)
	}
}
