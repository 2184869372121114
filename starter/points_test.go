package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.WithSharedMariaDB(m.Run)) }

// runCLI runs the diskferry command with args and returns what it printed on stdout.
func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCommand()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(args)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

// pointsCatalog is a migrated catalog holding, for VM web01: a complete full point with its
// VM configuration whose targets exist here (one manifest missing), a complete incremental
// on it whose targets are elsewhere; for VM db01 a failed point from before VM
// configurations were kept.
type pointsCatalog struct {
	dsn                    string
	full, incr, old        catalog.Point
	fullConfig             *catalog.VMConfig
	fullTargets, incrPaths map[int32]string
}

// cliCatalog is a fresh migrated catalog on the shared MariaDB, open until the test ends,
// which the diskferry command reads (DISKFERRY_DB_DSN).
func cliCatalog(t *testing.T) (*catalog.Store, string) {
	t.Helper()
	testenv.Integration(t)
	mdb := testenv.MariaDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	store, err := catalog.Open(ctx, mdb.DSN, slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	require.NoError(t, store.Migrate(ctx))
	t.Setenv("DISKFERRY_DB_DSN", mdb.DSN)
	t.Setenv("DISKFERRY_DB_DSN_FILE", "")
	return store, mdb.DSN
}

func newPointsCatalog(t *testing.T) pointsCatalog {
	t.Helper()
	store, dsn := cliCatalog(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	web, err := store.UpsertVM(ctx, catalog.VM{InstanceUUID: "vc-1", Moref: "vm-42", Name: "web01"}, nil)
	require.NoError(t, err)
	db, err := store.UpsertVM(ctx, catalog.VM{InstanceUUID: "vc-1", Moref: "vm-43", Name: "db01"}, nil)
	require.NoError(t, err)

	pc := pointsCatalog{dsn: dsn, fullTargets: map[int32]string{}, incrPaths: map[int32]string{}}
	pc.fullConfig = &catalog.VMConfig{
		NumCPUs: 4, CoresPerSocket: 2, MemoryMB: 8192, Firmware: "efi", GuestID: "debian12_64Guest",
		Disks: []catalog.DiskLayout{
			{Key: 2000, CapacityBytes: 1 << 30, ControllerKey: 1000, ControllerType: "pvscsi", BusNumber: 0, UnitNumber: 0, Provisioning: "thin"},
			{Key: 2016, CapacityBytes: 2 << 30, ControllerKey: 1001, ControllerType: "lsilogic", BusNumber: 1, UnitNumber: 3},
		},
		NICs: []catalog.NIC{{Key: 4000, AdapterType: "vmxnet3", Network: "VM Network", NetworkKind: "standard",
			AddressType: "manual", MACAddress: "00:50:56:3f:00:01"}},
	}
	full, err := store.OpenPoint(ctx, catalog.OpenPointRequest{WorkflowID: "backup-web01", RunID: "run-1", Site: "lab", Hub: "hub-1",
		VMID: web.ID, Mode: catalog.ModeFull, VMConfig: pc.fullConfig})
	require.NoError(t, err)
	dir := filepath.Join(t.TempDir(), "web01", full.ID)
	require.NoError(t, os.MkdirAll(dir, 0o755))
	var fullDisks []catalog.PointDisk
	for _, d := range []struct {
		key      int32
		capacity int64
	}{{2000, 1 << 30}, {2016, 2 << 30}} {
		path := filepath.Join(dir, "disk-"+itoa(d.key)+".qcow2")
		require.NoError(t, os.WriteFile(path, nil, 0o644))
		pc.fullTargets[d.key] = path
		disk := catalog.PointDisk{Key: d.key, Path: path, Mode: catalog.ModeFull, ChangeID: "52 a/" + itoa(d.key),
			CapacityBytes: d.capacity, BytesRead: 3 << 20, BytesWritten: 2 << 20, BytesZeroed: 1 << 20, Digest: "sha256:full-" + itoa(d.key)}
		require.NoError(t, store.AddPointDisk(ctx, full.ID, disk))
		fullDisks = append(fullDisks, disk)
	}
	require.NoError(t, os.WriteFile(repo.ManifestPath(pc.fullTargets[2000]), []byte("manifest"), 0o644))
	pc.full, err = store.CompletePoint(ctx, full.ID, fullDisks)
	require.NoError(t, err)

	incr, err := store.OpenPoint(ctx, catalog.OpenPointRequest{WorkflowID: "backup-web01", RunID: "run-2", Site: "lab", Hub: "hub-1",
		VMID: web.ID, Mode: catalog.ModeIncremental, ParentID: full.ID, VMConfig: pc.fullConfig})
	require.NoError(t, err)
	var incrDisks []catalog.PointDisk
	for _, fd := range fullDisks {
		path := "/srv/elsewhere/web01/" + incr.ID + "/disk-" + itoa(fd.Key) + ".qcow2"
		pc.incrPaths[fd.Key] = path
		disk := catalog.PointDisk{Key: fd.Key, Path: path, ParentPath: fd.Path, Mode: catalog.ModeIncremental,
			ChangeID: fd.ChangeID + "+", CapacityBytes: fd.CapacityBytes, BytesWritten: 1 << 20, Digest: "sha256:incr-" + itoa(fd.Key)}
		require.NoError(t, store.AddPointDisk(ctx, incr.ID, disk))
		incrDisks = append(incrDisks, disk)
	}
	pc.incr, err = store.CompletePoint(ctx, incr.ID, incrDisks)
	require.NoError(t, err)

	old, err := store.OpenPoint(ctx, catalog.OpenPointRequest{WorkflowID: "backup-db01", RunID: "run-1", Site: "lab", Hub: "hub-1",
		VMID: db.ID, Mode: catalog.ModeFull})
	require.NoError(t, err)
	require.NoError(t, store.FailPoint(ctx, old.ID, "copy disk 2000: connection reset\x1b[2J\nby peer"))
	pc.old, err = store.GetPoint(ctx, old.ID)
	require.NoError(t, err)
	return pc
}

func itoa(k int32) string { return strconv.Itoa(int(k)) }

func TestPointsList(t *testing.T) {
	pc := newPointsCatalog(t)

	out, err := runCLI(t, "points", "list")
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 9, out)
	assert.Regexp(t, `^POINT\s+VM\s+STATUS\s+MODE\s+STARTED\s+FINISHED\s+DISKS\s+SIZE\s+WRITTEN\s+ALLOCATED$`, lines[0])
	assert.Regexp(t, `^`+regexp.QuoteMeta(pc.old.ID)+`\s+db01\s+failed\s+full\s+`+regexp.QuoteMeta(localTime(pc.old.StartedAt))+
		`\s+`+regexp.QuoteMeta(localTime(pc.old.FinishedAt))+`\s+0\s+0 B\s+0 B\s+0 B$`, lines[1], "newest first")
	assert.Regexp(t, `^`+regexp.QuoteMeta(pc.incr.ID)+`\s+web01\s+complete\s+incremental\s+.*\s+2\s+3\.0 GiB\s+2\.0 MiB\s+0 B$`, lines[2])
	assert.Regexp(t, `^`+regexp.QuoteMeta(pc.full.ID)+`\s+web01\s+complete\s+full\s+.*\s+2\s+3\.0 GiB\s+4\.0 MiB\s+0 B$`, lines[3])

	for _, vm := range []string{"web01", "vm-42"} {
		out, err = runCLI(t, "points", "list", "--vm", vm, "--json")
		require.NoError(t, err)
		var rows []pointSummary
		require.NoError(t, json.Unmarshal([]byte(out), &rows), out)
		require.Len(t, rows, 2, vm)
		assert.Equal(t, pc.incr.ID, rows[0].ID)
		assert.Equal(t, pc.full.ID, rows[1].ID)
		full := rows[1]
		assert.Equal(t, "web01", full.VM)
		assert.Equal(t, "vm-42", full.VMMoref)
		assert.Equal(t, "complete", full.Status)
		assert.Equal(t, "full", full.Mode)
		assert.Equal(t, 2, full.DiskCount)
		assert.Equal(t, int64(3<<30), full.CapacityBytes)
		assert.Equal(t, int64(4<<20), full.BytesWritten)
		assert.True(t, pc.full.StartedAt.Equal(full.StartedAt))
		require.NotNil(t, full.FinishedAt)
		assert.True(t, pc.full.FinishedAt.Equal(*full.FinishedAt))
		assert.Equal(t, pc.full.ID, rows[0].ParentID)
	}

	out, err = runCLI(t, "points", "list", "--vm", "nosuchvm")
	require.NoError(t, err)
	assert.Equal(t, "no restore points\n", out)
}

func TestPointsShow(t *testing.T) {
	pc := newPointsCatalog(t)

	out, err := runCLI(t, "points", "show", pc.incr.ID)
	require.NoError(t, err)
	assert.Regexp(t, `(?m)^Point\s+`+regexp.QuoteMeta(pc.incr.ID)+`$`, out)
	assert.Regexp(t, `(?m)^VM\s+web01 \(vm-42, vCenter vc-1\)$`, out)
	assert.Regexp(t, `(?m)^Mode\s+incremental on `+regexp.QuoteMeta(pc.full.ID)+`$`, out)
	for _, key := range []int32{2000, 2016} {
		assert.Regexp(t, `(?m)^  `+itoa(key)+`\s+\S+ GiB\s+incremental\s+`+regexp.QuoteMeta(pc.incrPaths[key])+`\s+`+
			regexp.QuoteMeta(pc.fullTargets[key])+`\s+52 a/`+itoa(key)+`\+\s+sha256:incr-`+itoa(key)+`\s+1\.0 MiB\s+unknown$`, out)
	}
	assert.Regexp(t, `(?s)Chain \(full point first\):\n  `+regexp.QuoteMeta(pc.full.ID)+`\s+full\s+complete.*\n  `+
		regexp.QuoteMeta(pc.incr.ID)+`\s+incremental\s+complete`, out)
	assert.Contains(t, out, "VM configuration: 4 CPUs (2 cores per socket), 8192 MiB memory, firmware efi, guest debian12_64Guest")
	assert.Regexp(t, `(?m)^  2016\s+2\.0 GiB\s+lsilogic\s+1\s+3\s+unknown$`, out)
	assert.Regexp(t, `(?m)^  2000\s+1\.0 GiB\s+pvscsi\s+0\s+0\s+thin$`, out)
	assert.Regexp(t, `(?m)^  4000\s+vmxnet3\s+VM Network\s+standard\s+00:50:56:3f:00:01\s+manual$`, out)

	// The full point's targets are on this host: one manifest is there, one is not.
	out, err = runCLI(t, "points", "show", pc.full.ID, "--json")
	require.NoError(t, err)
	var full pointDetail
	require.NoError(t, json.Unmarshal([]byte(out), &full), out)
	assert.Equal(t, pc.full.ID, full.ID)
	assert.Equal(t, "run-1", full.RunID)
	assert.Equal(t, pc.fullConfig, full.VMConfig)
	require.Len(t, full.Chain, 1)
	assert.Equal(t, pc.full.ID, full.Chain[0].ID)
	require.Len(t, full.Disks, 2)
	assert.Equal(t, diskDetail{Key: 2000, CapacityBytes: 1 << 30, Path: pc.fullTargets[2000], Mode: "full", ChangeID: "52 a/2000",
		Digest: "sha256:full-2000", BytesRead: 3 << 20, BytesWritten: 2 << 20, BytesZeroed: 1 << 20,
		Manifest: repo.ManifestPath(pc.fullTargets[2000]), ManifestState: "present"}, full.Disks[0])
	assert.Equal(t, "missing", full.Disks[1].ManifestState)

	out, err = runCLI(t, "points", "show", pc.incr.ID, "--json")
	require.NoError(t, err)
	var incr pointDetail
	require.NoError(t, json.Unmarshal([]byte(out), &incr), out)
	assert.Equal(t, []string{pc.full.ID, pc.incr.ID}, []string{incr.Chain[0].ID, incr.Chain[1].ID})
	assert.Equal(t, pc.fullTargets[2016], incr.Disks[1].ParentPath)

	// A point from before VM configurations were kept.
	out, err = runCLI(t, "points", "show", pc.old.ID)
	require.NoError(t, err)
	assert.Contains(t, out, "VM configuration: not captured")
	assert.Regexp(t, `(?m)^Error\s+copy disk 2000: connection reset\x{FFFD}\[2J\x{FFFD}by peer$`, out,
		"control characters from a message neither drive the terminal nor break the layout")
	out, err = runCLI(t, "points", "show", pc.old.ID, "--json")
	require.NoError(t, err)
	var raw map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &raw))
	assert.Contains(t, raw, "vmConfig")
	assert.Nil(t, raw["vmConfig"], "null: not captured")
	assert.Equal(t, []any{}, raw["disks"], "a point without disks lists none, not null")
}

