package catalog

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func sampleVMConfig() *VMConfig {
	return &VMConfig{
		NumCPUs: 4, CoresPerSocket: 2, MemoryMB: 8192, Firmware: "efi", GuestID: "debian12_64Guest",
		Disks: []DiskLayout{
			{Key: 2000, CapacityBytes: 1 << 30, ControllerKey: 1000, ControllerType: "pvscsi", BusNumber: 0, UnitNumber: 0, Provisioning: "thin"},
			{Key: 2016, CapacityBytes: 2 << 30, ControllerKey: 1001, ControllerType: "lsilogic", BusNumber: 1, UnitNumber: 3},
		},
		NICs: []NIC{{Key: 4000, AdapterType: "vmxnet3", Network: "VM Network", NetworkKind: "standard", AddressType: "manual", MACAddress: "00:50:56:3f:00:01"}},
	}
}

func TestVMConfigRoundTripsWithPoint(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")

	req := fullRequest(vm, "wf-1")
	req.VMConfig = sampleVMConfig()
	p, err := s.OpenPoint(ctx, req)
	require.NoError(t, err)
	assert.Equal(t, sampleVMConfig(), p.VMConfig)

	d := diskResult(2000, "/r/vm/"+p.ID+"/disk-2000.qcow2", "", ModeFull, "52 a/1")
	require.NoError(t, s.AddPointDisk(ctx, p.ID, d))
	_, err = s.CompletePoint(ctx, p.ID, []PointDisk{d})
	require.NoError(t, err)

	got, err := s.GetPoint(ctx, p.ID)
	require.NoError(t, err)
	assert.Equal(t, sampleVMConfig(), got.VMConfig)
	last, err := s.LastCompletePoint(ctx, vm.ID)
	require.NoError(t, err)
	assert.Equal(t, sampleVMConfig(), last.VMConfig)

	var stored string
	require.NoError(t, s.DB().QueryRowContext(ctx, "SELECT JSON_EXTRACT(vm_config, '$.disks[1].controllerType') FROM restore_points WHERE id = ?", p.ID).Scan(&stored))
	assert.Equal(t, `"lsilogic"`, stored, "kept as JSON the database can query")
}

// Points opened without a configuration (all points from before it was captured) read as
// "not captured"; a new run taking over a running point records its own.
func TestVMConfigNotCapturedAndTakenOver(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")

	old, err := s.OpenPoint(ctx, fullRequest(vm, "wf-1"))
	require.NoError(t, err)
	assert.Nil(t, old.VMConfig)
	got, err := s.GetPoint(ctx, old.ID)
	require.NoError(t, err)
	assert.Nil(t, got.VMConfig)

	req := fullRequest(vm, "wf-1")
	req.RunID, req.VMConfig = "run-2", sampleVMConfig()
	adopted, err := s.OpenPoint(ctx, req)
	require.NoError(t, err)
	assert.Equal(t, old.ID, adopted.ID)
	assert.Equal(t, sampleVMConfig(), adopted.VMConfig)
}

func TestFindPointsByVMNameOrMoref(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	a, b := newVM(t, s, "vm-1"), newVM(t, s, "vm-2")
	var ids []string
	for i, vm := range []VM{a, b, a} {
		p, err := s.OpenPoint(ctx, fullRequest(vm, fmt.Sprintf("wf-%d", i)))
		require.NoError(t, err)
		require.NoError(t, s.FailPoint(ctx, p.ID, "stop"))
		ids = append(ids, p.ID)
	}

	all, err := s.FindPoints(ctx, "")
	require.NoError(t, err)
	require.Len(t, all, 3)
	assert.Equal(t, ids[2], all[0].ID, "newest first")
	assert.Equal(t, "name-vm-2", all[1].VM.Name)

	for _, ref := range []string{"vm-1", "name-vm-1"} {
		of, err := s.FindPoints(ctx, ref)
		require.NoError(t, err)
		require.Len(t, of, 2, ref)
		assert.Equal(t, []string{ids[2], ids[0]}, []string{of[0].ID, of[1].ID}, ref)
		assert.Equal(t, "vm-1", of[0].VM.Moref)
	}
	none, err := s.FindPoints(ctx, "no-such-vm")
	require.NoError(t, err)
	assert.Empty(t, none)
}

func TestCheckSchema(t *testing.T) {
	ctx := testCtx(t)
	latest, err := LatestSchemaVersion()
	require.NoError(t, err)
	assert.GreaterOrEqual(t, latest, int64(8), "the retention migrations are embedded")

	s := newStore(t)
	require.NoError(t, s.CheckSchema(ctx))
	_, err = s.DB().ExecContext(ctx, "DELETE FROM goose_db_version WHERE version_id = ?", latest)
	require.NoError(t, err)
	// Migration numbers may have gaps: the version behind is whatever is applied below.
	previous, err := s.SchemaVersion(ctx)
	require.NoError(t, err)
	require.Less(t, previous, latest)
	err = s.CheckSchema(ctx)
	require.ErrorIs(t, err, ErrSchemaBehind)
	assert.ErrorContains(t, err, fmt.Sprintf("at version %d, this build needs %d", previous, latest))
}

// A listing of more points than a statement takes placeholders (65535) gets every point's
// disks.
func TestFindPointsLoadsDisksOfManyPoints(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)
	vm := newVM(t, s, "vm-1")
	first, err := s.OpenPoint(ctx, fullRequest(vm, "wf-0"))
	require.NoError(t, err)
	require.NoError(t, s.FailPoint(ctx, first.ID, "stop"))
	const n = 66000
	// MariaDB's sequence engine makes the rows in two statements.
	_, err = s.DB().ExecContext(ctx, `INSERT INTO restore_points (id, vm_id, workflow_id, run_id, site_id, hub_id, mode, status, started_at)
		SELECT CONCAT('p-', seq), ?, CONCAT('wf-', seq), 'run-1', 'site-a', 'hub-1', 'full', 'failed', NOW(6) FROM seq_1_to_`+fmt.Sprint(n), vm.ID)
	require.NoError(t, err)
	_, err = s.DB().ExecContext(ctx, `INSERT INTO point_disks (point_id, disk_key, target_path, mode, capacity_bytes)
		SELECT CONCAT('p-', seq), 2000, CONCAT('/r/p-', seq, '.qcow2'), 'full', seq FROM seq_1_to_`+fmt.Sprint(n))
	require.NoError(t, err)

	points, err := s.FindPoints(ctx, "")
	require.NoError(t, err)
	require.Len(t, points, n+1)
	withDisk := 0
	for _, p := range points {
		if p.ID == first.ID {
			assert.Empty(t, p.Disks)
			continue
		}
		require.Len(t, p.Disks, 1, p.ID)
		assert.Equal(t, "/r/"+p.ID+".qcow2", p.Disks[0].Path)
		withDisk++
	}
	assert.Equal(t, n, withDisk)
}
