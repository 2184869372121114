package blockcopy

import (
	"context"
	"crypto/sha256"
	"fmt"
	"sync"

	"github.com/diskferry/diskferry/internal/nbd"
)

const workersPerConnection = 2

// writeGrain is the finest stretch of zeros in read data that becomes a zero request (or
// nothing, when the target reads as zeros) instead of data: qcow2's default cluster size,
// the unit a target allocates.
const writeGrain = 64 << 10

// worker owns one buffer and uses one source and one target connection.
type worker struct {
	src, dst *nbd.Handle // dst nil when only computing the digest
	lane     int
	buf      *nbd.Buffer
	zeros    *nbd.Buffer // shared zero source when the target cannot zero (never written)
	allZero  []bool      // per piece of the current chunk: all zero
}

func (r *run) startWorkers() ([]*worker, error) {
	var zeros *nbd.Buffer
	if len(r.conns.dst) > 0 && !r.conns.targetZero {
		b, err := nbd.NewBuffer(int(r.opts.RequestSize))
		if err != nil {
			return nil, err
		}
		zeros = b
		r.conns.afterClose(zeros.Free)
	}
	// Two workers per connection, one per lane: while one waits for its write, the other
	// reads and hashes, so the target is never idle for the source's latency (handles
	// serialise the two).
	workers := make([]*worker, workersPerConnection*r.opts.Connections)
	for i := range workers {
		buf, err := nbd.NewBuffer(int(r.opts.RequestSize))
		if err != nil {
			return nil, err
		}
		r.conns.afterClose(buf.Free)
		w := &worker{src: r.conns.src[i%len(r.conns.src)], buf: buf, zeros: zeros, lane: i / len(r.conns.src) % 2}
		if len(r.conns.dst) > 0 {
			w.dst = r.conns.dst[i%len(r.conns.dst)]
		}
		workers[i] = w
	}
	return workers, nil
}

// loop works until the queue is drained. After a failure or a cancel (ctx) it only drains:
// up to aheadWindow is queued, so finishing it would delay the stop; commands already in
// flight complete, so the target stays consistent and the final flush covers them.
func (w *worker) loop(ctx context.Context, r *run) {
	for {
		seq, ok := r.work.take(w.lane)
		if !ok {
			return
		}
		if r.actx.Err() != nil {
			continue
		}
		if ctx.Err() != nil {
			r.cancelled.Store(true)
			continue
		}
		s := &r.slots[seq%int64(len(r.slots))]
		var (
			wrote bool
			err   error
		)
		switch s.c.kind {
		case kindData:
			wrote, err = w.copyData(r, s)
		case kindZero:
			err = w.zero(r, s.c.off, s.c.n)
		}
		if err != nil {
			r.abort(err)
			continue
		}
		r.work.finished(w.lane, seq, wrote)
		r.nDone.Add(s.c.n)
		r.finished <- seq
	}
}

// copyData reads a chunk, writes its data pieces and zeroes its all-zero ones, and hashes
// the pieces; wrote says whether any piece held data. The hashing runs while the target
// writes: a write mostly waits for the target's disk, so on two cores the digest then
// costs little time.
func (w *worker) copyData(r *run, s *slot) (wrote bool, err error) {
	off, n := s.c.off, s.c.n
	data := w.buf.Bytes()[:n]
	if err := w.read(r, off, n, s.c.holes, data); err != nil {
		return false, err
	}
	end := off + n
	w.allZero = w.allZero[:0]
	for p := off; p < end; {
		pe := pieceEnd(p, end, r.opts.BlockSize)
		zero := isZero(data[p-off : pe-off])
		w.allZero = append(w.allZero, zero)
		wrote = wrote || !zero
		p = pe
	}
	var hashing sync.WaitGroup
	if !r.opts.SkipDigest {
		hashing.Go(func() { w.hash(r, s, data) })
	}
	defer hashing.Wait() // the buffer and the slot stay the chunk's until hashed
	// Zeros are not sent as data at a finer grain than the digest's pieces: a piece with
	// 128 KiB of data in 1 MiB would otherwise write (and allocate) the whole MiB.
	runStart, runZero := off, w.allZero[0]
	for i, p := 0, off; p < end; i++ {
		pe := pieceEnd(p, end, r.opts.BlockSize)
		for g := p; g < pe; {
			ge := min(pe, (g/writeGrain+1)*writeGrain)
			zero := w.allZero[i] || isZero(data[g-off:ge-off])
			if zero != runZero && g > runStart {
				if err := w.write(r, off, runStart, g, runZero); err != nil {
					return wrote, err
				}
				runStart = g
			}
			runZero = zero
			g = ge
		}
		p = pe
	}
	return wrote, w.write(r, off, runStart, end, runZero)
}

// read fills data with the chunk at off: the source's holes in it as zeros, the rest read.
func (w *worker) read(r *run, off, n int64, holes []Extent, data []byte) error {
	at := off
	for i := 0; i <= len(holes); i++ {
		h := Extent{Start: off + n} // after the last hole: the rest of the chunk
		if i < len(holes) {
			h = holes[i]
		}
		if h.Start > at {
			if err := w.src.Pread(r.actx, w.buf, int(at-off), int(h.Start-at), at); err != nil {
				return &SourceError{Err: fmt.Errorf("read source at %d+%d: %w", at, h.Start-at, err)}
			}
			r.nRead.Add(h.Start - at)
		}
		clear(data[h.Start-off : h.End()-off])
		at = h.End()
	}
	return nil
}

// hash sets the slot's piece hashes from the chunk's data and the zero map.
func (w *worker) hash(r *run, s *slot, data []byte) {
	off, end := s.c.off, s.c.off+s.c.n
	s.hashes = s.hashes[:0]
	for i, p := 0, off; p < end; i++ {
		pe := pieceEnd(p, end, r.opts.BlockSize)
		if w.allZero[i] {
			s.hashes = append(s.hashes, r.zh.sum(pe-p))
		} else {
			s.hashes = append(s.hashes, sha256.Sum256(data[p-off:pe-off]))
		}
		p = pe
	}
}

// write sends [from, to) of the chunk at base as data or as a zero request.
func (w *worker) write(r *run, base, from, to int64, zero bool) error {
	switch {
	case w.dst == nil:
		return nil
	case zero && r.opts.DestinationIsZero:
		return nil
	case zero:
		return w.zero(r, from, to-from)
	}
	if err := r.pace(r.tctx, to-from); err != nil {
		return fmt.Errorf("write target at %d+%d: %w", from, to-from, err)
	}
	if err := w.dst.Pwrite(r.actx, w.buf, int(from-base), int(to-from), from, 0); err != nil {
		return fmt.Errorf("write target at %d+%d: %w", from, to-from, err)
	}
	r.nWritten.Add(to - from)
	return nil
}

func (w *worker) zero(r *run, off, n int64) error {
	if w.zeros == nil {
		if err := w.dst.Zero(r.actx, n, off, 0); err != nil {
			return fmt.Errorf("zero target at %d+%d: %w", off, n, err)
		}
		r.nZeroed.Add(n)
		return nil
	}
	for done := int64(0); done < n; {
		l := min(n-done, int64(w.zeros.Len()))
		if err := w.dst.Pwrite(r.actx, w.zeros, 0, int(l), off+done, 0); err != nil {
			return fmt.Errorf("write zeros to target at %d+%d: %w", off+done, l, err)
		}
		done += l
	}
	r.nZeroed.Add(n)
	return nil
}
