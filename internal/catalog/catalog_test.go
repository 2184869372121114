package catalog

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.WithSharedMariaDB(m.Run)) }

var quiet = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

// newStore returns a migrated store on a fresh database.
func newStore(t *testing.T) *Store {
	t.Helper()
	mdb := testenv.MariaDB(t)
	store := openStore(t, mdb.DSN)
	require.NoError(t, store.Migrate(testCtx(t)))
	return store
}

func openStore(t *testing.T, dsn string) *Store {
	t.Helper()
	store, err := Open(testCtx(t), dsn, quiet)
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	return store
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestMigrateConcurrentlyAndAgain(t *testing.T) {
	mdb := testenv.MariaDB(t)
	ctx := testCtx(t)
	a, b := openStore(t, mdb.DSN), openStore(t, mdb.DSN)

	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, s := range []*Store{a, b} {
		wg.Go(func() { errs[i] = s.Migrate(ctx) })
	}
	wg.Wait()
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	require.NoError(t, a.Migrate(ctx), "second run applies nothing")

	version, err := a.SchemaVersion(ctx)
	require.NoError(t, err)
	latest, err := LatestSchemaVersion()
	require.NoError(t, err)
	assert.Equal(t, latest, version)
	for _, table := range []string{"sites", "hubs", "vms", "disks", "restore_points", "point_disks", "port_leases", "exports"} {
		var n int
		require.NoError(t, a.DB().QueryRowContext(ctx, "SELECT COUNT(*) FROM "+table).Scan(&n), table)
	}
}

func TestOpenRejectsBadDSN(t *testing.T) {
	_, err := Open(context.Background(), "not a dsn", quiet)
	require.Error(t, err)
}

func TestUpsertVMFollowsRenameAndDisks(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)

	vm, err := s.UpsertVM(ctx, VM{InstanceUUID: "vc-1", Moref: "vm-42", Name: "web"}, []Disk{
		{Key: 2000, Label: "Hard disk 1", CapacityBytes: 1 << 30, BackingFile: "[ds] web/web.vmdk"},
		{Key: 2001, Label: "Hard disk 2", CapacityBytes: 2 << 30},
	})
	require.NoError(t, err)
	require.NotZero(t, vm.ID)

	again, err := s.UpsertVM(ctx, VM{InstanceUUID: "vc-1", Moref: "vm-42", Name: "web-renamed"}, []Disk{
		{Key: 2001, Label: "Hard disk 2", CapacityBytes: 4 << 30},
	})
	require.NoError(t, err)
	assert.Equal(t, vm.ID, again.ID, "same vCenter and moref is the same VM")

	got, err := s.FindVM(ctx, "vc-1", "vm-42")
	require.NoError(t, err)
	assert.Equal(t, "web-renamed", got.Name)
	disks, err := s.Disks(ctx, vm.ID)
	require.NoError(t, err)
	assert.Equal(t, []Disk{{Key: 2001, Label: "Hard disk 2", CapacityBytes: 4 << 30}}, disks)

	other, err := s.UpsertVM(ctx, VM{InstanceUUID: "vc-2", Moref: "vm-42", Name: "web"}, nil)
	require.NoError(t, err)
	assert.NotEqual(t, vm.ID, other.ID, "the same moref in another vCenter is another VM")

	_, err = s.FindVM(ctx, "vc-1", "vm-404")
	assert.ErrorIs(t, err, ErrNotFound)
	_, err = s.UpsertVM(ctx, VM{Moref: "vm-1"}, nil)
	assert.ErrorIs(t, err, ErrInvalid)
}

func newVM(t *testing.T, s *Store, moref string) VM {
	t.Helper()
	vm, err := s.UpsertVM(testCtx(t), VM{InstanceUUID: "vc-1", Moref: moref, Name: "name-" + moref}, []Disk{{Key: 2000, CapacityBytes: 1 << 30}})
	require.NoError(t, err)
	return vm
}

func fullRequest(vm VM, workflowID string) OpenPointRequest {
	return OpenPointRequest{WorkflowID: workflowID, RunID: "run-1", Site: "site-a", Hub: "hub-1", VMID: vm.ID, Mode: ModeFull}
}

