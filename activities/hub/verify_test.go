package hub

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/testenv"
)

const kib = int64(1) << 10

// qemuIO runs qemu-io commands on an image (a qcow2 file or, with format raw, an NBD URI).
func qemuIO(t *testing.T, format, image string, cmds ...string) {
	t.Helper()
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command(testenv.RequireCommand(t, "qemu-io"), append(args, image)...).CombinedOutput()
	require.NoError(t, err, "qemu-io %v: %s", cmds, out)
}

// sourceDigest is the digest a copy of the raw file's areas reports.
func sourceDigest(t *testing.T, raw string, areas []activities.Extent) string {
	t.Helper()
	source := testenv.StartNbdkitFile(t, raw, testenv.NbdkitOptions{})
	digest, err := blockcopy.ComputeDigest(context.Background(), source.URI, blockcopy.Options{
		BlockSize: mib, Connections: 2, Areas: toBlockExtents(areas),
	})
	require.NoError(t, err)
	return digest
}

// rawSource makes a raw disk of capacity bytes holding pattern in each of the areas.
func rawSource(t *testing.T, pattern byte, areas ...activities.Extent) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "source.raw")
	require.NoError(t, os.WriteFile(path, nil, 0o600))
	for _, a := range areas {
		testenv.WriteFileAt(t, path, a.Start, fillBytes(pattern, a.Length))
	}
	require.NoError(t, os.Truncate(path, capacity))
	return path
}

func fillBytes(b byte, n int64) []byte {
	out := make([]byte, n)
	for i := range out {
		out[i] = b
	}
	return out
}

// repoPath is a file in a point directory of the rig's repository.
func repoPath(t *testing.T, r *rig, name string) string {
	t.Helper()
	dir := filepath.Join(r.layout.Root, "vm", "point")
	require.NoError(t, os.MkdirAll(dir, 0o750))
	return filepath.Join(dir, name)
}

// The reviewer's case: while the copy runs, another client of the export writes 1 MiB of
// 0xAB where the source holds zeros. The digest covers only the copied areas, so it matches.
func TestVerifyTargetRejectsWriteOutsideAreasOfFull(t *testing.T) {
	r := setup(t)
	areas := []activities.Extent{{Start: 0, Length: 2 * mib}, {Start: 4 * mib, Length: mib}}
	want := sourceDigest(t, rawSource(t, 0x5a, areas...), areas)

	plan, target := r.fullTarget(t, "wf-1")
	exp := r.export(t, "wf-1", target)
	uri := exportURI(exp)
	qemuIO(t, "raw", uri, "write -P 0x5a 0 2M", "write -P 0x5a 4M 1M", "write -P 0xab 6M 1M")
	require.NoError(t, r.run(t, activities.StopExportName, activities.StopExportInput{Port: exp.Port, Path: target.Path}, nil))

	in := activities.VerifyTargetInput{Path: target.Path, BlockSize: mib, Digest: want, Areas: areas}
	err := r.run(t, activities.VerifyTargetName, in, nil)
	appErr := requireAppError(t, err, activities.ErrBadInput, true)
	assert.Contains(t, appErr.Error(), "allocated outside the copied areas: offset 6291456 length 1048576")
	assert.NoFileExists(t, repo.ManifestPath(target.Path), "a rejected target keeps no manifest")

	// The whole disk (nil areas) is covered by the digest, which then tells.
	whole := sourceDigest(t, rawSource(t, 0x5a, areas...), nil)
	err = r.run(t, activities.VerifyTargetName, activities.VerifyTargetInput{Path: target.Path, BlockSize: mib, Digest: whole}, nil)
	appErr = requireAppError(t, err, activities.ErrBadInput, true)
	assert.Contains(t, appErr.Error(), "differs from the copy's")

	// Without the stray write the same target passes.
	qemuIO(t, "qcow2", target.Path, "write -z 6M 1M") // reads as zeros: harmless on a full target
	require.NoError(t, r.run(t, activities.VerifyTargetName, in, nil))
	require.NoError(t, r.run(t, activities.VerifyTargetName, activities.VerifyTargetInput{Path: target.Path, BlockSize: mib, Digest: whole}, nil))
	assertNoVerifyLeftovers(t, r)
	require.NoError(t, r.run(t, activities.FailPointName, activities.FailPointInput{PointID: plan.PointID, Error: "test"}, nil))
}

