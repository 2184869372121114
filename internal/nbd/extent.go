package nbd

// base:allocation flags of an extent.
const (
	StateHole = 1 // not allocated on the server
	StateZero = 2 // reads as zeros
)

// Extent is one range of a block-status map.
type Extent struct {
	Offset int64
	Length int64
	Flags  uint32 // StateHole | StateZero
}

// Hole reports whether the extent is unallocated.
func (e Extent) Hole() bool { return e.Flags&StateHole != 0 }

// Zero reports whether the extent reads as zeros.
func (e Extent) Zero() bool { return e.Flags&StateZero != 0 }

func appendExtent(out []Extent, e Extent) []Extent {
	if n := len(out); n > 0 && out[n-1].Flags == e.Flags && out[n-1].Offset+out[n-1].Length == e.Offset {
		out[n-1].Length += e.Length
		return out
	}
	return append(out, e)
}
