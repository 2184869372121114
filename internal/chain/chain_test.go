package chain_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/chain"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.WithSharedMariaDB(m.Run)) }

var quiet = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

const (
	diskSize = 8 << 20
	cluster  = 64 << 10
)

// lab is one VM's chain on a real repository and catalog, with a raw copy of what every
// point's disks held when it was taken.
type lab struct {
	t      *testing.T
	ctx    context.Context
	store  *catalog.Store
	layout repo.Layout
	vm     catalog.VM
	rng    *rand.Rand
	keys   []int32
	raw    map[int32]string            // the disks' current content
	snap   map[string]map[int32]string // point → disk → raw copy at backup time
	order  []string                    // points, oldest first
	files  map[string]map[int32]string // point → disk → qcow2 as backed up
	fills  []fill                      // written by the next backup (fill)
}

// fill is a region a backup writes with one byte value.
type fill struct {
	off, length int64
	pattern     byte
}

func newLab(t *testing.T, seed uint64, disks int) *lab {
	t.Helper()
	testenv.RequireCommand(t, "qemu-img")
	testenv.RequireCommand(t, "qemu-io")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	mdb := testenv.MariaDB(t)
	store, err := catalog.Open(ctx, mdb.DSN, quiet)
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	require.NoError(t, store.Migrate(ctx))
	layout, err := repo.New(filepath.Join(t.TempDir(), "repo"))
	require.NoError(t, err)
	l := &lab{t: t, ctx: ctx, store: store, layout: layout, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		raw: map[int32]string{}, snap: map[string]map[int32]string{}, files: map[string]map[int32]string{}}
	var cdisks []catalog.Disk
	for i := range disks {
		key := int32(2000 + i)
		l.keys = append(l.keys, key)
		cdisks = append(cdisks, catalog.Disk{Key: key, CapacityBytes: diskSize})
		raw := filepath.Join(t.TempDir(), fmt.Sprintf("current-%d.raw", key))
		require.NoError(t, os.WriteFile(raw, nil, 0o600))
		require.NoError(t, os.Truncate(raw, diskSize))
		l.raw[key] = raw
	}
	l.vm, err = store.UpsertVM(ctx, catalog.VM{InstanceUUID: "vc", Moref: "vm-1", Name: "chain"}, cdisks)
	require.NoError(t, err)
	return l
}

// backup takes a point: a full one (a new qcow2 per disk) or an incremental on the newest,
// after writing random data, rewrites and zeroes into the disks.
func (l *lab) backup(full bool) string {
	t := l.t
	var parent *catalog.Point
	if !full {
		p, err := l.store.LastCompletePoint(l.ctx, l.vm.ID)
		require.NoError(t, err)
		parent = &p
	}
	mode, parentID := catalog.ModeFull, ""
	if parent != nil {
		mode, parentID = catalog.ModeIncremental, parent.ID
	}
	wf := fmt.Sprintf("backup-%d", len(l.order))
	p, err := l.store.OpenPoint(l.ctx, catalog.OpenPointRequest{WorkflowID: wf, RunID: "run", Site: "site", Hub: "hub",
		VMID: l.vm.ID, Mode: mode, ParentID: parentID})
	require.NoError(t, err)
	_, err = l.layout.EnsurePointDir(l.vm.Name, l.vm.Moref, p.ID)
	require.NoError(t, err)
	var disks []catalog.PointDisk
	l.snap[p.ID], l.files[p.ID] = map[int32]string{}, map[int32]string{}
	for _, key := range l.keys {
		path, err := l.layout.TargetPath(l.vm.Name, l.vm.Moref, p.ID, key)
		require.NoError(t, err)
		d := catalog.PointDisk{Key: key, Path: path, Mode: catalog.ModeFull, CapacityBytes: diskSize}
		if parent != nil {
			for _, pd := range parent.Disks {
				if pd.Key == key {
					d.ParentPath, d.Mode = pd.Path, catalog.ModeIncremental
				}
			}
		}
		args := []string{"create", "-q", "-f", "qcow2", "-o", fmt.Sprintf("cluster_size=%d", cluster)}
		if d.ParentPath != "" {
			args = append(args, "-b", d.ParentPath, "-F", "qcow2", path)
		} else {
			args = append(args, path, fmt.Sprint(diskSize))
		}
		run(t, "qemu-img", args...)
		if d.ParentPath == "" {
			// A full copy holds the whole disk as it is now.
			run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", l.raw[key], path)
		}
		for _, f := range l.fills {
			l.fillDisk(key, path, f)
		}
		l.write(key, path)
		snap := filepath.Join(filepath.Dir(l.raw[key]), fmt.Sprintf("%s-%d.raw", p.ID, key))
		run(t, "cp", "--sparse=always", l.raw[key], snap)
		l.snap[p.ID][key] = snap
		l.files[p.ID][key] = path
		require.NoError(t, l.store.AddPointDisk(l.ctx, p.ID, d))
		disks = append(disks, d)
	}
	_, err = l.store.CompletePoint(l.ctx, p.ID, disks)
	require.NoError(t, err)
	l.order = append(l.order, p.ID)
	l.fills = nil
	return p.ID
}

