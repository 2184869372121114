package blockcopy

import (
	"fmt"
	"slices"
)

// Finished is a stretch of the areas beyond a checkpoint's offset that is written and
// flushed: the ahead lane's work (see queue.go). A resume does not redo it.
type Finished struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	// Sums are the SHA-256 of its pieces, 32 bytes each in order; empty without digest.
	Sums []byte `json:"sums,omitempty"`
}

// End is the first byte after the stretch.
func (f Finished) End() int64 { return f.Start + f.Length }

// pieces counts the digest pieces of [start, end).
func pieces(start, end, blockSize int64) int {
	n := 0
	for p := start; p < end; p = pieceEnd(p, end, blockSize) {
		n++
	}
	return n
}

// checkAhead validates a checkpoint's finished stretches against the areas: ascending,
// beyond the offset, each inside one area, with one sum per piece when there is a digest.
func checkAhead(ahead []Finished, offset int64, areas []Extent, blockSize int64, digest bool) error {
	prev := offset
	for _, f := range ahead {
		i, _ := slices.BinarySearchFunc(areas, f.Start, func(a Extent, off int64) int {
			switch {
			case a.End() <= off:
				return -1
			case a.Start > off:
				return 1
			}
			return 0
		})
		switch {
		case f.Length <= 0 || f.Start < prev:
			return fmt.Errorf("finished stretch %d+%d is not beyond %d", f.Start, f.Length, prev)
		case i == len(areas) || areas[i].Start > f.Start || areas[i].End() < f.End():
			return fmt.Errorf("finished stretch %d+%d is not inside the areas", f.Start, f.Length)
		case digest && len(f.Sums) != 32*pieces(f.Start, f.End(), blockSize):
			return fmt.Errorf("finished stretch %d+%d has %d bytes of sums, want 32 per %d-byte piece",
				f.Start, f.Length, len(f.Sums), blockSize)
		}
		prev = f.End()
	}
	return nil
}

// finishedBytes counts the bytes of the stretches.
func finishedBytes(ahead []Finished) int64 {
	var n int64
	for _, f := range ahead {
		n += f.Length
	}
	return n
}

// appendFinished adds a stretch, merging it into the last one when they touch.
func appendFinished(out []Finished, f Finished) []Finished {
	if n := len(out); n > 0 && out[n-1].End() == f.Start {
		out[n-1].Length += f.Length
		out[n-1].Sums = append(out[n-1].Sums, f.Sums...)
		return out
	}
	f.Sums = slices.Clone(f.Sums)
	return append(out, f)
}

// segment is a part of the areas a resumed copy treats alike: to copy, or finished.
type segment struct {
	Extent
	finished *Finished
}

// segments splits the areas (already clipped at the checkpoint) at the finished stretches.
func segments(areas []Extent, ahead []Finished) []segment {
	var out []segment
	j := 0
	for _, a := range areas {
		p := a.Start
		for ; j < len(ahead) && ahead[j].Start < a.End(); j++ {
			f := &ahead[j]
			if f.Start > p {
				out = append(out, segment{Extent: Extent{Start: p, Length: f.Start - p}})
			}
			out = append(out, segment{Extent: Extent{Start: f.Start, Length: f.Length}, finished: f})
			p = f.End()
		}
		if p < a.End() {
			out = append(out, segment{Extent: Extent{Start: p, Length: a.End() - p}})
		}
	}
	return out
}
