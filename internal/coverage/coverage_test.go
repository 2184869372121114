package coverage

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/nbd"
	"github.com/diskferry/diskferry/internal/testenv"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
	cl  = 64 * kib // the qcow2 default cluster
)

func ext(start, length int64) Extent { return Extent{Start: start, Length: length} }

func data(start, length int64) Allocation { return Allocation{Start: start, Length: length} }

func zero(start, length int64) Allocation {
	return Allocation{Start: start, Length: length, Zero: true}
}

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name    string
		alloc   []Allocation
		areas   []Extent
		layer   Layer
		stray   []Extent
		partial []Extent
	}{
		{name: "nil areas: the whole disk was copied", alloc: []Allocation{data(0, 8*mib)}, areas: nil},
		{name: "nothing copied, data allocated", alloc: []Allocation{data(0, cl)}, areas: []Extent{}, stray: []Extent{ext(0, cl)}},
		{name: "nothing copied, zero cluster on a standalone image", alloc: []Allocation{zero(mib, cl)}, areas: []Extent{}},
		{name: "nothing copied, zero cluster on an overlay", alloc: []Allocation{zero(mib, cl)}, areas: []Extent{}, layer: Overlay,
			stray: []Extent{ext(mib, cl)}},
		{name: "allocation equals the areas", alloc: []Allocation{data(0, mib), zero(2*mib, cl)}, areas: []Extent{ext(0, mib), ext(2*mib, cl)},
			layer: Overlay},
		{name: "one cluster beyond the area", alloc: []Allocation{data(0, mib+cl)}, areas: []Extent{ext(0, mib)}, stray: []Extent{ext(mib, cl)}},
		{name: "a write far away", alloc: []Allocation{data(0, mib), data(255*mib, mib)}, areas: []Extent{ext(0, mib)},
			stray: []Extent{ext(255*mib, mib)}},
		{name: "area inside one cluster", alloc: []Allocation{data(0, cl)}, areas: []Extent{ext(4*kib, 4*kib)},
			partial: []Extent{ext(0, 4*kib), ext(8*kib, cl-8*kib)}},
		{name: "area across a cluster boundary", alloc: []Allocation{data(0, 2*cl)}, areas: []Extent{ext(cl-4*kib, 12*kib)},
			partial: []Extent{ext(0, cl-4*kib), ext(cl+8*kib, cl-8*kib)}},
		{name: "partial clusters and a stray one after", alloc: []Allocation{data(0, 4*cl)}, areas: []Extent{ext(cl-4*kib, 8*kib)},
			partial: []Extent{ext(0, cl-4*kib), ext(cl+4*kib, cl-4*kib)}, stray: []Extent{ext(2*cl, 2*cl)}},
		{name: "two areas in one cluster", alloc: []Allocation{data(0, cl)}, areas: []Extent{ext(0, 4*kib), ext(8*kib, 4*kib)},
			partial: []Extent{ext(4*kib, 4*kib), ext(12*kib, cl-12*kib)}},
		{name: "unsorted overlapping areas", alloc: []Allocation{data(0, cl)}, areas: []Extent{ext(8*kib, 8*kib), ext(0, 12*kib)},
			partial: []Extent{ext(16*kib, cl-16*kib)}},
		{name: "zero cluster partly in an area, overlay", alloc: []Allocation{zero(0, cl)}, areas: []Extent{ext(0, 4*kib)}, layer: Overlay,
			partial: []Extent{ext(4*kib, cl-4*kib)}},
		{name: "zero cluster partly in an area, standalone", alloc: []Allocation{zero(0, cl)}, areas: []Extent{ext(0, 4*kib)}},
		{name: "short last cluster", alloc: []Allocation{data(0, cl+36*kib)}, areas: []Extent{ext(cl, 36*kib)}, stray: []Extent{ext(0, cl)}},
		{name: "stray ranges join across extents", alloc: []Allocation{data(0, cl), zero(cl, cl)}, areas: []Extent{ext(mib, cl)},
			layer: Overlay, stray: []Extent{ext(0, 2*cl)}},
		{name: "long gap between two areas", alloc: []Allocation{data(0, mib)}, areas: []Extent{ext(0, 4*kib), ext(mib-4*kib, 4*kib)},
			partial: []Extent{ext(4*kib, cl-4*kib), ext(mib-cl, cl-4*kib)}, stray: []Extent{ext(cl, mib-2*cl)}},
		{name: "gap ends in a cluster an area starts", alloc: []Allocation{data(0, 2*cl)}, areas: []Extent{ext(cl+4*kib, cl-4*kib)},
			stray: []Extent{ext(0, cl)}, partial: []Extent{ext(cl, 4*kib)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := Check(tc.alloc, tc.areas, cl, tc.layer)
			require.NoError(t, err)
			assert.Equal(t, tc.stray, f.Stray, "stray")
			assert.Equal(t, tc.partial, f.Partial, "partial")
		})
	}
}