// fillNext makes the next backup write pattern over [off, off+length) of every disk before
// its random writes.
func (l *lab) fillNext(off, length int64, pattern byte) {
	l.fills = append(l.fills, fill{off: off, length: length, pattern: pattern})
}

// fillDisk writes f into the qcow2 at path and the same into the raw copy.
func (l *lab) fillDisk(key int32, path string, f fill) {
	t := l.t
	raw, err := os.OpenFile(l.raw[key], os.O_RDWR, 0)
	require.NoError(t, err)
	defer raw.Close()
	buf := make([]byte, f.length)
	for i := range buf {
		buf[i] = f.pattern
	}
	_, err = raw.WriteAt(buf, f.off)
	require.NoError(t, err)
	run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P %d %d %d", f.pattern, f.off, f.length), path)
}

// write applies random writes to the qcow2 at path and the same to the raw copy: new data,
// rewrites of a few hot blocks, zeroes (some unmapping), aligned and not.
func (l *lab) write(key int32, path string) {
	t := l.t
	raw, err := os.OpenFile(l.raw[key], os.O_RDWR, 0)
	require.NoError(t, err)
	defer raw.Close()
	args := []string{"-f", "qcow2"}
	for range 1 + l.rng.IntN(12) {
		var off, length int64
		switch l.rng.IntN(3) {
		case 0: // a hot block, rewritten point after point
			off = int64(l.rng.IntN(4)) * 4 * cluster
			length = cluster
		case 1: // cluster-aligned anywhere
			off = int64(l.rng.IntN(diskSize/cluster-4)) * cluster
			length = int64(1+l.rng.IntN(4)) * cluster
		default: // sub-cluster
			off = int64(l.rng.IntN(diskSize/4096-32)) * 4096
			length = int64(1+l.rng.IntN(24)) * 4096
		}
		buf := make([]byte, length)
		switch l.rng.IntN(5) {
		case 0:
			args = append(args, "-c", fmt.Sprintf("write -z %d %d", off, length))
		case 1:
			args = append(args, "-c", fmt.Sprintf("write -z -u %d %d", off, length))
		default:
			pattern := byte(1 + l.rng.IntN(255))
			for i := range buf {
				buf[i] = pattern
			}
			args = append(args, "-c", fmt.Sprintf("write -P %d %d %d", pattern, off, length))
		}
		_, err := raw.WriteAt(buf, off)
		require.NoError(t, err)
	}
	run(t, "qemu-io", append(args, path)...)
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %s: %s", name, strings.Join(args, " "), out)
}

// decide drops each point but the newest with probability drop, and flattens kept ones with
// probability flatten.
func (l *lab) decide(drop, flatten float64) chain.Plan {
	var plan chain.Plan
	for i, id := range l.order {
		switch {
		case i < len(l.order)-1 && l.rng.Float64() < drop:
			plan.Delete = append(plan.Delete, id)
		case l.rng.Float64() < flatten:
			plan.Flatten = append(plan.Flatten, id)
		}
	}
	return plan
}

func (l *lab) apply(ctx context.Context, plan chain.Plan, opts chain.Options) (chain.Result, error) {
	return chain.Run(ctx, l.store.ChainCatalog(l.vm.ID), l.layout, plan, opts)
}

