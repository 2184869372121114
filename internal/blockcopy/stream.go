package blockcopy

import (
	"cmp"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/diskferry/diskferry/internal/nbd"
)

// Stream copies the whole source, in offset order, into w: for a target that takes one
// sequential byte stream, such as a datastore's HTTP PUT of a flat file. Several
// connections read ahead; holes are not read but written to w as zeros. The Result's
// digest is the one ComputeDigest reports for the whole source with the same BlockSize.
//
// Connections, RequestSize, MaxRequestSize, BlockSize, timeouts, OnProgress, Logger and
// Throttle apply; Areas, Resume, DestinationIsZero and OnBlock do not (a stream has no random
// access, so an interrupted stream starts over). The Throttle is asked for every byte written
// to w, the zeros of holes too: they cross the wire like data.
func Stream(ctx context.Context, src string, w io.Writer, opts Options) (*Result, error) {
	if src == "" || w == nil {
		return nil, errors.New("blockcopy: stream needs a source URI and a writer")
	}
	if opts.Areas != nil || opts.Resume != nil || opts.OnBlock != nil || opts.SkipDigest {
		return nil, errors.New("blockcopy: a stream copies the whole disk with its digest; areas, resume, block hashes and SkipDigest do not apply")
	}
	c, err := newCopy(src, "", opts)
	if err != nil {
		return nil, err
	}
	return c.stream(ctx, w)
}

// streamChunk is one read-ahead request; done carries its read's outcome.
type streamChunk struct {
	off, n int64
	hole   bool
	buf    *nbd.Buffer
	sums   [][32]byte
	done   chan error
}

func (c *Copy) stream(ctx context.Context, w io.Writer) (*Result, error) {
	start := time.Now()
	conns, err := connect(ctx, c.src, "", c.opts)
	if err != nil {
		return nil, err
	}
	defer conns.close()
	size := conns.size
	c.nTotal.Store(size)

	// Two chunks in flight per connection keep each one busy while the writer drains.
	depth := 2 * len(conns.src)
	bufs := make(chan *nbd.Buffer, depth)
	for range depth {
		b, err := nbd.NewBuffer(int(c.opts.RequestSize))
		if err != nil {
			return nil, err
		}
		// Freed after the handles close: a handle cut off mid-read may still hold it.
		conns.afterClose(b.Free)
		bufs <- b
	}
	zh := newZeroHasher(c.opts.BlockSize)
	rctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	jobs := make(chan *streamChunk)
	ordered := make(chan *streamChunk, depth)
	var readers sync.WaitGroup
	for _, h := range conns.src {
		readers.Go(func() {
			for ch := range jobs {
				ch.done <- c.readChunk(rctx, h, zh, ch)
			}
		})
	}
	r := &run{Copy: c, conns: conns, zh: zh, actx: rctx}
	var producerErr error
	var producer sync.WaitGroup
	producer.Go(func() {
		defer close(ordered)
		defer close(jobs)
		producerErr = r.streamChunks(rctx, size, func(ch *streamChunk) bool {
			if !ch.hole {
				select {
				case ch.buf = <-bufs:
				case <-rctx.Done():
					return false
				}
			}
			ch.done = make(chan error, 1)
			select {
			case ordered <- ch:
			case <-rctx.Done():
				return false
			}
			if ch.hole {
				ch.done <- nil
				return true
			}
			select {
			case jobs <- ch:
				return true
			case <-rctx.Done():
				ch.done <- context.Cause(rctx)
				return false
			}
		})
	})

	stopProgress := c.reportProgress()
	dg, err := newDigest(nil)
	if err != nil {
		return nil, err
	}
	var writeErr error
	zeros := zh.zero
	for ch := range ordered {
		if writeErr == nil {
			writeErr = c.emit(rctx, w, ch, <-ch.done, zeros, zh, dg)
			if writeErr != nil {
				cancel(writeErr)
			}
		} else {
			<-ch.done
		}
		if ch.buf != nil {
			bufs <- ch.buf
		}
	}
	producer.Wait()
	readers.Wait()
	stopProgress()

	res := &Result{Size: size, BytesRead: c.nRead.Load(), BytesWritten: c.nWritten.Load(), BytesZeroed: c.nZeroed.Load(),
		BytesDone: c.nDone.Load(), BytesTotal: size, Duration: time.Since(start), BlockSize: c.opts.BlockSize}
	if err := cmp.Or(writeErr, producerErr); err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("stream cancelled: %w", context.Cause(ctx))
		}
		return res, err
	}
	res.Digest = dg.hex()
	c.log.Info("stream finished", "size", size, "bytesRead", res.BytesRead, "duration", res.Duration)
	return res, nil
}

