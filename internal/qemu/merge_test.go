package qemu

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// chain3 makes base ← mid ← top (1 MiB patterns 1, 2, 3 at 0, 1 and 2 MiB) and a standalone
// copy of what top reads.
func chain3(t *testing.T) (base, mid, top, want string) {
	t.Helper()
	requireQemuImg(t)
	ctx := testCtx(t)
	dir := t.TempDir()
	base, mid, top = filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "mid.qcow2"), filepath.Join(dir, "top.qcow2")
	require.NoError(t, CreateImage(ctx, base, 8*mib))
	writePattern(t, base, 1, 0, 4*mib)
	require.NoError(t, CreateOverlay(ctx, mid, base))
	writePattern(t, mid, 2, mib, mib)
	require.NoError(t, CreateOverlay(ctx, top, mid))
	writePattern(t, top, 3, 2*mib, mib)
	want = filepath.Join(dir, "want.raw")
	require.NoError(t, Convert(ctx, QCOW2(top), Raw(want), ConvertOptions{}))
	return base, mid, top, want
}

func requireReads(t *testing.T, path, want string) {
	t.Helper()
	res, err := Compare(testCtx(t), QCOW2(path), Raw(want))
	require.NoError(t, err)
	require.True(t, res.Equal, "%s: %s", path, res.Message)
}

// A commit into a deeper base leaves the top image valid (-d), so a kept point reading
// through it never changes, and the base then reads as the top did.
func TestCommitKeepsTopValid(t *testing.T) {
	base, _, top, want := chain3(t)
	var reports []float64
	require.NoError(t, Commit(testCtx(t), top, base, MergeOptions{OnProgress: func(p float64) { reports = append(reports, p) }}))
	requireReads(t, base, want)
	requireReads(t, top, want)
	assert.NotEmpty(t, reports, "progress reported")
	layer, err := MapLayer(testCtx(t), top)
	require.NoError(t, err)
	kept := false
	for _, e := range layer {
		kept = kept || (e.Start <= 2*mib && e.Start+e.Length >= 3*mib && e.Data)
	}
	assert.True(t, kept, "the top keeps its data: %+v", layer)
}

func TestRebaseSafeUnsafeAndFlatten(t *testing.T) {
	ctx := testCtx(t)
	base, mid, top, want := chain3(t)
	require.NoError(t, Rebase(ctx, top, base, MergeOptions{}))
	requireReads(t, top, want)
	backing, err := BackingFile(ctx, top)
	require.NoError(t, err)
	assert.Equal(t, base, backing)

	require.NoError(t, Flatten(ctx, top, MergeOptions{}))
	requireReads(t, top, want)
	backing, err = BackingFile(ctx, top)
	require.NoError(t, err)
	assert.Empty(t, backing)

	// Unsafe: the header alone changes, so the content follows the new backing file.
	require.NoError(t, RebaseUnsafe(ctx, mid, top))
	backing, err = BackingFile(ctx, mid)
	require.NoError(t, err)
	assert.Equal(t, top, backing)
	require.Error(t, RebaseUnsafe(ctx, mid, ""))
}
