package lab_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/go-sql-driver/mysql"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/vsphere"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
	"github.com/diskferry/diskferry/workflows"
)

// TestTwentyConcurrentBackups starts 20 backups at once (10 VMs per site, two sites) in a
// lab of two hubs and checks: every backup completes and each point equals its own VM's
// disks (so no export or forward crossed between jobs); while they ran, every export served
// the run holding its port's lease, from that run's own VM directory on that run's hub, and
// no run held ports on two hubs; afterwards nothing is left: no snapshot, export process,
// export socket, lease, export row or stray repository file.
func TestTwentyConcurrentBackups(t *testing.T) {
	l := startLab(t, lab.Options{VMs: 20, Sites: 2, Hubs: 2, Disks: 2, DiskSize: 16 << 20})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	watch := watchExports(ctx, t, l)
	runs := startBackups(ctx, t, l, l.VC.VMs, workflows.BackupInput{})
	results := waitBackups(ctx, t, l, runs)
	stats := watch.stop()
	t.Logf("export watch: %d samples, at most %d ports leased at once, %d runs seen holding ports", stats.samples, stats.maxLeases, len(stats.runHub))

	hubsUsed := map[string]int{}
	for i, res := range results {
		vm := l.VC.VMs[i]
		t.Logf("%s at %s: point %s on %s in %s", vm.Name, l.Sites[i%2].Name, res.PointID, res.HubID, res.Duration.Round(time.Millisecond))
		hubsUsed[res.HubID]++
		hub := labHub(t, l, res.HubID)
		require.Len(t, res.Disks, len(vm.Disks))
		for j, d := range res.Disks {
			require.Equal(t, vm.Disks[j].Key, d.Key)
			require.True(t, strings.HasPrefix(d.Path, hub.RepoRoot+string(filepath.Separator)), "point of %s on %s is outside its repository: %s", vm.Name, res.HubID, d.Path)
			// vcsim makes no delta disks and nothing writes the VMs: the flat file is the
			// disk as every snapshot saw it.
			requireSameContent(ctx, t, vm.Disks[j].FlatPath, d.Path)
		}
		if hubID, ok := stats.runHub[workflows.BackupWorkflowID(vm.Name)]; ok {
			require.Equal(t, res.HubID, hubID, "%s leased ports on another hub than its point's", vm.Name)
		}
	}
	// Where new VMs go is placement's choice (all to the hub with the most free space, when
	// they start together): TestPlacementEndToEnd covers it.
	t.Logf("points per hub: %v", hubsUsed)
	require.Positive(t, stats.maxLeases, "the watch saw the running backups' leases")
	requireFleetComplete(ctx, t, l, results)
	requireFleetLeftNothing(ctx, t, l, results)
}

// startBackups starts one backup per VM, the i-th at site i mod the number of sites, each
// with in's other fields.
func startBackups(ctx context.Context, t testing.TB, l *lab.Lab, vms []vcsimtest.VM, in workflows.BackupInput) []client.WorkflowRun {
	t.Helper()
	var runs []client.WorkflowRun
	for i, vm := range vms {
		in := in
		in.VM, in.Site = vm.Name, l.Sites[i%len(l.Sites)].Name
		run, err := l.Temporal.Client.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
		require.NoError(t, err)
		runs = append(runs, run)
	}
	return runs
}

// waitBackups waits for every run and returns their results in order; a failed run fails the
// test with the workers' logs.
func waitBackups(ctx context.Context, t testing.TB, l *lab.Lab, runs []client.WorkflowRun) []workflows.BackupResult {
	t.Helper()
	results := make([]workflows.BackupResult, len(runs))
	for i, run := range runs {
		if err := getResult(ctx, run, &results[i]); err != nil {
			t.Fatalf("backup %s: %v\nwhere every backup stands:\n%s%s", run.GetID(), err, standings(l, runs), workerLogs(l))
		}
	}
	return results
}