// streamChunks cuts [0, size) into request-size chunks, whole holes marked as such, and
// hands them to next in order; next returns false once the stream is aborted.
func (r *run) streamChunks(ctx context.Context, size int64, next func(*streamChunk) bool) error {
	bs := r.opts.BlockSize
	for ws := int64(0); ws < size; {
		we := min(size, (ws+blockStatusWindow)/bs*bs)
		ext, err := r.extents(ctx, ws, we)
		if err != nil {
			return err
		}
		err = r.cut(ws, we, ext, func(ch chunk) error {
			// cut joins holes up to maxZeroRequest; a stream writes them from one
			// block-sized zero buffer, so their size does not matter.
			if !next(&streamChunk{off: ch.off, n: ch.n, hole: ch.kind != kindData}) {
				return context.Cause(ctx)
			}
			return nil
		})
		if err != nil {
			return err
		}
		ws = we
	}
	return nil
}

// readChunk reads a data chunk and hashes its pieces.
func (c *Copy) readChunk(ctx context.Context, h *nbd.Handle, zh *zeroHasher, ch *streamChunk) error {
	if err := h.Pread(ctx, ch.buf, 0, int(ch.n), ch.off); err != nil {
		return &SourceError{Err: fmt.Errorf("read source at %d+%d: %w", ch.off, ch.n, err)}
	}
	c.nRead.Add(ch.n)
	data := ch.buf.Bytes()[:ch.n]
	ch.sums = ch.sums[:0]
	for p := ch.off; p < ch.off+ch.n; {
		pe := pieceEnd(p, ch.off+ch.n, c.opts.BlockSize)
		piece := data[p-ch.off : pe-ch.off]
		if isZero(piece) {
			ch.sums = append(ch.sums, zh.sum(pe-p))
		} else {
			ch.sums = append(ch.sums, sha256.Sum256(piece))
		}
		p = pe
	}
	return nil
}

// emit writes a chunk to w and folds its pieces into the digest.
// A cancel stops it between pieces: a hole chunk may be a GiB of zeros.
func (c *Copy) emit(ctx context.Context, w io.Writer, ch *streamChunk, readErr error, zeros []byte, zh *zeroHasher, dg *digest) error {
	if readErr != nil {
		return readErr
	}
	if err := context.Cause(ctx); err != nil {
		return err
	}
	if !ch.hole {
		if err := c.pace(ctx, ch.n); err != nil {
			return err
		}
		if _, err := w.Write(ch.buf.Bytes()[:ch.n]); err != nil {
			return fmt.Errorf("write stream at %d+%d: %w", ch.off, ch.n, err)
		}
		for i := range ch.sums {
			dg.fold(&ch.sums[i])
		}
		c.nWritten.Add(ch.n)
		c.nDone.Add(ch.n)
		return nil
	}
	for p := ch.off; p < ch.off+ch.n; {
		if err := context.Cause(ctx); err != nil {
			return err
		}
		pe := pieceEnd(p, ch.off+ch.n, c.opts.BlockSize)
		if err := c.pace(ctx, pe-p); err != nil {
			return err
		}
		if _, err := w.Write(zeros[:pe-p]); err != nil {
			return fmt.Errorf("write stream at %d+%d: %w", p, pe-p, err)
		}
		sum := zh.sum(pe - p)
		dg.fold(&sum)
		c.nZeroed.Add(pe - p)
		c.nDone.Add(pe - p)
		p = pe
	}
	return nil
}