// verify checks the outcome of plan: every kept point complete and reading exactly as when
// it was backed up, every dropped point gone, flattened points full, headers and catalog in
// agreement, and no file in the repository that no kept point holds.
func (l *lab) verify(plan chain.Plan) {
	t := l.t
	t.Helper()
	points, err := l.store.ListPoints(l.ctx, l.vm.ID, "")
	require.NoError(t, err)
	byID := map[string]catalog.Point{}
	held := map[string]bool{}
	for _, p := range points {
		byID[p.ID] = p
		for _, d := range p.Disks {
			held[d.Path] = true
		}
	}
	for _, id := range l.order {
		p, ok := byID[id]
		if slices.Contains(plan.Delete, id) {
			require.False(t, ok, "dropped point %s is still in the catalog (%s)", id, p.Status)
			continue
		}
		require.True(t, ok, "kept point %s is gone", id)
		require.Equal(t, catalog.StatusComplete, p.Status, "point %s", id)
		require.Len(t, p.Disks, len(l.keys))
		allFull := true
		for _, d := range p.Disks {
			res, err := qemu.Compare(l.ctx, qemu.QCOW2(d.Path), qemu.Raw(l.snap[id][d.Key]))
			require.NoError(t, err)
			require.True(t, res.Equal, "point %s disk %d (%s) differs from its backup: %s", id, d.Key, d.Path, res.Message)
			_, err = qemu.Check(l.ctx, d.Path)
			require.NoError(t, err)
			backing, err := qemu.BackingFile(l.ctx, d.Path)
			require.NoError(t, err)
			require.Equal(t, d.ParentPath, backing, "point %s disk %d: header and catalog", id, d.Key)
			if d.ParentPath != "" {
				allFull = false
				require.Equal(t, catalog.ModeIncremental, d.Mode)
				parent, ok := byID[p.ParentID]
				require.True(t, ok, "point %s: parent %q", id, p.ParentID)
				require.True(t, slices.ContainsFunc(parent.Disks, func(pd catalog.PointDisk) bool { return pd.Path == d.ParentPath }),
					"point %s disk %d backs onto %s, not a file of its parent %s", id, d.Key, d.ParentPath, p.ParentID)
			} else {
				require.Equal(t, catalog.ModeFull, d.Mode)
			}
		}
		if allFull {
			require.Equal(t, catalog.ModeFull, p.Mode, "point %s", id)
			require.Empty(t, p.ParentID, "point %s", id)
		}
		if slices.Contains(plan.Flatten, id) {
			require.True(t, allFull, "point %s was to be flattened", id)
		}
	}
	require.Len(t, points, len(l.order)-len(plan.Delete), "points in the catalog")
	err = filepath.WalkDir(l.layout.Root, func(path string, d fs.DirEntry, err error) error {
		require.NoError(t, err)
		if d.IsDir() {
			// Point directories go once empty; the VM's directory stays.
			if filepath.Dir(filepath.Dir(path)) == l.layout.Root {
				entries, err := os.ReadDir(path)
				require.NoError(t, err)
				require.NotEmpty(t, entries, "empty directory %s left behind", path)
			}
			return nil
		}
		require.True(t, held[path], "orphaned file %s", path)
		return nil
	})
	require.NoError(t, err)
}

func TestRandomChainsKeepEveryKeptPoint(t *testing.T) {
	for seed := range uint64(20) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			l := newLab(t, seed, 1+int(seed%3/2))
			n := 2 + l.rng.IntN(10)
			for i := range n {
				l.backup(i == 0 || l.rng.IntN(8) == 0)
			}
			plan := l.decide(0.3+0.5*l.rng.Float64(), 0.15)
			res, err := l.apply(l.ctx, plan, chain.Options{})
			require.NoError(t, err)
			l.verify(plan)
			require.ElementsMatch(t, plan.Delete, res.Deleted)
			if len(plan.Delete) > 0 {
				require.Positive(t, res.BytesFreed)
			}
			// Done is done: a second run finds nothing to do.
			again, err := l.apply(l.ctx, plan, chain.Options{OnProgress: func(p chain.Progress) {
				t.Errorf("second run took a step: %s", p.Step)
			}})
			require.NoError(t, err)
			require.Zero(t, again.BytesFreed)
		})
	}
}

// killer cancels a run at its n-th event: an action about to start, or the first report of
// a qemu-img that has started writing (cancelling kills it with SIGKILL).
type killer struct {
	n, seen int
	cancel  context.CancelFunc
	last    string
	written bool // the running qemu-img of the last step reported progress
	at      string
	inQemu  bool
}