// An area ending mid-cluster allocates the whole cluster; on a full target the rest of it
// must read as zeros.
func TestVerifyTargetPartialClusterOfFull(t *testing.T) {
	r := setup(t)
	path := repoPath(t, r, "full.qcow2")
	require.NoError(t, qemu.CreateImage(context.Background(), path, capacity))
	areas := []activities.Extent{{Start: mib + 4*kib, Length: 8 * kib}}
	want := sourceDigest(t, rawSource(t, 0x5a, areas...), areas)
	qemuIO(t, "qcow2", path, "write -P 0x5a 1052672 8k")
	in := activities.VerifyTargetInput{Path: path, BlockSize: mib, Digest: want, Areas: areas}
	require.NoError(t, r.run(t, activities.VerifyTargetName, in, nil), "the rest of the cluster reads as zeros")

	qemuIO(t, "qcow2", path, fmt.Sprintf("write -P 0xab %d 1", mib+32*kib))
	err := r.run(t, activities.VerifyTargetName, in, nil)
	appErr := requireAppError(t, err, activities.ErrBadInput, true)
	assert.Contains(t, appErr.Error(), fmt.Sprintf("not reading as zeros: offset %d length %d", mib+12*kib, 52*kib))
	assertNoVerifyLeftovers(t, r)
}

// On an overlay every cluster of its own replaces the parent's content: a zero write outside
// the changed areas fails, and the rest of a partly changed cluster must equal the parent.
func TestVerifyTargetIncremental(t *testing.T) {
	r := setup(t)
	ctx := context.Background()
	parent, path := repoPath(t, r, "parent.qcow2"), repoPath(t, r, "top.qcow2")
	require.NoError(t, qemu.CreateImage(ctx, parent, capacity))
	qemuIO(t, "qcow2", parent, "write -P 0xaa 0 2M")
	require.NoError(t, qemu.CreateOverlay(ctx, path, parent))

	areas := []activities.Extent{{Start: 4 * kib, Length: 4 * kib}, {Start: 3 * mib, Length: mib}}
	raw := rawSource(t, 0xaa, activities.Extent{Start: 0, Length: 2 * mib})
	testenv.WriteFileAt(t, raw, 4*kib, fillBytes(0x77, 4*kib))
	want := sourceDigest(t, raw, areas)
	// The copy: data in a partial cluster (copy-on-write keeps the parent's bytes around
	// it) and zeros over a changed area the parent has as a hole.
	qemuIO(t, "qcow2", path, "write -P 0x77 4k 4k", "write -z 3M 1M")
	in := activities.VerifyTargetInput{Path: path, BlockSize: mib, Digest: want, Areas: areas}
	require.NoError(t, r.run(t, activities.VerifyTargetName, in, nil))

	zeroed := repoPath(t, r, "zeroed.qcow2")
	copyImage(t, path, zeroed)
	qemuIO(t, "qcow2", zeroed, "write -z 1M 64k")
	err := r.run(t, activities.VerifyTargetName, activities.VerifyTargetInput{Path: zeroed, BlockSize: mib, Digest: want, Areas: areas}, nil)
	appErr := requireAppError(t, err, activities.ErrBadInput, true)
	assert.Contains(t, appErr.Error(), fmt.Sprintf("allocated outside the copied areas: offset %d length %d", mib, 64*kib))

	qemuIO(t, "qcow2", path, fmt.Sprintf("write -P 0x99 %d 1", 32*kib))
	err = r.run(t, activities.VerifyTargetName, in, nil)
	appErr = requireAppError(t, err, activities.ErrBadInput, true)
	assert.Contains(t, appErr.Error(), fmt.Sprintf("differing from the parent: offset %d length %d", 8*kib, 56*kib))
	assertNoVerifyLeftovers(t, r)
}

// copyImage copies an overlay; the copy keeps the same backing file.
func copyImage(t *testing.T, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(to, data, 0o600))
}

func assertNoVerifyLeftovers(t *testing.T, r *rig) {
	t.Helper()
	leftovers, err := filepath.Glob(filepath.Join(r.settings.RunDir, verifyDirPrefix+"*"))
	require.NoError(t, err)
	assert.Empty(t, leftovers, "verification leaves nothing in the run dir")
}