func TestCheckRejectsBadInput(t *testing.T) {
	_, err := Check(nil, []Extent{}, 0, Standalone)
	assert.Error(t, err)
	_, err = Check([]Allocation{data(0, cl)}, []Extent{ext(-1, cl)}, cl, Standalone)
	assert.Error(t, err)
}

func TestRangeErrorNamesTheFirstRanges(t *testing.T) {
	var ranges []Extent
	for i := range int64(7) {
		ranges = append(ranges, ext(i*mib, cl))
	}
	err := error(&RangeError{What: "allocated outside the copied areas", Ranges: ranges})
	assert.True(t, errors.Is(err, ErrNotExact))
	assert.Equal(t, "target holds data the copy did not write: 458752 bytes in 7 ranges allocated outside the copied areas:"+
		" offset 0 length 65536, offset 1048576 length 65536, offset 2097152 length 65536, offset 3145728 length 65536,"+
		" offset 4194304 length 65536 and 2 more", err.Error())
	err = &RangeError{What: "not zero", Ranges: ranges[:1]}
	assert.Equal(t, "target holds data the copy did not write: 65536 bytes in 1 ranges not zero: offset 0 length 65536", err.Error())
}

func qemuIO(t *testing.T, path string, cmds ...string) {
	t.Helper()
	bin := testenv.RequireCommand(t, "qemu-io")
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command(bin, append(args, path)...).CombinedOutput()
	require.NoError(t, err, "qemu-io: %s", out)
}

func TestDiffering(t *testing.T) {
	testenv.Integration(t)
	qemuImg := testenv.RequireCommand(t, "qemu-img")
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	base := testenv.CreateQcow2(t, 8*mib)
	qemuIO(t, base, "write -P 0xaa 0 1M")
	top := filepath.Join(t.TempDir(), "top.qcow2")
	out, err := exec.Command(qemuImg, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top).CombinedOutput()
	require.NoError(t, err, string(out))
	// Copy-on-write keeps the parent's bytes around the write; 2M+ is zero in both, and
	// then the overlay writes a byte the parent does not have.
	qemuIO(t, top, "write -P 0x55 4096 4096", fmt.Sprintf("write -P 0x11 %d 1", 2*mib+100))

	ro := testenv.QemuNBDOptions{Args: []string{"--read-only"}}
	topURI := testenv.StartQemuNBD(t, top, ro).URI
	baseURI := testenv.StartQemuNBD(t, base, ro).URI
	opts := nbd.Options{ConnectTimeout: 10 * time.Second}

	ranges := []Extent{ext(0, 4096), ext(8192, cl-8192), ext(2*mib, 100), ext(2*mib+100, 1), ext(3*mib, 2*mib)}
	differ, err := Differing(ctx, topURI, baseURI, ranges, opts)
	require.NoError(t, err)
	assert.Equal(t, []Extent{ext(2*mib+100, 1)}, differ, "equal to the parent except the overlay's own byte")

	differ, err = Differing(ctx, topURI, "", ranges, opts)
	require.NoError(t, err)
	assert.Equal(t, []Extent{ext(0, 4096), ext(8192, cl-8192), ext(2*mib+100, 1)}, differ, "zero except the parent's and the byte")

	differ, err = Differing(ctx, topURI, "", nil, opts)
	require.NoError(t, err)
	assert.Empty(t, differ)
	_, err = Differing(ctx, "nbd+unix:///?socket="+filepath.Join(t.TempDir(), "none.sock"), "", ranges, opts)
	assert.Error(t, err)
}
