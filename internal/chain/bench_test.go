package chain_test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
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
// of an identical pair of files, in the same run, both synced, and prints "bench merge ...":
// medians of BENCH_RUNS rounds (default 3), each on fresh files, the two taking turns going
// first so neither always finds the disk busier.
func BenchmarkMerge(b *testing.B) {
	testenv.RequireCommand(b, "qemu-img")
	const size = 1 << 30
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	rounds := 3
	if v := os.Getenv("BENCH_RUNS"); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(b, err, "BENCH_RUNS")
		require.Positive(b, n, "BENCH_RUNS")
		rounds = n
	}
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

	// pair makes a 2 GiB full holding 1 GiB of data and an incremental on it holding 1 GiB.
	pair := func(full, inc string) {
		for _, path := range []string{full, inc} {
			benchRun(b, "qemu-img", "create", "-q", "-f", "qcow2", path, fmt.Sprint(2*size))
			benchRun(b, "qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", random, path)
		}
		benchRun(b, "qemu-img", "rebase", "-u", "-f", "qcow2", "-b", full, "-F", "qcow2", inc)
	}
	var ours, plain []time.Duration
	b.ResetTimer()
	for round := range rounds {
		b.StopTimer()
		// A VM of its own per round: a full point and an incremental on it, in the catalog
		// and the repository, as backups leave them.
		vm, err := store.UpsertVM(ctx, catalog.VM{InstanceUUID: "vc", Moref: fmt.Sprint("vm-", round), Name: fmt.Sprint("bench", round)},
			[]catalog.Disk{{Key: 2000, CapacityBytes: 2 * size}})
		require.NoError(b, err)
		var points []string
		paths := make([]string, 2)
		for i, mode := range []string{catalog.ModeFull, catalog.ModeIncremental} {
			d := catalog.PointDisk{Key: 2000, Mode: mode, CapacityBytes: 2 * size}
			parentID := ""
			if i > 0 {
				parentID, d.ParentPath = points[0], paths[0]
			}
			p, err := store.OpenPoint(ctx, catalog.OpenPointRequest{WorkflowID: fmt.Sprint("b", round, "-", i), RunID: "r", Site: "s", Hub: "h",
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
		b.StartTimer()

		runOurs := func() {
			start := time.Now()
			_, err := chain.Run(ctx, store.ChainCatalog(vm.ID), layout, chain.Plan{Delete: points[:1]}, chain.Options{})
			require.NoError(b, err)
			benchRun(b, "sync")
			ours = append(ours, time.Since(start))
		}
		runPlain := func() {
			start := time.Now()
			benchRun(b, "qemu-img", "commit", "-q", "-d", "-f", "qcow2", plainInc)
			require.NoError(b, os.Remove(plainInc))
			benchRun(b, "sync")
			plain = append(plain, time.Since(start))
		}
		if round%2 == 0 {
			runOurs()
			runPlain()
		} else {
			runPlain()
			runOurs()
		}

		b.StopTimer()
		res, err := qemu.Compare(ctx, qemu.QCOW2(paths[0]), qemu.Raw(random))
		require.NoError(b, err)
		require.True(b, res.Equal, "merged file differs from the data: %s", res.Message)
		res, err = qemu.Compare(ctx, qemu.QCOW2(paths[0]), qemu.QCOW2(plainFull))
		require.NoError(b, err)
		require.True(b, res.Equal, "merged file differs from the plain commit: %s", res.Message)
		require.NoError(b, os.Remove(plainFull))
		require.NoError(b, os.RemoveAll(filepath.Dir(paths[0])))
		b.StartTimer()
	}
	b.StopTimer()
	mb := float64(size) / 1e6
	oursMed, plainMed := median(ours), median(plain)
	fmt.Printf("bench merge ours=%.1fMB/s qemu-img=%.1fMB/s ratio=%.2f (1 GiB incremental into its full; commit, rm, sync; medians of %d alternating rounds: ours %s, qemu-img %s)\n",
		mb/oursMed.Seconds(), mb/plainMed.Seconds(), plainMed.Seconds()/oursMed.Seconds(), rounds, roundTimes(ours), roundTimes(plain))
}

// median is the middle of the durations (the mean of the middle two for an even count).
func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// roundTimes is "1.21s 1.30s 1.18s".
func roundTimes(d []time.Duration) string {
	parts := make([]string, len(d))
	for i, x := range d {
		parts[i] = fmt.Sprintf("%.2fs", x.Seconds())
	}
	return strings.Join(parts, " ")
}

func benchRun(b *testing.B, name string, args ...string) {
	b.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(b, err, "%s %v: %s", name, args, out)
}
