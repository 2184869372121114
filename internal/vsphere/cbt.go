package vsphere

import (
	"context"
	"fmt"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/types"
)

// AllAllocated is the changeId that asks CBT for every allocated area of a disk: the
// map of a full backup. It avoids VDDK's QueryAllocatedBlocks, which failed on >1 TB disks.
const AllAllocated = "*"

// Extent is a byte range of a disk.
type Extent struct {
	Start  int64
	Length int64
}

// End is the first byte after the extent.
func (e Extent) End() int64 { return e.Start + e.Length }

// QueryChangedAreas returns the areas of a disk that changed between changeID and the
// snapshot (or every allocated area for AllAllocated), sorted, adjacent areas merged.
// vCenter answers in bounded batches; each next call starts where the previous answer's
// range ended (assigned, never added to the old offset), until the capacity is covered.
func (c *Client) QueryChangedAreas(ctx context.Context, vm *object.VirtualMachine, snapshotMoref string, diskKey int32, capacity int64, changeID string) ([]Extent, error) {
	snap, err := snapshotRef(snapshotMoref)
	if err != nil {
		return nil, fmt.Errorf("query changed areas of disk %d: %w", diskKey, err)
	}
	if changeID == "" {
		return nil, fmt.Errorf("query changed areas of disk %d: empty changeId (use %q for a full map): %w", diskKey, AllAllocated, ErrInvalidChangeID)
	}
	var out []Extent
	var start int64
	for start < capacity {
		res, err := methods.QueryChangedDiskAreas(ctx, c.vim, &types.QueryChangedDiskAreas{
			This:        vm.Reference(),
			Snapshot:    &snap,
			DeviceKey:   diskKey,
			StartOffset: start,
			ChangeId:    changeID,
		})
		if err != nil {
			if isInvalidChangeID(err) {
				return nil, fmt.Errorf("query changed areas of disk %d since %q at %d: %w (%v)", diskKey, changeID, start, ErrInvalidChangeID, err)
			}
			return nil, fmt.Errorf("query changed areas of disk %d since %q at %d: %w", diskKey, changeID, start, err)
		}
		info := res.Returnval
		for _, a := range info.ChangedArea {
			e := Extent{Start: a.Start, Length: a.Length}
			if e.Length <= 0 || e.Start < start || e.Start >= capacity {
				return nil, fmt.Errorf("query changed areas of disk %d: vCenter returned area [%d,+%d) outside [%d,%d)", diskKey, a.Start, a.Length, start, capacity)
			}
			if e.End() > capacity {
				e.Length = capacity - e.Start
			}
			out = appendMerged(out, e)
		}
		next := info.StartOffset + info.Length
		if next <= start {
			return nil, fmt.Errorf("query changed areas of disk %d: no progress at offset %d (answer covered [%d,+%d))", diskKey, start, info.StartOffset, info.Length)
		}
		start = next
	}
	return out, nil
}

// appendMerged appends e to sorted extents, merging it with the last one when they
// touch or overlap.
func appendMerged(out []Extent, e Extent) []Extent {
	if n := len(out); n > 0 && e.Start <= out[n-1].End() {
		if e.End() > out[n-1].End() {
			out[n-1].Length = e.End() - out[n-1].Start
		}
		return out
	}
	return append(out, e)
}

// isInvalidChangeID recognises vCenter's refusal of a changeId: InvalidArgument on
// the changeId, or a FileFault when the CBT data no longer matches the disk.
func isInvalidChangeID(err error) bool {
	var ia *types.InvalidArgument
	if asMethodFault(err, &ia) && (ia.InvalidProperty == "changeId" || ia.InvalidProperty == "") {
		return true
	}
	var ff *types.FileFault
	return asMethodFault(err, &ff)
}
