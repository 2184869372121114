package lab_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/retention"
	"github.com/diskferry/diskferry/workflows"
)

// TestRetentionKeepsWhatThePolicySays backs a VM up ten times with data changing in between
// under "keep the last 3, chains of at most 2 incrementals". Every backup starts the VM's
// retention, which merges and removes the points that go: afterwards exactly the newest 3
// points remain, none reads through more than 3 files, each still restores to a file equal to
// the source at its snapshot, the repository holds only their files, and the catalog's
// allocated bytes are what the files take.
func TestRetentionKeepsWhatThePolicySays(t *testing.T) {
	l := lab.Start(t, lab.Options{Disks: 1, DiskSize: 32 << 20})
	key := l.VC.Disks[0].Key
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	store, err := catalog.Open(ctx, l.DB.DSN, nil)
	require.NoError(t, err)
	defer store.Close()

	sources := map[string]string{} // point → the source as of its snapshot
	var order, deleted []string
	var freed int64
	for i := range 10 {
		if i > 0 {
			// Rewrites of the same blocks and new ones.
			for _, off := range []int64{1 << 20, int64(2+i) << 20} {
				_, err := l.VC.WriteRandom(key, off, 256<<10)
				require.NoError(t, err)
			}
		}
		src := snapshotSources(t, l)[key]
		res := runBackup(ctx, t, l, workflows.BackupInput{VM: l.VC.VMName, Site: l.Site})
		sources[res.PointID] = src
		order = append(order, res.PointID)
		if i == 0 {
			vms, err := store.FindVMs(ctx, l.VC.VMName)
			require.NoError(t, err)
			require.Len(t, vms, 1)
			require.NoError(t, store.SetVMPolicy(ctx, vms[0].ID, retention.Policy{KeepLast: 3, MaxChain: 2}))
		}
		// The retention this backup started: wait for it, so the next backup sees its result.
		var outcome workflows.RetentionOutcome
		require.NoError(t, l.Temporal.Client.GetWorkflow(ctx, workflows.RetentionWorkflowID(l.VC.VMName), "").Get(ctx, &outcome),
			"retention after backup %d", i+1)
		deleted = append(deleted, outcome.Result.Deleted...)
		freed += outcome.Result.BytesFreed
	}
	require.ElementsMatch(t, order[:len(order)-3], deleted, "the retentions deleted every point but the newest 3")
	require.Positive(t, freed)

	points, err := store.FindPoints(ctx, l.VC.VMName)
	require.NoError(t, err)
	var kept []string
	for _, p := range points {
		require.NotEqual(t, catalog.StatusDeleting, p.Status, "point %s left deleting", p.ID)
		if p.Status == catalog.StatusComplete {
			kept = append(kept, p.ID)
		}
	}
	require.ElementsMatch(t, order[len(order)-3:], kept, "exactly the newest 3 points remain")

	want := map[string]bool{}
	var recorded int64
	dir := t.TempDir()
	for _, id := range kept {
		p, err := store.GetPoint(ctx, id)
		require.NoError(t, err)
		require.Len(t, p.Disks, 1)
		d := p.Disks[0]
		info, err := qemu.Info(ctx, d.Path)
		require.NoError(t, err)
		require.LessOrEqual(t, chainLength(ctx, t, d.Path), 3, "point %s reads through more than 3 files", id)
		requireSameContent(ctx, t, sources[id], d.Path)
		require.Equal(t, info.ActualSize, d.AllocatedBytes, "point %s: catalog and file disagree on its size", id)
		recorded += d.AllocatedBytes
		want[d.Path] = true
		want[repo.ManifestPath(d.Path)] = true

		out := filepath.Join(dir, id+".raw")
		runRestore(ctx, t, l, workflows.RestoreInput{Point: id, Destination: activities.DestinationFile, Format: activities.FormatRaw, Output: out})
		requireSameRaw(ctx, t, sources[id], out)
	}
	require.Positive(t, recorded)

	// The repository holds the kept points' files (a merged point's file may sit in a removed
	// point's directory) and nothing else.
	err = filepath.Walk(l.RepoRoot, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		require.True(t, want[path], "file in the repository no kept point uses: %s", path)
		delete(want, path)
		return nil
	})
	require.NoError(t, err)
	for path := range want {
		if filepath.Ext(path) == ".qcow2" {
			t.Errorf("kept point file missing: %s", path)
		}
	}
	requireNoExports(ctx, t, l)
}

// chainLength is how many files a restore of the image reads: it and its backing files.
func chainLength(ctx context.Context, t *testing.T, path string) int {
	t.Helper()
	n := 0
	for path != "" {
		info, err := qemu.Info(ctx, path)
		require.NoError(t, err)
		n++
		next := info.BackingFile
		if next != "" && !filepath.IsAbs(next) {
			next = filepath.Join(filepath.Dir(path), next)
		}
		path = next
	}
	return n
}
