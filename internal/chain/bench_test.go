package chain_test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/chain"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/testenv"
)

// BenchmarkMerge measures retention's merge of a 1 GiB incremental into its full base (the
// full point dropped, the incremental kept: a commit, a header rewrite and the catalog
// transaction, the incremental's file removed) against a plain `qemu-img commit -d` and rm
// of an identical pair of files, in the same run, both synced, and prints "bench merge ...".
func BenchmarkMerge(b *testing.B) {
	testenv.RequireCommand(b, "qemu-img")
	const size = 1 << 30
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	dir := b.TempDir()
	random := filepath.Join(dir, "random.raw")
	f, err := os.Create(random)
	require.NoError(b, err)
	_, err = io.CopyN(f, rand.NewChaCha8([32]byte{1}), size)
	require.NoError(b, err)
	require.NoError(b, f.Close())

	mdb := testenv.MariaDB(b)
	store, err := catalog.Open(ctx, mdb.DSN, quiet)
	require.NoError(b, err)
	defer store.Close()
	require.NoError(b, store.Migrate(ctx))
	layout, err := repo.New(filepath.Join(dir, "repo"))
	require.NoError(b, err)
	vm, err := store.UpsertVM(ctx, catalog.VM{InstanceUUID: "vc", Moref: "vm-1", Name: "bench"},
		[]catalog.Disk{{Key: 2000, CapacityBytes: 2 * size}})
	require.NoError(b, err)

	// pair makes a 2 GiB full holding 1 GiB of data and an incremental on it holding 1 GiB.
	pair := func(full, inc string) {
		for _, path := range []string{full, inc} {
			benchRun(b, "qemu-img", "create", "-q", "-f", "qcow2", path, fmt.Sprint(2*size))
			benchRun(b, "qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", random, path)
		}
		benchRun(b, "qemu-img", "rebase", "-u", "-f", "qcow2", "-b", full, "-F", "qcow2", inc)
	}
	var points []string
	paths := make([]string, 2)
	for i, mode := range []string{catalog.ModeFull, catalog.ModeIncremental} {
		d := catalog.PointDisk{Key: 2000, Mode: mode, CapacityBytes: 2 * size}
		parentID := ""
		if i > 0 {
			parentID, d.ParentPath = points[0], paths[0]
		}
		p, err := store.OpenPoint(ctx, catalog.OpenPointRequest{WorkflowID: fmt.Sprint("b", i), RunID: "r", Site: "s", Hub: "h",
			VMID: vm.ID, Mode: mode, ParentID: parentID})
		require.NoError(b, err)
		_, err = layout.EnsurePointDir(vm.Name, vm.Moref, p.ID)
		require.NoError(b, err)
		paths[i], err = layout.TargetPath(vm.Name, vm.Moref, p.ID, 2000)
		require.NoError(b, err)
		if i > 0 {
			pair(paths[0], paths[1])
		}
		d.Path = paths[i]
		require.NoError(b, store.AddPointDisk(ctx, p.ID, d))
		_, err = store.CompletePoint(ctx, p.ID, []catalog.PointDisk{d})
		require.NoError(b, err)
		points = append(points, p.ID)
	}
	plainFull, plainInc := filepath.Join(dir, "plain-full.qcow2"), filepath.Join(dir, "plain-inc.qcow2")
	pair(plainFull, plainInc)
	benchRun(b, "sync")

	b.ResetTimer()
	start := time.Now()
	_, err = chain.Run(ctx, store.ChainCatalog(vm.ID), layout, chain.Plan{Delete: points[:1]}, chain.Options{})
	require.NoError(b, err)
	benchRun(b, "sync")
	ours := time.Since(start)
	start = time.Now()
	benchRun(b, "qemu-img", "commit", "-q", "-d", "-f", "qcow2", plainInc)
	require.NoError(b, os.Remove(plainInc))
	benchRun(b, "sync")
	plain := time.Since(start)
	b.StopTimer()

	res, err := qemu.Compare(ctx, qemu.QCOW2(paths[0]), qemu.Raw(random))
	require.NoError(b, err)
	require.True(b, res.Equal, "merged file differs from the data: %s", res.Message)
	res, err = qemu.Compare(ctx, qemu.QCOW2(paths[0]), qemu.QCOW2(plainFull))
	require.NoError(b, err)
	require.True(b, res.Equal, "merged file differs from the plain commit: %s", res.Message)
	mb := float64(size) / 1e6
	fmt.Printf("bench merge ours=%.1fMB/s qemu-img=%.1fMB/s ratio=%.2f (1 GiB incremental into its full; commit, rm, sync)\n",
		mb/ours.Seconds(), mb/plain.Seconds(), plain.Seconds()/ours.Seconds())
}

func benchRun(b *testing.B, name string, args ...string) {
	b.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(b, err, "%s %v: %s", name, args, out)
}