func (k *killer) progress(p chain.Progress) {
	if k.seen >= k.n {
		return
	}
	switch {
	case p.Step != k.last:
		k.last, k.written = p.Step, false
	case p.Percent > 0 && p.Percent < 100 && !k.written:
		k.written = true
	default:
		return
	}
	k.seen++
	if k.seen == k.n {
		k.at, k.inQemu = p.Step, k.written
		k.cancel()
	}
}

// applyKilled runs plan, killing each attempt at a random early event, until an attempt
// finishes; every attempt after the first recomputes the work from catalog and files.
func (l *lab) applyKilled(plan chain.Plan, maxEvent int) (attempts int) {
	t := l.t
	for attempt := 1; ; attempt++ {
		require.Less(t, attempt, 300, "retention never finished")
		ctx, cancel := context.WithCancel(l.ctx)
		k := &killer{n: 1 + l.rng.IntN(maxEvent), cancel: cancel}
		_, err := l.apply(ctx, plan, chain.Options{OnProgress: k.progress})
		cancel()
		if k.seen < k.n {
			require.NoError(t, err)
			return attempt
		}
		if err != nil {
			require.ErrorIs(t, err, context.Canceled, "attempt %d killed at %q", attempt, k.at)
		}
		l.checkKept(plan)
	}
}

// checkKept asserts that every kept point reads as backed up, whatever the run left behind.
func (l *lab) checkKept(plan chain.Plan) {
	t := l.t
	t.Helper()
	for _, id := range l.order {
		if slices.Contains(plan.Delete, id) {
			continue
		}
		p, err := l.store.GetPoint(l.ctx, id)
		require.NoError(t, err)
		require.Equal(t, catalog.StatusComplete, p.Status)
		for _, d := range p.Disks {
			res, err := qemu.Compare(l.ctx, qemu.QCOW2(d.Path), qemu.Raw(l.snap[id][d.Key]))
			require.NoError(t, err)
			require.True(t, res.Equal, "after a kill, point %s disk %d differs: %s", id, d.Key, res.Message)
		}
	}
}

func TestRandomChainsSurviveKills(t *testing.T) {
	for seed := range uint64(12) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			l := newLab(t, 1000+seed, 1+int(seed%2))
			n := 3 + l.rng.IntN(9)
			for i := range n {
				l.backup(i == 0 || l.rng.IntN(8) == 0)
			}
			plan := l.decide(0.6, 0.2)
			attempts := l.applyKilled(plan, 8)
			require.Greater(t, attempts, 1, "no attempt was killed")
			l.verify(plan)
		})
	}
}

// TestKillAtEveryStep kills a commit (the oldest full point dropped under two kept
// incrementals, the full holding more than they changed), a flatten that replaces such a
// commit (the kept incremental rewrote everything its full held, so flattening it moves
// nothing) and a rebase (a middle point dropped) at each of their events in turn, the
// qemu-img processes included, and runs again: the kept points are intact every time, and
// the run took the path the case names.
func TestKillAtEveryStep(t *testing.T) {
	for _, tc := range []struct {
		name  string
		drop  []int
		fills map[int]fill // backup → region it writes first
		path  string       // the step every finishing run takes
	}{
		{"commit", []int{0}, map[int]fill{0: {0, diskSize, 0x5a}}, "commit disk"},
		{"commit through two", []int{0, 1}, map[int]fill{0: {0, diskSize, 0x5a}}, "commit disk"},
		{"flatten instead of commit", []int{0}, map[int]fill{0: {0, diskSize / 2, 0x5a}, 1: {0, diskSize, 0xa5}}, "flatten disk"},
		{"rebase", []int{1}, nil, "rebase disk"},
		{"rebase past two", []int{1, 2}, nil, "rebase disk"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inQemu := 0
			for n := 1; ; n++ {
				require.Less(t, n, 100)
				l := newLab(t, uint64(n), 1)
				for i := range 4 {
					if f, ok := tc.fills[i]; ok {
						l.fillNext(f.off, f.length, f.pattern)
					}
					l.backup(i == 0)
				}
				var plan chain.Plan
				for _, i := range tc.drop {
					plan.Delete = append(plan.Delete, l.order[i])
				}
				ctx, cancel := context.WithCancel(l.ctx)
				k := &killer{n: n, cancel: cancel}
				var steps []string
				_, err := l.apply(ctx, plan, chain.Options{OnProgress: func(p chain.Progress) {
					steps = append(steps, p.Step)
					k.progress(p)
				}})
				cancel()
				if k.seen < n {
					require.NoError(t, err)
					l.verify(plan)
					requireStep(t, steps, tc.path)
					// Whether a kill lands while qemu-img reports progress depends on how fast it
					// runs (it polls its job; a quick one jumps from 0 to 100 %): logged, not
					// asserted, so a fast or busy machine does not fail the test.
					t.Logf("%d kill points, %d inside qemu-img", n-1, inQemu)
					return
				}
				if err != nil {
					require.ErrorIs(t, err, context.Canceled)
				}
				if k.inQemu {
					inQemu++
				}
				l.checkKept(plan)
				_, err = l.apply(l.ctx, plan, chain.Options{})
				require.NoError(t, err, "run after a kill at %q (in qemu-img: %v)", k.at, k.inQemu)
				l.verify(plan)
			}
		})
	}
}