func TestOpenPointIsIdempotentPerRunAndRefusesSecondBackup(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")

	p, err := s.OpenPoint(ctx, fullRequest(vm, "wf-1"))
	require.NoError(t, err)
	assert.Equal(t, StatusRunning, p.Status)
	assert.Regexp(t, `^\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}$`, p.ID)

	retry, err := s.OpenPoint(ctx, fullRequest(vm, "wf-1"))
	require.NoError(t, err)
	assert.Equal(t, p.ID, retry.ID, "a retried activity gets the same point")

	_, err = s.OpenPoint(ctx, fullRequest(vm, "wf-2"))
	var running *BackupRunningError
	require.ErrorAs(t, err, &running)
	assert.ErrorIs(t, err, ErrBackupRunning)
	assert.Equal(t, "wf-1", running.WorkflowID)
	assert.Equal(t, p.ID, running.PointID)

	// A new run of the same workflow id continues the abandoned point.
	req := fullRequest(vm, "wf-1")
	req.RunID = "run-2"
	adopted, err := s.OpenPoint(ctx, req)
	require.NoError(t, err)
	assert.Equal(t, p.ID, adopted.ID)
	assert.Equal(t, "run-2", adopted.RunID)

	got, err := s.RunningPointForVM(ctx, vm.ID)
	require.NoError(t, err)
	assert.Equal(t, p.ID, got.ID)

	all, err := s.ListPoints(ctx, vm.ID, "")
	require.NoError(t, err)
	assert.Len(t, all, 1, "no duplicate rows")

	// Once it failed, the VM can be backed up again.
	require.NoError(t, s.FailPoint(ctx, p.ID, "boom"))
	next, err := s.OpenPoint(ctx, fullRequest(vm, "wf-2"))
	require.NoError(t, err)
	assert.NotEqual(t, p.ID, next.ID)
}

func TestOpenPointConcurrentWorkflowsOneWins(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")

	const callers = 12
	var wg sync.WaitGroup
	errs := make([]error, callers)
	for i := range callers {
		wg.Go(func() {
			_, errs[i] = s.OpenPoint(ctx, fullRequest(vm, fmt.Sprintf("wf-%d", i)))
		})
	}
	wg.Wait()
	won := 0
	for _, err := range errs {
		if err == nil {
			won++
			continue
		}
		require.ErrorIs(t, err, ErrBackupRunning)
	}
	assert.Equal(t, 1, won)
}

func TestOpenPointValidatesModeAndParent(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm, other := newVM(t, s, "vm-1"), newVM(t, s, "vm-2")

	bad := fullRequest(vm, "wf-x")
	bad.Mode = ModeIncremental
	_, err := s.OpenPoint(ctx, bad)
	assert.ErrorIs(t, err, ErrInvalid, "incremental without parent")

	base, err := s.OpenPoint(ctx, fullRequest(other, "wf-other"))
	require.NoError(t, err)
	inc := fullRequest(vm, "wf-inc")
	inc.Mode, inc.ParentID = ModeIncremental, base.ID
	_, err = s.OpenPoint(ctx, inc)
	assert.ErrorIs(t, err, ErrInvalid, "parent running and of another VM")

	inc.ParentID = "no-such-point"
	_, err = s.OpenPoint(ctx, inc)
	assert.ErrorIs(t, err, ErrNotFound)

	missing := fullRequest(VM{ID: 999999}, "wf-y")
	_, err = s.OpenPoint(ctx, missing)
	assert.ErrorIs(t, err, ErrNotFound)
}

func diskResult(key int32, path, parent, mode, changeID string) PointDisk {
	return PointDisk{Key: key, Path: path, ParentPath: parent, Mode: mode, ChangeID: changeID, CapacityBytes: 1 << 30,
		BytesRead: 100, BytesWritten: 80, BytesZeroed: 20, Duration: 1500 * time.Millisecond, Digest: "sha256:" + changeID}
}

