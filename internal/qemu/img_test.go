package qemu

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/testenv"
)

const (
	mib      = int64(1) << 20
	testSize = 64 * mib
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func requireQemuImg(t *testing.T) {
	t.Helper()
	testenv.RequireCommand(t, "qemu-img")
}

// writePattern writes length bytes of pattern at offset into a qcow2 through qemu-io.
func writePattern(t *testing.T, path string, pattern byte, offset, length int64) {
	t.Helper()
	testenv.RequireCommand(t, "qemu-io")
	out, err := exec.Command("qemu-io", "-f", "qcow2",
		"-c", fmt.Sprintf("write -P %d %d %d", pattern, offset, length), path).CombinedOutput()
	require.NoError(t, err, "qemu-io: %s", out)
}

func TestCreateImageAndInfo(t *testing.T) {
	requireQemuImg(t)
	ctx := testCtx(t)
	path := filepath.Join(t.TempDir(), "base.qcow2")

	require.NoError(t, CreateImage(ctx, path, testSize))
	assertPrivate(t, path)
	info, err := Info(ctx, path)
	require.NoError(t, err)
	assert.Equal(t, FormatQCOW2, info.Format)
	assert.Equal(t, testSize, info.VirtualSize)
	assert.Positive(t, info.ActualSize)
	assert.Less(t, info.ActualSize, mib, "an empty qcow2 must not allocate its virtual size")
	assert.Empty(t, info.BackingFile)

	err = CreateImage(ctx, path, testSize)
	assert.ErrorIs(t, err, fs.ErrExist, "must never overwrite an existing point")
	assert.Error(t, CreateImage(ctx, filepath.Join(t.TempDir(), "zero.qcow2"), 0))
}

// assertPrivate checks a restore point's image is not readable by others: it holds a
// VM's disk.
func assertPrivate(t *testing.T, path string) {
	t.Helper()
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Zero(t, st.Mode().Perm()&^TargetMode, "image %s has mode %04o, want 0640 or tighter", path, st.Mode().Perm())
}

func TestCreateFailureLeavesNoFile(t *testing.T) {
	requireQemuImg(t)
	dir := t.TempDir()
	top := filepath.Join(dir, "top.qcow2")
	require.Error(t, CreateOverlay(testCtx(t), top, filepath.Join(dir, "missing.qcow2")))
	assert.NoFileExists(t, top, "a failed create removes the file made for it")
}

func TestCreateOverlay(t *testing.T) {
	requireQemuImg(t)
	ctx := testCtx(t)
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	require.NoError(t, CreateImage(ctx, base, testSize))
	writePattern(t, base, 0xaa, mib, mib)

	require.NoError(t, CreateOverlay(ctx, top, base))
	assertPrivate(t, top)
	info, err := Info(ctx, top)
	require.NoError(t, err)
	assert.Equal(t, base, info.BackingFile)
	assert.Equal(t, FormatQCOW2, info.BackingFormat)
	assert.Equal(t, testSize, info.VirtualSize, "overlay inherits the parent's size")

	// The overlay reads through to its parent; writes to it leave the parent untouched.
	res, err := Compare(ctx, QCOW2(base), QCOW2(top))
	require.NoError(t, err)
	assert.True(t, res.Equal, res.Message)
	writePattern(t, top, 0x55, 8*mib, 64*1024)
	res, err = Compare(ctx, QCOW2(base), QCOW2(top))
	require.NoError(t, err)
	assert.False(t, res.Equal)
	assert.Contains(t, res.Message, "offset 8388608")

	extents, err := Map(ctx, QCOW2(top))
	require.NoError(t, err)
	var fromParent, fromTop bool
	for _, e := range extents {
		if e.Data && e.Depth == 1 && e.Start == mib {
			fromParent = true
		}
		if e.Data && e.Depth == 0 && e.Start == 8*mib {
			fromTop = true
		}
	}
	assert.True(t, fromParent, "map shows the parent's data at depth 1: %+v", extents)
	assert.True(t, fromTop, "map shows the overlay's own data at depth 0: %+v", extents)

	assert.Error(t, CreateOverlay(ctx, filepath.Join(dir, "x.qcow2"), filepath.Join(dir, "missing.qcow2")))
}

func TestMapSparse(t *testing.T) {
	requireQemuImg(t)
	ctx := testCtx(t)
	path := filepath.Join(t.TempDir(), "sparse.qcow2")
	require.NoError(t, CreateImage(ctx, path, testSize))
	writePattern(t, path, 1, mib, 64*1024)

	extents, err := Map(ctx, QCOW2(path))
	require.NoError(t, err)
	var total, data int64
	for _, e := range extents {
		total += e.Length
		if e.Data {
			data += e.Length
			assert.Equal(t, mib, e.Start)
			require.NotNil(t, e.Offset)
		} else {
			assert.True(t, e.Zero)
		}
	}
	assert.Equal(t, testSize, total, "extents cover the whole disk")
	assert.Equal(t, int64(64*1024), data)
}

// writeZeroes writes zeros at offset through qemu-io's write -z: qcow2 then records zero
// clusters where it can instead of data.
func writeZeroes(t *testing.T, path string, offset, length int64) {
	t.Helper()
	testenv.RequireCommand(t, "qemu-io")
	out, err := exec.Command("qemu-io", "-f", "qcow2",
		"-c", fmt.Sprintf("write -z %d %d", offset, length), path).CombinedOutput()
	require.NoError(t, err, "qemu-io: %s", out)
}

func TestMapLayer(t *testing.T) {
	requireQemuImg(t)
	ctx := testCtx(t)
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	require.NoError(t, CreateImage(ctx, base, testSize))
	writePattern(t, base, 0xaa, mib, mib)
	require.NoError(t, CreateOverlay(ctx, top, base))
	writeZeroes(t, top, mib, 64*1024)       // a zero cluster over the parent's data
	writePattern(t, top, 0x55, 8*mib, 4096) // a partial write allocates the whole cluster

	own := func(extents []MapExtent) []MapExtent {
		var present []MapExtent
		var total int64
		for _, e := range extents {
			total += e.Length
			if e.Present {
				e.Offset = nil
				present = append(present, e)
			}
		}
		assert.Equal(t, testSize, total, "extents cover the whole disk")
		return present
	}
	extents, err := MapLayer(ctx, top)
	require.NoError(t, err)
	assert.Equal(t, []MapExtent{
		{Start: mib, Length: 64 * 1024, Present: true, Zero: true},
		{Start: 8 * mib, Length: 64 * 1024, Present: true, Data: true},
	}, own(extents), "only the overlay's own clusters, none of the parent's")

	extents, err = MapLayer(ctx, base)
	require.NoError(t, err)
	assert.Equal(t, []MapExtent{{Start: mib, Length: mib, Present: true, Data: true}}, own(extents))

	// An image some process writes is refused, not mapped while it moves.
	testenv.StartQemuNBD(t, top, testenv.QemuNBDOptions{})
	_, err = MapLayer(ctx, top)
	assert.ErrorIs(t, err, ErrImageLocked)
	_, err = MapLayer(ctx, filepath.Join(dir, "missing.qcow2"))
	assert.Error(t, err)
}

func TestCompareErrors(t *testing.T) {
	requireQemuImg(t)
	ctx := testCtx(t)
	dir := t.TempDir()
	a := filepath.Join(dir, "a.qcow2")
	require.NoError(t, CreateImage(ctx, a, testSize))

	raw := filepath.Join(dir, "a.raw")
	require.NoError(t, os.WriteFile(raw, nil, 0o600))
	require.NoError(t, os.Truncate(raw, testSize))
	res, err := Compare(ctx, QCOW2(a), Raw(raw))
	require.NoError(t, err)
	assert.True(t, res.Equal, "an empty qcow2 equals a zero raw file: %s", res.Message)

	_, err = Compare(ctx, QCOW2(a), QCOW2(filepath.Join(dir, "missing.qcow2")))
	assert.Error(t, err, "a missing image is an error, not a mismatch")
}

func TestCheck(t *testing.T) {
	requireQemuImg(t)
	ctx := testCtx(t)
	dir := t.TempDir()
	clean := filepath.Join(dir, "clean.qcow2")
	require.NoError(t, CreateImage(ctx, clean, testSize))
	writePattern(t, clean, 7, mib, 64*1024)

	res, err := Check(ctx, clean)
	require.NoError(t, err)
	assert.Equal(t, int64(1), res.AllocatedClusters)
	assert.Zero(t, res.Corruptions)

	leaky := copyFile(t, clean, filepath.Join(dir, "leaky.qcow2"))
	f, refBlock := openRefcountBlock(t, leaky)
	clusters := fileSize(t, leaky) / (64 * 1024)
	// A refcount for a cluster nothing references, inside the file: a leak.
	_, err = f.WriteAt([]byte{0, 1}, refBlock+2*clusters)
	require.NoError(t, err)
	require.NoError(t, f.Truncate((clusters+1)*64*1024))
	require.NoError(t, f.Close())
	res, err = Check(ctx, leaky)
	require.ErrorIs(t, err, ErrImageCorrupt)
	assert.Equal(t, int64(1), res.Leaks)

	broken := copyFile(t, clean, filepath.Join(dir, "broken.qcow2"))
	f, refBlock = openRefcountBlock(t, broken)
	// The header cluster with refcount 0: a corruption.
	_, err = f.WriteAt([]byte{0, 0}, refBlock)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	res, err = Check(ctx, broken)
	require.ErrorIs(t, err, ErrImageCorrupt)
	assert.Equal(t, int64(1), res.Corruptions)

	_, err = Check(ctx, filepath.Join(dir, "missing.qcow2"))
	assert.Error(t, err)
	assert.NotErrorIs(t, err, ErrImageCorrupt)
}

func copyFile(t *testing.T, from, to string) string {
	t.Helper()
	data, err := os.ReadFile(from)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(to, data, 0o600))
	return to
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	require.NoError(t, err)
	return st.Size()
}

// openRefcountBlock opens a qcow2 for writing and returns the offset of its first refcount
// block (header field refcount_table_offset at byte 48, first table entry).
func openRefcountBlock(t *testing.T, path string) (*os.File, int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	buf := make([]byte, 8)
	_, err = f.ReadAt(buf, 48)
	require.NoError(t, err)
	_, err = f.ReadAt(buf, int64(binary.BigEndian.Uint64(buf)))
	require.NoError(t, err)
	return f, int64(binary.BigEndian.Uint64(buf))
}

func TestLockedImageIsTyped(t *testing.T) {
	assert.True(t, errors.Is(classifyStartError(errors.New("exit status 1"),
		`qemu-nbd: Failed to blk_new_open 'a.qcow2': Failed to get "write" lock`), ErrImageLocked))
	assert.True(t, errors.Is(classifyStartError(errors.New("exit status 1"),
		"qemu-nbd: Failed to find an available port: Address already in use"), ErrPortInUse))
	err := classifyStartError(errors.New("exit status 1"), "qemu-nbd: other")
	assert.False(t, errors.Is(err, ErrPortInUse) || errors.Is(err, ErrImageLocked))
}