// standings says, per run, its status, step and what it waits for: after a deadline, whether
// the runs were stuck and on what.
func standings(l *lab.Lab, runs []client.WorkflowRun) string {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var b strings.Builder
	for _, run := range runs {
		var p workflows.Progress
		v, err := l.Temporal.Client.QueryWorkflow(ctx, run.GetID(), run.GetRunID(), workflows.ProgressQueryName)
		if err == nil {
			err = v.Get(&p)
		}
		if err != nil {
			fmt.Fprintf(&b, "  %s: progress: %v\n", run.GetID(), err)
			continue
		}
		fmt.Fprintf(&b, "  %s: %s on %s, step %q, waiting for %q\n", run.GetID(), p.Status, p.HubID, p.Step, p.WaitingFor)
	}
	return b.String()
}

// getResult is run.Get, asked again while the dev server, overloaded by many runs on a busy
// machine, answers its long poll with DeadlineExceeded before ctx ends.
func getResult(ctx context.Context, run client.WorkflowRun, result any) error {
	for {
		err := run.Get(ctx, result)
		var overloaded *serviceerror.DeadlineExceeded
		if err == nil || ctx.Err() != nil || !(errors.As(err, &overloaded) || errors.Is(err, context.DeadlineExceeded)) {
			return err
		}
	}
}

func workerLogs(l *lab.Lab) string {
	var b strings.Builder
	for _, h := range l.Hubs {
		fmt.Fprintf(&b, "%s log:\n%s\n", h.Worker, tail(l.WorkerLog(h.Worker)))
	}
	for _, s := range l.Sites {
		fmt.Fprintf(&b, "%s log:\n%s\n", s.Worker, tail(l.WorkerLog(s.Worker)))
	}
	return b.String()
}

func labHub(t testing.TB, l *lab.Lab, id string) lab.Hub {
	t.Helper()
	for _, h := range l.Hubs {
		if h.ID == id {
			return h
		}
	}
	t.Fatalf("no hub %q in the lab", id)
	return lab.Hub{}
}

// exportWatch samples the catalog's port leases and exports while backups run.
type exportWatch struct {
	cancel context.CancelFunc
	done   chan struct{}
	t      testing.TB

	mu     sync.Mutex
	stats  watchStats
	faults []string
}

type watchStats struct {
	samples   int
	maxLeases int               // ports leased at once, every hub together
	runHub    map[string]string // the hub each run leased its ports on
}