func TestPointLifecycleChainAndListing(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")

	_, err := s.LastCompletePoint(ctx, vm.ID)
	require.ErrorIs(t, err, ErrNotFound)

	full, err := s.OpenPoint(ctx, fullRequest(vm, "wf-full"))
	require.NoError(t, err)
	for _, key := range []int32{2000, 2001} {
		d := PointDisk{Key: key, Path: fmt.Sprintf("/r/vm/%s/disk-%d.qcow2", full.ID, key), Mode: ModeFull, CapacityBytes: 1 << 30}
		require.NoError(t, s.AddPointDisk(ctx, full.ID, d))
		require.NoError(t, s.AddPointDisk(ctx, full.ID, d), "retry")
	}
	got, err := s.GetPoint(ctx, full.ID)
	require.NoError(t, err)
	require.Len(t, got.Disks, 2)

	upd := diskResult(2000, got.Disks[0].Path, "", ModeFull, "52 a/1")
	require.NoError(t, s.UpdatePointDisk(ctx, full.ID, upd))
	require.NoError(t, s.UpdatePointDisk(ctx, full.ID, upd), "same values again")
	assert.ErrorIs(t, s.UpdatePointDisk(ctx, full.ID, PointDisk{Key: 9999}), ErrNotFound)

	_, err = s.CompletePoint(ctx, full.ID, []PointDisk{upd})
	assert.ErrorIs(t, err, ErrInvalid, "disk 2001 has no result")

	fullDisks := []PointDisk{upd, diskResult(2001, got.Disks[1].Path, "", ModeFull, "52 b/1")}
	done, err := s.CompletePoint(ctx, full.ID, fullDisks)
	require.NoError(t, err)
	assert.Equal(t, StatusComplete, done.Status)
	assert.False(t, done.FinishedAt.IsZero())
	assert.Equal(t, int64(200), done.BytesRead)
	assert.Equal(t, fullDisks, done.Disks)

	again, err := s.CompletePoint(ctx, full.ID, fullDisks)
	require.NoError(t, err, "complete is idempotent")
	assert.Equal(t, done.FinishedAt, again.FinishedAt, "a retry keeps the finish time")
	assert.ErrorIs(t, s.AddPointDisk(ctx, full.ID, fullDisks[0]), ErrPointComplete)

	last, err := s.LastCompletePoint(ctx, vm.ID)
	require.NoError(t, err)
	assert.Equal(t, full.ID, last.ID)
	assert.Equal(t, "52 a/1", last.Disks[0].ChangeID)

	inc1 := openIncremental(t, s, vm, "wf-inc1", last)
	inc2 := openIncremental(t, s, vm, "wf-inc2", inc1)

	chain, err := s.ChainOf(ctx, inc2.ID)
	require.NoError(t, err)
	require.Len(t, chain, 3)
	assert.Equal(t, []string{full.ID, inc1.ID, inc2.ID}, []string{chain[0].ID, chain[1].ID, chain[2].ID}, "base first")
	assert.Equal(t, chain[1].Disks[0].Path, chain[2].Disks[0].ParentPath)

	failed, err := s.OpenPoint(ctx, fullRequest(vm, "wf-failed"))
	require.NoError(t, err)
	require.NoError(t, s.FailPoint(ctx, failed.ID, "copy: connection reset"))

	complete, err := s.ListPoints(ctx, vm.ID, StatusComplete)
	require.NoError(t, err)
	assert.Equal(t, []string{inc2.ID, inc1.ID, full.ID}, pointIDs(complete), "newest first")
	assert.Len(t, complete[0].Disks, 2)
	all, err := s.ListPoints(ctx, vm.ID, "")
	require.NoError(t, err)
	assert.Len(t, all, 4)

	latest, err := s.LastCompletePoint(ctx, vm.ID)
	require.NoError(t, err)
	assert.Equal(t, inc2.ID, latest.ID, "a failed point is never the base")
}

// openIncremental runs an incremental point on parent through to complete.
func openIncremental(t *testing.T, s *Store, vm VM, workflowID string, parent Point) Point {
	t.Helper()
	ctx := testCtx(t)
	req := fullRequest(vm, workflowID)
	req.Mode, req.ParentID = ModeIncremental, parent.ID
	p, err := s.OpenPoint(ctx, req)
	require.NoError(t, err)
	var disks []PointDisk
	for _, pd := range parent.Disks {
		d := diskResult(pd.Key, fmt.Sprintf("/r/vm/%s/disk-%d.qcow2", p.ID, pd.Key), pd.Path, ModeIncremental, pd.ChangeID+"+")
		require.NoError(t, s.AddPointDisk(ctx, p.ID, d))
		disks = append(disks, d)
	}
	done, err := s.CompletePoint(ctx, p.ID, disks)
	require.NoError(t, err)
	assert.Equal(t, parent.ID, done.ParentID)
	return done
}

func pointIDs(points []Point) []string {
	var ids []string
	for _, p := range points {
		ids = append(ids, p.ID)
	}
	return ids
}

func TestFailPointIsIdempotentAndNeverUndoesComplete(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")

	p, err := s.OpenPoint(ctx, fullRequest(vm, "wf-1"))
	require.NoError(t, err)
	require.NoError(t, s.AddPointDisk(ctx, p.ID, PointDisk{Key: 2000, Path: "/r/x.qcow2", Mode: ModeFull}))
	require.NoError(t, s.FailPoint(ctx, p.ID, "first error"))
	require.NoError(t, s.FailPoint(ctx, p.ID, "second error"))
	got, err := s.GetPoint(ctx, p.ID)
	require.NoError(t, err)
	assert.Equal(t, StatusFailed, got.Status)
	assert.Equal(t, "first error", got.Error)

	_, err = s.CompletePoint(ctx, p.ID, []PointDisk{{Key: 2000, Path: "/r/x.qcow2", Mode: ModeFull}})
	assert.ErrorIs(t, err, ErrPointFailed)
	assert.ErrorIs(t, s.AddPointDisk(ctx, p.ID, PointDisk{Key: 2001, Path: "/r/y.qcow2", Mode: ModeFull}), ErrPointFailed)

	ok, err := s.OpenPoint(ctx, fullRequest(vm, "wf-2"))
	require.NoError(t, err)
	_, err = s.CompletePoint(ctx, ok.ID, []PointDisk{{Key: 2000, Path: "/r/z.qcow2", Mode: ModeFull}})
	require.NoError(t, err)
	assert.ErrorIs(t, s.FailPoint(ctx, ok.ID, "late compensation"), ErrPointComplete)
	got, err = s.GetPoint(ctx, ok.ID)
	require.NoError(t, err)
	assert.Equal(t, StatusComplete, got.Status)

	assert.ErrorIs(t, s.FailPoint(ctx, "no-such-point", "x"), ErrNotFound)

	long, err := s.OpenPoint(ctx, fullRequest(vm, "wf-3"))
	require.NoError(t, err)
	require.NoError(t, s.FailPoint(ctx, long.ID, string(make([]byte, 100000))), "an overlong error is cut, not refused")
}