func TestPointsShowUnknownPoint(t *testing.T) {
	newPointsCatalog(t)
	_, err := runCLI(t, "points", "show", "20991231T000000.000Z-deadbeef")
	require.Error(t, err)
	assert.Equal(t, `restore point "20991231T000000.000Z-deadbeef" is not in the catalog (diskferry points list shows the points)`, err.Error())
}

func TestPointsNeedACatalog(t *testing.T) {
	t.Setenv("DISKFERRY_DB_DSN", "")
	t.Setenv("DISKFERRY_DB_DSN_FILE", "")
	for _, args := range [][]string{{"points", "list"}, {"points", "show", "p1"}} {
		_, err := runCLI(t, args...)
		require.Error(t, err, "%v", args)
		assert.Contains(t, err.Error(), "no catalog configured: set DISKFERRY_DB_DSN or DISKFERRY_DB_DSN_FILE", "%v", args)
	}
}

// The DSN comes from a file as for the hub, and an unreachable catalog is named without the
// DSN's password.
func TestPointsCatalogFromFileAndPasswordNeverShown(t *testing.T) {
	pc := newPointsCatalog(t)
	file := filepath.Join(t.TempDir(), "dsn")
	require.NoError(t, os.WriteFile(file, []byte(pc.dsn+"\n"), 0o600))
	t.Setenv("DISKFERRY_DB_DSN", "")
	t.Setenv("DISKFERRY_DB_DSN_FILE", file)
	out, err := runCLI(t, "points", "list", "--json")
	require.NoError(t, err)
	var rows []pointSummary
	require.NoError(t, json.Unmarshal([]byte(out), &rows))
	assert.Len(t, rows, 3)

	const password = "pw-never-printed-7f3a"
	port := testenv.FreePort(t)
	t.Setenv("DISKFERRY_DB_DSN_FILE", "")
	t.Setenv("DISKFERRY_DB_DSN", "diskferry:"+password+"@tcp(127.0.0.1:"+strconv.Itoa(port)+")/diskferry?timeout=5s")
	out, err = runCLI(t, "points", "list")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "connect to catalog 127.0.0.1:"+strconv.Itoa(port)+"/diskferry")
	assert.Contains(t, err.Error(), "DISKFERRY_DB_DSN")
	assert.NotContains(t, err.Error()+out, password)
}

// A catalog a hub of this version has not migrated yet is named as such, not as a missing column.
func TestPointsRefuseOlderCatalog(t *testing.T) {
	pc := newPointsCatalog(t)
	ctx := context.Background()
	store, err := catalog.Open(ctx, pc.dsn, slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	defer store.Close()
	latest, err := catalog.LatestSchemaVersion()
	require.NoError(t, err)
	_, err = store.DB().ExecContext(ctx, "DELETE FROM goose_db_version WHERE version_id = ?", latest)
	require.NoError(t, err)
	_, err = runCLI(t, "points", "list")
	require.ErrorIs(t, err, catalog.ErrSchemaBehind)
	assert.Contains(t, err.Error(), "start a hub of this version once")
}