// watchExports checks, in every sample of one consistent read: each lease belongs to one of
// the lab's backups, a run holds leases on one hub only (ever), and each export row serves
// the run that holds its port's lease, from that run's VM directory on that hub.
func watchExports(ctx context.Context, t testing.TB, l *lab.Lab) *exportWatch {
	t.Helper()
	// The hub workers may not have created the tables yet; migrating is locked and idempotent.
	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	err = store.Migrate(ctx)
	store.Close()
	require.NoError(t, err)
	db, err := sql.Open("mysql", l.DB.DSN)
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	vmDirs := map[string]map[string]string{} // hub → workflow ID → the VM's directory
	for _, h := range l.Hubs {
		layout, err := repo.New(h.RepoRoot)
		require.NoError(t, err)
		vmDirs[h.ID] = map[string]string{}
		for _, vm := range l.VC.VMs {
			dir, err := layout.VMDir(vm.Name, vm.Moref)
			require.NoError(t, err)
			vmDirs[h.ID][workflows.BackupWorkflowID(vm.Name)] = dir
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	w := &exportWatch{cancel: cancel, done: make(chan struct{}), t: t, stats: watchStats{runHub: map[string]string{}}}
	go func() {
		defer close(w.done)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			w.sample(ctx, db, vmDirs)
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return w
}

func (w *exportWatch) sample(ctx context.Context, db *sql.DB, vmDirs map[string]map[string]string) {
	// One statement reads one snapshot of both tables (InnoDB consistent read).
	rows, err := db.QueryContext(ctx, `
		SELECT 'lease', l.hub_id, l.port, l.workflow_id, '', '' FROM port_leases l
		UNION ALL
		SELECT 'export', e.hub_id, e.port, e.workflow_id, e.path, COALESCE(l.workflow_id, '')
		FROM exports e LEFT JOIN port_leases l ON l.hub_id = e.hub_id AND l.port = e.port`)
	if err != nil {
		if ctx.Err() == nil {
			w.fault("read leases and exports: %v", err)
		}
		return
	}
	defer rows.Close()
	w.mu.Lock()
	defer w.mu.Unlock()
	leased := map[string]string{}
	for rows.Next() {
		var kind, hub, wf, path, leaseWF string
		var port int
		if err := rows.Scan(&kind, &hub, &port, &wf, &path, &leaseWF); err != nil {
			w.faults = append(w.faults, fmt.Sprintf("scan: %v", err))
			return
		}
		slot := fmt.Sprintf("%s:%d", hub, port)
		switch kind {
		case "lease":
			if other, ok := leased[slot]; ok {
				w.faults = append(w.faults, fmt.Sprintf("port %s leased to %s and %s at once", slot, other, wf))
			}
			leased[slot] = wf
			if _, ok := vmDirs[hub][wf]; !ok {
				w.faults = append(w.faults, fmt.Sprintf("port %s leased to %s, no backup of the lab", slot, wf))
			}
			if first, ok := w.stats.runHub[wf]; ok && first != hub {
				w.faults = append(w.faults, fmt.Sprintf("%s leased ports on %s and on %s", wf, first, hub))
			}
			w.stats.runHub[wf] = hub
		case "export":
			if leaseWF != wf {
				w.faults = append(w.faults, fmt.Sprintf("export %s of %s (%s) on a port leased to %q", slot, wf, path, leaseWF))
			}
			if dir := vmDirs[hub][wf]; dir == "" || !strings.HasPrefix(path, dir+string(filepath.Separator)) {
				w.faults = append(w.faults, fmt.Sprintf("export %s of %s serves %s, outside its VM's directory %q", slot, wf, path, dir))
			}
		}
	}
	if err := rows.Err(); err != nil && ctx.Err() == nil {
		w.faults = append(w.faults, fmt.Sprintf("read leases and exports: %v", err))
	}
	w.stats.samples++
	w.stats.maxLeases = max(w.stats.maxLeases, len(leased))
}

func (w *exportWatch) fault(format string, args ...any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.faults = append(w.faults, fmt.Sprintf(format, args...))
}

// stop ends the watch, fails the test on what it found and returns what it saw.
func (w *exportWatch) stop() watchStats {
	w.t.Helper()
	w.cancel()
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	require.Empty(w.t, w.faults, "the export watch found crossings")
	require.Positive(w.t, w.stats.samples)
	return w.stats
}

// requireFleetComplete checks every point is complete with a changeId and digest per disk,
// on the hub its result names, and that no hub has a lease or export row left.
func requireFleetComplete(ctx context.Context, t testing.TB, l *lab.Lab, results []workflows.BackupResult) {
	t.Helper()
	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	defer store.Close()
	for _, res := range results {
		p, err := store.GetPoint(ctx, res.PointID)
		require.NoError(t, err)
		require.Equal(t, catalog.StatusComplete, p.Status, "point %s", res.PointID)
		require.Equal(t, res.HubID, p.Hub, "point %s", res.PointID)
		for _, d := range p.Disks {
			require.NotEmpty(t, d.ChangeID, "disk %d of point %s has no changeId", d.Key, res.PointID)
			require.NotEmpty(t, d.Digest, "disk %d of point %s has no digest", d.Key, res.PointID)
		}
	}
	ports, err := catalog.NewPorts(store, catalog.DefaultPortRange)
	require.NoError(t, err)
	for _, h := range l.Hubs {
		leases, err := ports.ListLeases(ctx, h.ID)
		require.NoError(t, err)
		require.Empty(t, leases, "port leases left on %s", h.ID)
		waiting, err := ports.Waiting(ctx, h.ID)
		require.NoError(t, err)
		require.Empty(t, waiting, "jobs left in the line for ports on %s", h.ID)
		exports, err := store.ListExports(ctx, h.ID)
		require.NoError(t, err)
		require.Empty(t, exports, "export rows left on %s", h.ID)
	}
}

// requireFleetLeftNothing checks no VM keeps a snapshot, no export process, socket or
// data-plane process is left, and each hub's repository holds exactly its points' files.
func requireFleetLeftNothing(ctx context.Context, t testing.TB, l *lab.Lab, results []workflows.BackupResult) {
	t.Helper()
	vc, err := vsphere.Connect(ctx, vsphere.Config{URL: l.VC.URL, User: l.VC.User, Password: l.VC.Password, Thumbprint: l.VC.Thumbprint})
	require.NoError(t, err)
	defer vc.Close(context.WithoutCancel(ctx))
	for _, v := range l.VC.VMs {
		vm, err := vc.FindVM(ctx, v.Moref)
		require.NoError(t, err)
		snaps, err := vc.ListSnapshots(ctx, vm)
		require.NoError(t, err)
		require.Empty(t, snaps, "snapshots left on %s", v.Name)
	}
	require.Empty(t, l.DataPlaneProcesses(), "data-plane processes left running")

	want := map[string]bool{}
	for _, res := range results {
		for _, d := range res.Disks {
			want[d.Path] = true
			want[repo.ManifestPath(d.Path)] = true
		}
	}
	for _, h := range l.Hubs {
		pidFiles, err := filepath.Glob(filepath.Join(h.RunDir, "*.pid"))
		require.NoError(t, err)
		for _, pf := range pidFiles {
			_, err := qemu.Find(pf)
			require.ErrorIs(t, err, qemu.ErrNotRunning, "export %s still running", pf)
		}
		sockets, err := filepath.Glob(filepath.Join(h.RunDir, "exports", "*.sock"))
		require.NoError(t, err)
		require.Empty(t, sockets, "export sockets left on %s", h.ID)
		err = filepath.Walk(h.RepoRoot, func(path string, info os.FileInfo, err error) error {
			if err != nil || info.IsDir() {
				return err
			}
			require.True(t, want[path], "unexpected file in %s's repository: %s", h.ID, path)
			delete(want, path)
			return nil
		})
		require.NoError(t, err)
	}
	require.Empty(t, want, "restore point files missing")
}

// portSteps is what a run's history says of its AllocatePorts: the attempts of every
// AllocatePorts, the hub's wake-ups (PortsFreeSignal), and when the lease was obtained.
type portSteps struct {
	attempts, wakeUps int
	leasedAt          time.Time
}

func portHistory(ctx context.Context, t testing.TB, l *lab.Lab, workflowID string) portSteps {
	t.Helper()
	var steps portSteps
	scheduled := map[int64]bool{}
	it := l.Temporal.Client.GetWorkflowHistory(ctx, workflowID, "", false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
	for it.HasNext() {
		ev, err := it.Next()
		require.NoError(t, err)
		if a := ev.GetActivityTaskScheduledEventAttributes(); a != nil && a.GetActivityType().GetName() == activities.AllocatePortsName {
			scheduled[ev.GetEventId()] = true
		}
		if a := ev.GetActivityTaskStartedEventAttributes(); a != nil && scheduled[a.GetScheduledEventId()] {
			steps.attempts += int(a.GetAttempt())
		}
		if a := ev.GetActivityTaskCompletedEventAttributes(); a != nil && scheduled[a.GetScheduledEventId()] {
			steps.leasedAt = ev.GetEventTime().AsTime()
		}
		if a := ev.GetWorkflowExecutionSignaledEventAttributes(); a != nil && a.GetSignalName() == activities.PortsFreeSignal {
			steps.wakeUps++
		}
	}
	require.False(t, steps.leasedAt.IsZero(), "%s never leased its ports", workflowID)
	return steps
}

// TestPortExhaustionQueues runs 10 backups of 2-disk VMs at once on a hub of 4 export ports:
// the backups queue for ports instead of failing, and while they wait one of them says so
// in its progress (waitingFor names "a port on hub <id>"). All complete, each equal to its
// VM, nothing is left, and the waiting is no busy loop: a run's AllocatePorts attempts stay
// within one per second of its run time (the wait backs off from 1 s up). A run leases all
// its disks' ports at once: runs holding one port each while waiting for a second would
// deadlock. The hub serves its line for ports in order and wakes the runs a release made
// room for: some run's history holds that wake-up, and the line is empty at the end.
func TestPortExhaustionQueues(t *testing.T) {
	l := startLab(t, lab.Options{VMs: 10, Disks: 2, DiskSize: 16 << 20, PortsPerHub: 4})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	watch := watchExports(ctx, t, l)
	runs := startBackups(ctx, t, l, l.VC.VMs, workflows.BackupInput{})
	want := "a port on hub " + l.HubID
	waitingSeen := make(chan string, 1)
	pollCtx, stopPoll := context.WithCancel(ctx)
	var polled sync.WaitGroup
	polled.Add(1)
	go func() {
		defer polled.Done()
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			for _, run := range runs {
				var p workflows.Progress
				v, err := l.Temporal.Client.QueryWorkflow(pollCtx, run.GetID(), run.GetRunID(), workflows.ProgressQueryName)
				if err == nil && v.Get(&p) == nil && strings.Contains(p.WaitingFor, want) {
					waitingSeen <- run.GetID() + ": " + p.WaitingFor
					return
				}
			}
			select {
			case <-pollCtx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	results := waitBackups(ctx, t, l, runs)
	stopPoll()
	polled.Wait()
	stats := watch.stop()

	require.LessOrEqual(t, stats.maxLeases, 4, "more ports leased than the hub has")
	select {
	case seen := <-waitingSeen:
		t.Logf("progress while queued: %s", seen)
	default:
		t.Fatalf("no backup's progress ever said it waited for %q", want)
	}
	woken := 0
	for i, res := range results {
		vm := l.VC.VMs[i]
		for j, d := range res.Disks {
			requireSameContent(ctx, t, vm.Disks[j].FlatPath, d.Path)
		}
		steps := portHistory(ctx, t, l, runs[i].GetID())
		bound := 1 + int(res.Duration/time.Second)
		t.Logf("%s: %d AllocatePorts attempts, %d wake-ups by the hub in %s", vm.Name, steps.attempts, steps.wakeUps, res.Duration.Round(time.Millisecond))
		require.LessOrEqual(t, steps.attempts, bound, "%s retried AllocatePorts more than once a second", vm.Name)
		woken += steps.wakeUps
	}
	require.Positive(t, woken, "no waiting run was woken by a hub's release")
	requireFleetComplete(ctx, t, l, results)
	requireFleetLeftNothing(ctx, t, l, results)
}

// TestPortLineIsFirstComeFirstServed shows the hub's line for ports end to end, without
// timing: two mounts hold 3 of the hub's 4 ports; a 2-disk backup is refused and joins the
// line; a 1-disk backup started after it is refused too although a port is free (without the
// line it would take it and the 2-disk backup could wait for ever behind such jobs). Once a
// mount ends, the 2-disk backup leases its ports before the 1-disk one, both complete, and
// nothing is left. diskferry hubs show, meanwhile, shows the leases and the line in order.
func TestPortLineIsFirstComeFirstServed(t *testing.T) {
	l := startLab(t, lab.Options{VMs: 4, Disks: 2, DiskSize: 8 << 20, PortsPerHub: 4})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	defer store.Close()
	ports, err := catalog.NewPorts(store, catalog.DefaultPortRange)
	require.NoError(t, err)
	leases := func() int {
		ls, err := ports.ListLeases(ctx, l.HubID)
		require.NoError(t, err)
		return len(ls)
	}
	vms := l.VC.VMs

	// Two points to mount: all of the first's disks and one of the second's hold 3 ports.
	held := waitBackups(ctx, t, l, startBackups(ctx, t, l, vms[:2], workflows.BackupInput{}))
	mountAll, _ := startMount(ctx, t, l, workflows.MountInput{Point: held[0].PointID})
	mountOne, _ := startMount(ctx, t, l, workflows.MountInput{Point: held[1].PointID, Disks: []int32{vms[1].Disks[0].Key}})
	require.Equal(t, 3, leases())

	inLine := func(want ...string) {
		t.Helper()
		require.Eventually(t, func() bool {
			waiting, err := ports.Waiting(ctx, l.HubID)
			require.NoError(t, err)
			return slices.Equal(waiting, want)
		}, time.Minute, 50*time.Millisecond, "the hub's line for ports never became %v", want)
	}
	twoDisks := startBackups(ctx, t, l, vms[2:3], workflows.BackupInput{})[0]
	inLine(twoDisks.GetID())
	oneDisk := startBackups(ctx, t, l, vms[3:4], workflows.BackupInput{Disks: []int32{vms[3].Disks[0].Key}})[0]
	inLine(twoDisks.GetID(), oneDisk.GetID())
	require.Equal(t, 3, leases(), "the free port is kept for the first in line")

	// The operator's view of it: the hub worker's own record, the 3 leases, the line in order.
	cli := lab.Build(t, t.TempDir(), "./starter", "diskferry")
	var shown struct {
		LastSeen *time.Time `json:"lastSeen"`
		Leases   []struct {
			WorkflowID string `json:"workflowId"`
		} `json:"leases"`
		Line []struct {
			WorkflowID string `json:"workflowId"`
			Needed     int    `json:"needed"`
		} `json:"line"`
	}
	out := run(ctx, t, l, cli, "hubs", "show", l.HubID, "--json")
	require.NoError(t, json.Unmarshal([]byte(out), &shown), out)
	require.NotNil(t, shown.LastSeen, "the hub worker records itself")
	require.Len(t, shown.Leases, 3)
	require.Len(t, shown.Line, 2)
	require.Equal(t, twoDisks.GetID(), shown.Line[0].WorkflowID)
	require.Equal(t, 2, shown.Line[0].Needed)
	require.Equal(t, oneDisk.GetID(), shown.Line[1].WorkflowID)

	require.NoError(t, l.Temporal.Client.SignalWorkflow(ctx, mountOne.GetID(), "", workflows.UnmountSignalName, nil))
	var ended workflows.MountInfo
	require.NoError(t, mountOne.Get(ctx, &ended))
	results := waitBackups(ctx, t, l, []client.WorkflowRun{twoDisks, oneDisk})
	first, second := portHistory(ctx, t, l, twoDisks.GetID()).leasedAt, portHistory(ctx, t, l, oneDisk.GetID()).leasedAt
	t.Logf("2-disk backup leased its ports at %s, the 1-disk backup at %s", first.Format(time.StampMilli), second.Format(time.StampMilli))
	require.True(t, first.Before(second), "the 1-disk backup leased before the 2-disk one ahead of it in line")
	require.Len(t, results[1].Disks, 1)
	requireSameContent(ctx, t, vms[3].Disks[0].FlatPath, results[1].Disks[0].Path)
	for j, d := range results[0].Disks {
		requireSameContent(ctx, t, vms[2].Disks[j].FlatPath, d.Path)
	}

	require.NoError(t, l.Temporal.Client.SignalWorkflow(ctx, mountAll.GetID(), "", workflows.UnmountSignalName, nil))
	require.NoError(t, mountAll.Get(ctx, &ended))
	all := append(held, results...)
	requireFleetComplete(ctx, t, l, all)
	requireFleetLeftNothing(ctx, t, l, all)
}
