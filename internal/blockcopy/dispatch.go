package blockcopy

import (
	"cmp"
	"context"
	"fmt"
	"slices"

	"github.com/diskferry/diskferry/internal/nbd"
)

// dispatch cuts the areas into chunks in offset order and hands them out; stretches a
// resumed copy finished before go straight to the committer. A piece (the areas split at
// BlockSize) is a hole only when block status says all of it reads as zeros; chunks never
// split a piece, so each piece's hash comes from one chunk.
func (r *run) dispatch(ctx context.Context, areas []Extent, ahead []Finished) error {
	var seq int64
	emit := func(ch chunk) error {
		select {
		case <-r.tokens:
		case <-ctx.Done():
			return fmt.Errorf("copy cancelled: %w", context.Cause(ctx))
		case <-r.actx.Done():
			return context.Cause(r.actx)
		}
		s := &r.slots[seq%int64(len(r.slots))]
		s.c = ch
		switch ch.kind {
		case kindSkip:
			r.nDone.Add(ch.n)
			r.finished <- seq
		case kindDone: // counted in the resumed progress already
			r.finished <- seq
		default:
			r.work.push(seq)
		}
		seq++
		return nil
	}
	defer r.work.close()
	bs := r.opts.BlockSize
	for _, a := range segments(areas, ahead) {
		if a.finished != nil {
			if err := emit(chunk{off: a.Start, n: a.Length, kind: kindDone, sums: a.finished.Sums}); err != nil {
				return err
			}
			continue
		}
		for ws := a.Start; ws < a.End(); {
			// Windows end on a block boundary, so no piece is split; BlockSize is at most
			// the 32 MiB request limit, far below the window, so the window is never empty.
			we := min(a.End(), (ws+blockStatusWindow)/bs*bs)
			ext, err := r.extents(ctx, ws, we)
			if err != nil {
				return err
			}
			if err := r.cut(ws, we, ext, emit); err != nil {
				return err
			}
			ws = we
		}
	}
	return nil
}

// extents maps [start, end) of the source; without block status everything is data.
func (r *run) extents(ctx context.Context, start, end int64) ([]nbd.Extent, error) {
	if !r.conns.blockStatus {
		return []nbd.Extent{{Offset: start, Length: end - start}}, nil
	}
	// The caller's cancel must reach a request a hung source never answers, not wait for
	// the command timeout: the copy ends anyway, and only what was flushed counts.
	bctx, stop := context.WithCancelCause(r.actx)
	defer stop(nil)
	unlink := context.AfterFunc(ctx, func() { stop(context.Cause(ctx)) })
	defer unlink()
	ext, err := r.conns.meta.BlockStatus(bctx, start, end-start)
	if err != nil && ctx.Err() != nil {
		return nil, fmt.Errorf("copy cancelled: %w", context.Cause(ctx))
	}
	if err != nil {
		return nil, fmt.Errorf("source block status at %d: %w", start, err)
	}
	return ext, nil
}

// cut groups the pieces of [start, end) into runs of equal kind and emits them as chunks
// of at most RequestSize (data) or maxZeroRequest (zero).
func (r *run) cut(start, end int64, ext []nbd.Extent, emit func(chunk) error) error {
	bs := r.opts.BlockSize
	holeKind := kindZero
	if r.opts.DestinationIsZero || r.dst == "" {
		holeKind = kindSkip
	}
	runStart, runKind := start, -1
	flush := func(at int64) error {
		if runKind < 0 || at == runStart {
			return nil
		}
		ch := chunk{off: runStart, n: at - runStart, kind: runKind}
		if runKind == kindData {
			ch.holes = holesIn(ext, runStart, at)
		}
		runStart = at
		return emit(ch)
	}
	i := 0
	for p := start; p < end; {
		pe := pieceEnd(p, end, bs)
		for i < len(ext) && ext[i].Offset+ext[i].Length <= p {
			i++
		}
		zero := true
		for j := i; j < len(ext) && ext[j].Offset < pe; j++ {
			if !ext[j].Zero() {
				zero = false
				break
			}
		}
		kind, limit := kindData, r.opts.RequestSize
		if zero {
			kind, limit = holeKind, maxZeroRequest
		}
		if kind != runKind || pe-runStart > limit {
			if err := flush(p); err != nil {
				return err
			}
			runKind = kind
		}
		p = pe
	}
	return flush(end)
}

// minReadHole is the smallest stretch of zeros inside a data chunk that is not read: a
// piece holding a little data among holes (many small runs) would otherwise read the whole
// piece, while a shorter hole costs less to read than an extra request.
const minReadHole = 64 << 10

// holesIn returns the zero extents of ext inside [start, end) of at least minReadHole.
func holesIn(ext []nbd.Extent, start, end int64) []Extent {
	i, _ := slices.BinarySearchFunc(ext, start, func(e nbd.Extent, off int64) int {
		return cmp.Compare(e.Offset+e.Length, off+1)
	})
	var holes []Extent
	for ; i < len(ext) && ext[i].Offset < end; i++ {
		if !ext[i].Zero() {
			continue
		}
		hs, he := max(start, ext[i].Offset), min(end, ext[i].Offset+ext[i].Length)
		if he-hs >= minReadHole {
			holes = append(holes, Extent{Start: hs, Length: he - hs})
		}
	}
	return holes
}
