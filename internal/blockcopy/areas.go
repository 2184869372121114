package blockcopy

import (
	"cmp"
	"fmt"
	"slices"
)

// Extent is a byte range of a disk.
type Extent struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
}

// End is the first byte after the extent.
func (e Extent) End() int64 { return e.Start + e.Length }

// normalizeAreas sorts and merges areas and checks them against the disk size. nil means
// the whole disk.
func normalizeAreas(areas []Extent, size int64) ([]Extent, error) {
	if areas == nil {
		if size == 0 {
			return []Extent{}, nil
		}
		return []Extent{{Start: 0, Length: size}}, nil
	}
	for _, a := range areas {
		if a.Start < 0 || a.Length < 0 || a.End() > size || a.End() < a.Start {
			return nil, fmt.Errorf("area [%d, +%d) outside the disk of %d bytes", a.Start, a.Length, size)
		}
	}
	return MergeAreas(areas)
}

// MergeAreas returns the areas sorted by start, overlapping and adjacent ones joined and
// empty ones dropped; a negative start or length is an error. The input is not changed.
func MergeAreas(areas []Extent) ([]Extent, error) {
	sorted := slices.Clone(areas)
	slices.SortFunc(sorted, func(a, b Extent) int { return cmp.Compare(a.Start, b.Start) })
	out := make([]Extent, 0, len(sorted))
	for _, a := range sorted {
		if a.Start < 0 || a.Length < 0 {
			return nil, fmt.Errorf("invalid area [%d, +%d)", a.Start, a.Length)
		}
		if a.Length == 0 {
			continue
		}
		if n := len(out); n > 0 && a.Start <= out[n-1].End() {
			out[n-1].Length = max(out[n-1].End(), a.End()) - out[n-1].Start
			continue
		}
		out = append(out, a)
	}
	return out, nil
}

// clipAreas drops what lies below offset.
func clipAreas(areas []Extent, offset int64) []Extent {
	out := make([]Extent, 0, len(areas))
	for _, a := range areas {
		switch {
		case a.End() <= offset:
			continue
		case a.Start < offset:
			out = append(out, Extent{Start: offset, Length: a.End() - offset})
		default:
			out = append(out, a)
		}
	}
	return out
}

// bytesBelow counts area bytes below offset.
func bytesBelow(areas []Extent, offset int64) int64 {
	var n int64
	for _, a := range areas {
		if a.Start >= offset {
			break
		}
		n += min(a.End(), offset) - a.Start
	}
	return n
}

func totalBytes(areas []Extent) int64 {
	var n int64
	for _, a := range areas {
		n += a.Length
	}
	return n
}