func TestExportsRecordListRemove(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)

	e := Export{Hub: "hub-1", Port: 10101, PID: 1234, Path: "/r/a.qcow2", WorkflowID: "wf-1", DiskKey: 2000, ReadOnly: true}
	require.NoError(t, s.RecordExport(ctx, e))
	e.PID = 5678
	require.NoError(t, s.RecordExport(ctx, e), "re-recorded after a restart")
	require.NoError(t, s.RecordExport(ctx, Export{Hub: "hub-1", Port: 10100, PID: 1, Path: "/r/b.qcow2", WorkflowID: "wf-2", DiskKey: 7}))
	require.NoError(t, s.RecordExport(ctx, Export{Hub: "hub-2", Port: 10100, PID: 2, Path: "/r/c.qcow2", WorkflowID: "wf-3", DiskKey: 7}))

	list, err := s.ListExports(ctx, "hub-1")
	require.NoError(t, err)
	require.Len(t, list, 2)
	assert.Equal(t, 10100, list[0].Port)
	assert.Equal(t, 5678, list[1].PID)
	assert.Equal(t, "wf-1", list[1].WorkflowID)
	assert.True(t, list[1].ReadOnly, "a read-only export is remembered read-only")
	assert.False(t, list[0].ReadOnly)
	assert.False(t, list[1].StartedAt.IsZero())

	require.NoError(t, s.RemoveExport(ctx, "hub-1", 10101))
	require.NoError(t, s.RemoveExport(ctx, "hub-1", 10101), "idempotent")
	list, err = s.ListExports(ctx, "hub-1")
	require.NoError(t, err)
	assert.Len(t, list, 1)

	assert.ErrorIs(t, s.RecordExport(ctx, Export{Hub: "hub-1", Port: 0, PID: 1, Path: "/x", WorkflowID: "wf"}), ErrInvalid)
}

func TestErrorsWrapContext(t *testing.T) {
	s := newStore(t)
	_, err := s.GetPoint(testCtx(t), "missing-point")
	require.Error(t, err)
	assert.True(t, errors.Is(err, ErrNotFound))
	assert.Contains(t, err.Error(), "missing-point")
}

// A point opened incremental whose every disk was copied in full after all (vCenter refused
// the previous changeId) completes as a full point on no parent, and keeps each disk's reason.
func TestCompletePointAllFullDropsParentAndKeepsReason(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")
	base, err := s.OpenPoint(ctx, fullRequest(vm, "wf-base"))
	require.NoError(t, err)
	d := diskResult(2000, "/r/vm/"+base.ID+"/disk-2000.qcow2", "", ModeFull, "52 a/1")
	d.Reason = "no previous restore point"
	require.NoError(t, s.AddPointDisk(ctx, base.ID, d))
	base, err = s.CompletePoint(ctx, base.ID, []PointDisk{d})
	require.NoError(t, err)
	assert.Equal(t, "no previous restore point", base.Disks[0].Reason)

	req := fullRequest(vm, "wf-refused")
	req.Mode, req.ParentID = ModeIncremental, base.ID
	p, err := s.OpenPoint(ctx, req)
	require.NoError(t, err)
	incr := diskResult(2000, "/r/vm/"+p.ID+"/disk-2000.qcow2", d.Path, ModeIncremental, "")
	require.NoError(t, s.AddPointDisk(ctx, p.ID, incr))
	full := diskResult(2000, incr.Path, "", ModeFull, "52 b/9")
	full.Reason = `vCenter refused the previous changeId "52 a/1"`
	require.NoError(t, s.AddPointDisk(ctx, p.ID, full), "the target re-prepared as full")
	done, err := s.CompletePoint(ctx, p.ID, []PointDisk{full})
	require.NoError(t, err)
	assert.Equal(t, ModeFull, done.Mode)
	assert.Empty(t, done.ParentID)
	require.Len(t, done.Disks, 1)
	assert.Equal(t, full.Reason, done.Disks[0].Reason)
	assert.Empty(t, done.Disks[0].ParentPath)
}
