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

// BenchmarkMerge measures retention's merge of a 1 GiB incremental with its full base (the
// full point dropped, the incremental kept: a commit or a flatten, the catalog transactions,
// the file the kept point no longer needs removed) against a plain `qemu-img commit -d` and rm
// of an identical pair of files, in the same run, both synced, and prints a "bench merge ..."
// line per fixture: medians of BENCH_RUNS rounds (default 3), each on fresh files, the two
// taking turns going first so neither always finds the disk busier. Fixtures, a 2 GiB disk
// whose full holds 1 GiB of data at its start:
//   - disjoint: the incremental wrote 1 GiB elsewhere; a commit and a flatten would move as
//     much, so retention commits, as plain does;
//   - rewritten: the incremental rewrote the 1 GiB the full held; retention flattens it,
//     which moves nothing, where a commit copies all of it.
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
	// upper holds the same data in the upper half of a sparse 2 GiB file; both is the disk
	// the disjoint fixture's incremental shows: the data in both halves.
	upper, both := filepath.Join(dir, "upper.raw"), filepath.Join(dir, "both.raw")
	for _, raw := range []string{upper, both} {
		f, err := os.Create(raw)
		require.NoError(b, err)
		src, err := os.Open(random)
		require.NoError(b, err)
		if raw == both {
			_, err = io.Copy(f, src)
			require.NoError(b, err)
			_, err = src.Seek(0, io.SeekStart)
			require.NoError(b, err)
		}
		_, err = f.Seek(size, io.SeekStart)
		require.NoError(b, err)
		_, err = io.Copy(f, src)
		require.NoError(b, err)
		require.NoError(b, src.Close())
		require.NoError(b, f.Close())
	}

	mdb := testenv.MariaDB(b)
	store, err := catalog.Open(ctx, mdb.DSN, quiet)
	require.NoError(b, err)
	defer store.Close()
	require.NoError(b, store.Migrate(ctx))
	layout, err := repo.New(filepath.Join(dir, "repo"))
	require.NoError(b, err)

	for _, fx := range []struct {
		name, inc, want, path string
	}{
		{"disjoint", upper, both, "commit"},
		{"rewritten", random, random, "flatten"},
	} {
		// pair makes a 2 GiB full holding random and an incremental on it holding fx.inc.
		pair := func(full, inc string) {
			benchRun(b, "qemu-img", "create", "-q", "-f", "qcow2", full, fmt.Sprint(2*size))
			benchRun(b, "qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", random, full)
			benchRun(b, "qemu-img", "create", "-q", "-f", "qcow2", "-b", full, "-F", "qcow2", inc)
			benchRun(b, "qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", "-O", "qcow2", fx.inc, inc)
		}
		var ours, plain []time.Duration
		for round := range rounds {
			// A VM of its own per round: a full point and an incremental on it, in the
			// catalog and the repository, as backups leave them.
			name := fmt.Sprint(fx.name, round)
			vm, err := store.UpsertVM(ctx, catalog.VM{InstanceUUID: "vc", Moref: "vm-" + name, Name: name},
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
				p, err := store.OpenPoint(ctx, catalog.OpenPointRequest{WorkflowID: name + fmt.Sprint("-", i), RunID: "r", Site: "s", Hub: "h",
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
			// The first commit after making the files took 4-5 s here where the next took
			// about 1 s, whichever tool it was (the file system's first large allocation
			// after the setup): an untimed commit of a third pair takes that hit.
			warmFull, warmInc := filepath.Join(dir, "warm-full.qcow2"), filepath.Join(dir, "warm-inc.qcow2")
			pair(warmFull, warmInc)
			benchRun(b, "sync")
			benchRun(b, "qemu-img", "commit", "-q", "-d", "-f", "qcow2", warmInc)
			require.NoError(b, os.Remove(warmInc))
			require.NoError(b, os.Remove(warmFull))
			benchRun(b, "sync")

			var steps []string
			runOurs := func() {
				start := time.Now()
				_, err := chain.Run(ctx, store.ChainCatalog(vm.ID), layout, chain.Plan{Delete: points[:1]},
					chain.Options{OnProgress: func(p chain.Progress) { steps = append(steps, p.Step) }})
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

			require.True(b, slices.ContainsFunc(steps, func(s string) bool { return strings.HasPrefix(s, fx.path+" disk") }),
				"%s: retention took no %s step: %q", fx.name, fx.path, steps)
			kept, err := store.GetPoint(ctx, points[1])
			require.NoError(b, err)
			res, err := qemu.Compare(ctx, qemu.QCOW2(kept.Disks[0].Path), qemu.Raw(fx.want))
			require.NoError(b, err)
			require.True(b, res.Equal, "%s: the kept point differs from its data: %s", fx.name, res.Message)
			res, err = qemu.Compare(ctx, qemu.QCOW2(kept.Disks[0].Path), qemu.QCOW2(plainFull))
			require.NoError(b, err)
			require.True(b, res.Equal, "%s: the kept point differs from the plain commit: %s", fx.name, res.Message)
			require.NoError(b, os.Remove(plainFull))
			require.NoError(b, os.RemoveAll(filepath.Dir(kept.Disks[0].Path)))
		}
		mb := float64(size) / 1e6
		oursMed, plainMed := testenv.Median(ours), testenv.Median(plain)
		fmt.Printf("bench merge %s (%s) ours=%.1fMB/s qemu-img=%.1fMB/s ratio=%.2f (1 GiB incremental with its full; commit or flatten, rm, sync; medians of %d alternating rounds: ours %s, qemu-img %s)\n",
			fx.name, fx.path, mb/oursMed.Seconds(), mb/plainMed.Seconds(), plainMed.Seconds()/oursMed.Seconds(), rounds, roundTimes(ours), roundTimes(plain))
	}
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
