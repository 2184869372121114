package blockcopy

import (
	"fmt"
	"sync"
	"time"
)

// commitState is where the committer stopped.
type commitState struct {
	offset int64  // end of the last chunk folded in order
	state  []byte // digest state at offset
	done   int64  // area bytes below offset
	ahead  []Finished
	digest string
}

// commit folds finished chunks in sequence (offset) order into the digest (dg nil: none), frees their
// slots, and every CheckpointInterval hands a candidate checkpoint to a goroutine that
// flushes the target before publishing it: writes below the offset have all completed
// before the flush is sent, so the flush covers them.
func (r *run) commit(dg *digest, offset, done int64) commitState {
	candidates := make(chan Checkpoint, 1)
	var flusher sync.WaitGroup
	flusher.Go(func() {
		for cp := range candidates {
			if err := r.flushTarget(); err != nil {
				r.abort(err)
				continue
			}
			r.checkpoint.Store(&cp)
		}
	})

	window := int64(len(r.slots))
	finished := make([]bool, window)
	var next int64
	last := time.Now()
	for seq := range r.finished {
		finished[seq%window] = true
		for finished[next%window] {
			finished[next%window] = false
			s := &r.slots[next%window]
			r.fold(dg, s)
			offset, done = s.c.off+s.c.n, done+s.c.n
			next++
			r.tokens <- struct{}{}
		}
		if time.Since(last) >= r.opts.CheckpointInterval && len(candidates) == 0 {
			state, err := dg.state()
			if err != nil {
				r.abort(err)
				continue
			}
			candidates <- Checkpoint{Offset: offset, DigestState: state, BytesDone: done, Ahead: r.ahead(next, finished)}
			last = time.Now()
		}
	}
	close(candidates)
	flusher.Wait()
	state, err := dg.state()
	if err != nil {
		r.abort(err)
	}
	return commitState{offset: offset, state: state, done: done, ahead: r.ahead(next, finished), digest: dg.hex()}
}

// ahead lists the chunks finished beyond next (the first not finished), which a resume need
// not redo. Zero requests and skips are left out: redoing them costs no reads.
func (r *run) ahead(next int64, finished []bool) []Finished {
	window := int64(len(r.slots))
	var out []Finished
	for seq := next + 1; seq < next+window; seq++ {
		if !finished[seq%window] {
			continue
		}
		s := &r.slots[seq%window]
		f := Finished{Start: s.c.off, Length: s.c.n}
		switch s.c.kind {
		case kindData:
			for i := range s.hashes {
				f.Sums = append(f.Sums, s.hashes[i][:]...)
			}
		case kindDone:
			f.Sums = s.c.sums
		default:
			continue
		}
		out = appendFinished(out, f)
	}
	return out
}

// fold adds a chunk's piece hashes and hands them to OnBlock; pieces of zero and skipped
// chunks hash as zeros.
func (r *run) fold(dg *digest, s *slot) {
	if dg == nil {
		return
	}
	end := s.c.off + s.c.n
	for i, p := 0, s.c.off; p < end; i++ {
		pe := pieceEnd(p, end, r.opts.BlockSize)
		var sum [32]byte
		switch s.c.kind {
		case kindData:
			sum = s.hashes[i]
		case kindDone:
			copy(sum[:], s.c.sums[32*i:])
		default:
			sum = r.zh.sum(pe - p)
		}
		dg.fold(&sum)
		if r.opts.OnBlock != nil && r.actx.Err() == nil {
			if err := r.opts.OnBlock(BlockHash{Offset: p, Length: pe - p, Sum: sum}); err != nil {
				r.abort(fmt.Errorf("block hash at %d: %w", p, err))
			}
		}
		p = pe
	}
}