// requireStep checks a run's steps include one starting with path and, for a commit or a
// flatten, not the other: the chain engine chose the way the case is about.
func requireStep(t *testing.T, steps []string, path string) {
	t.Helper()
	has := func(prefix string) bool {
		return slices.ContainsFunc(steps, func(s string) bool { return strings.HasPrefix(s, prefix) })
	}
	require.True(t, has(path), "no %q step in %q", path, steps)
	switch path {
	case "commit disk":
		require.False(t, has("flatten disk"), "a flatten in %q", steps)
	case "flatten disk":
		require.False(t, has("commit disk"), "a commit in %q", steps)
	}
}

func TestRefusesRunningAndFailedPoints(t *testing.T) {
	l := newLab(t, 7, 1)
	a := l.backup(true)
	l.backup(false)
	_, err := l.store.OpenPoint(l.ctx, catalog.OpenPointRequest{WorkflowID: "running", RunID: "r", Site: "site", Hub: "hub",
		VMID: l.vm.ID, Mode: catalog.ModeIncremental, ParentID: l.order[1]})
	require.NoError(t, err)
	_, err = l.apply(l.ctx, chain.Plan{Delete: []string{l.order[1]}}, chain.Options{})
	require.ErrorIs(t, err, catalog.ErrBackupRunning, "the point a running backup builds on")
	running, err := l.store.RunningPointForVM(l.ctx, l.vm.ID)
	require.NoError(t, err)
	_, err = l.apply(l.ctx, chain.Plan{Delete: []string{running.ID}}, chain.Options{})
	require.ErrorIs(t, err, catalog.ErrInvalid, "a running point")
	p, err := l.store.GetPoint(l.ctx, a)
	require.NoError(t, err)
	require.Equal(t, catalog.StatusComplete, p.Status, "nothing marked")
	l.checkKept(chain.Plan{})
}

// TestRemoveRefusesAFileAHeaderNames: a catalog that forgot a dependency must not cost a
// kept point its backing file.
func TestRemoveRefusesAFileAHeaderNames(t *testing.T) {
	l := newLab(t, 8, 1)
	l.backup(true)
	l.backup(false)
	kept := l.files[l.order[1]][2000]
	// The catalog claims the incremental stands alone; its header still names the full.
	require.NoError(t, l.store.RepointDisks(l.ctx, l.vm.ID, []chain.DiskChange{{PointID: l.order[1], Key: 2000, Path: kept}}))
	_, err := l.apply(l.ctx, chain.Plan{Delete: []string{l.order[0]}}, chain.Options{})
	require.ErrorIs(t, err, chain.ErrInconsistent)
	_, statErr := os.Stat(l.files[l.order[0]][2000])
	require.NoError(t, statErr, "the full file is still there")
	require.False(t, errors.Is(err, context.Canceled))
}

// Forgetting a VM drops every point, the newest included: nothing of it is left.
func TestDeleteEveryPoint(t *testing.T) {
	l := newLab(t, 9, 2)
	for i := range 5 {
		l.backup(i == 0 || i == 3)
	}
	plan := chain.Plan{Delete: slices.Clone(l.order)}
	res, err := l.apply(l.ctx, plan, chain.Options{})
	require.NoError(t, err)
	assert.ElementsMatch(t, l.order, res.Deleted)
	l.verify(plan)
	vmDir, err := l.layout.VMDir(l.vm.Name, l.vm.Moref)
	require.NoError(t, err)
	entries, err := os.ReadDir(vmDir)
	require.NoError(t, err)
	assert.Empty(t, entries)
}
