// Package coverage proves that a target image holds what a copy wrote and nothing else. The
// copy's digest covers only the copied areas; a write anywhere else (through the export while
// the copy ran, say) leaves the digest intact. So the image's own allocation is checked
// against the areas: clusters wholly outside them must not be allocated, and where a cluster
// reaches beyond an area the bytes outside must read as the copy left them.
package coverage

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/diskferry/diskferry/internal/blockcopy"
)

// Extent is a byte range of a disk.
type Extent = blockcopy.Extent

// Layer says what an image reads where it allocates nothing itself.
type Layer int

const (
	// Standalone is an image without backing file: unallocated reads as zeros, and so does
	// a zero cluster, so zero clusters are harmless anywhere.
	Standalone Layer = iota
	// Overlay reads its parent where it allocates nothing: any cluster of its own, a zero
	// cluster too, changes the content relative to the parent.
	Overlay
)

// Allocation is an extent the image allocates in its own layer (qemu.MapLayer's present
// extents).
type Allocation struct {
	Start, Length int64
	Zero          bool // a zero cluster: reads as zeros without holding data
}

// Findings are what an image allocates beyond the copied areas.
type Findings struct {
	// Stray are allocated ranges in clusters no area touches: the copy never wrote there.
	Stray []Extent
	// Partial are allocated ranges outside the areas but in clusters an area shares: qcow2
	// allocates whole clusters, so a copy ending mid-cluster allocates these bytes too. They
	// must read as before the copy: zeros on a standalone image, the parent's bytes on an
	// overlay (copy-on-write fills them from it). Only reading can tell.
	Partial []Extent
}

// Check compares an image's own allocation with the areas a copy wrote. Nil areas mean the
// copy wrote the whole disk: nothing lies outside, and the copy's digest covers every byte.
// clusterSize is the image's (qemu-img info); allocation is whole clusters of it.
func Check(alloc []Allocation, areas []Extent, clusterSize int64, layer Layer) (Findings, error) {
	if clusterSize <= 0 {
		return Findings{}, fmt.Errorf("coverage: cluster size %d", clusterSize)
	}
	if areas == nil {
		return Findings{}, nil
	}
	sorted, err := blockcopy.MergeAreas(areas)
	if err != nil {
		return Findings{}, fmt.Errorf("coverage: %w", err)
	}
	var f Findings
	for _, a := range alloc {
		if a.Length <= 0 || (a.Zero && layer == Standalone) {
			continue
		}
		for _, gap := range outside(Extent{Start: a.Start, Length: a.Length}, sorted) {
			f.add(gap, sorted, clusterSize)
		}
	}
	return f, nil
}

// add sorts one range outside the areas into partial (its clusters share bytes with an
// area) and stray. Only the clusters holding the range's first and last bytes can also
// hold area bytes: every cluster in between lies within the range.
func (f *Findings) add(gap Extent, areas []Extent, clusterSize int64) {
	start, end := gap.Start, gap.End()
	if head := start / clusterSize * clusterSize; touches(areas, head, head+clusterSize) {
		n := min(end, head+clusterSize)
		f.Partial = appendMerged(f.Partial, Extent{Start: start, Length: n - start})
		start = n
	}
	if start == end {
		return
	}
	if tail := (end - 1) / clusterSize * clusterSize; touches(areas, tail, tail+clusterSize) {
		n := max(start, tail)
		f.Partial = appendMerged(f.Partial, Extent{Start: n, Length: end - n})
		end = n
	}
	if start < end {
		f.Stray = appendMerged(f.Stray, Extent{Start: start, Length: end - start})
	}
}

// appendMerged appends e to ranges sorted by start, joining it with the last when they
// overlap or touch.
func appendMerged(ranges []Extent, e Extent) []Extent {
	if n := len(ranges); n > 0 && e.Start <= ranges[n-1].End() {
		ranges[n-1].Length = max(ranges[n-1].End(), e.End()) - ranges[n-1].Start
		return ranges
	}
	return append(ranges, e)
}

// outside returns the parts of e that no area covers; areas are sorted and merged.
func outside(e Extent, areas []Extent) []Extent {
	var out []Extent
	pos, end := e.Start, e.End()
	i, _ := slices.BinarySearchFunc(areas, pos, func(a Extent, off int64) int {
		if a.End() <= off {
			return -1
		}
		return 1
	})
	for ; i < len(areas) && areas[i].Start < end && pos < end; i++ {
		if areas[i].Start > pos {
			out = append(out, Extent{Start: pos, Length: areas[i].Start - pos})
		}
		pos = max(pos, areas[i].End())
	}
	if pos < end {
		out = append(out, Extent{Start: pos, Length: end - pos})
	}
	return out
}

// touches reports whether any area has a byte in [start, end); areas are sorted and merged.
func touches(areas []Extent, start, end int64) bool {
	i, _ := slices.BinarySearchFunc(areas, start, func(a Extent, off int64) int {
		if a.End() <= off {
			return -1
		}
		return 1
	})
	return i < len(areas) && areas[i].Start < end
}

// ErrNotExact marks a target that holds more than the copy wrote.
var ErrNotExact = errors.New("target holds data the copy did not write")

// maxNamed is how many offending ranges an error names.
const maxNamed = 5

// RangeError names the offending ranges of a target; it wraps ErrNotExact.
type RangeError struct {
	What   string   // what is wrong with the ranges
	Ranges []Extent // all of them, ascending
}

func (e *RangeError) Error() string {
	var b strings.Builder
	var total int64
	for _, r := range e.Ranges {
		total += r.Length
	}
	fmt.Fprintf(&b, "%v: %d bytes in %d ranges %s:", ErrNotExact, total, len(e.Ranges), e.What)
	for i, r := range e.Ranges {
		if i == maxNamed {
			fmt.Fprintf(&b, " and %d more", len(e.Ranges)-maxNamed)
			break
		}
		fmt.Fprintf(&b, " offset %d length %d", r.Start, r.Length)
		if i < len(e.Ranges)-1 && i < maxNamed-1 {
			b.WriteByte(',')
		}
	}
	return b.String()
}

func (e *RangeError) Unwrap() error { return ErrNotExact }
