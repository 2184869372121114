// Package blockcopy copies a source NBD export to a target NBD export: the source's
// allocated extents (or given changed areas) are cut into chunks and spread over several
// connections; holes and all-zero chunks become zero requests. It reports progress,
// a resumable checkpoint (offset below which the target is written and flushed) and a
// digest of the copied areas that the hub can recompute from the target.
package blockcopy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/diskferry/diskferry/internal/nbd"
)

// Defaults and limits.
const (
	// DefaultConnections: scripts/bench.sh, zeros case (4 GiB read, 1 GiB written), took
	// 2.27 s with 2 connections, 1.99 s with 4 and 2.18 s with 8 (more buffers); the copy
	// is CPU-bound on 2 cores, so more requests in flight buy nothing.
	DefaultConnections = 4
	// DefaultRequestSize: scripts/bench.sh's sparse case, bound by the target's disk, took
	// 1.06–1.13 s with 2 MiB requests, 1.18–1.23 s with 1 MiB and 1.21–1.33 s with 4 MiB;
	// the zeros and dense cases and copies with the digest were the same with 1 and 2 MiB.
	// qemu-nbd spent 0.72 CPU-s per GiB written with 1 MiB, 1.3 s with nbdcopy's 256 KiB
	// and 1.5 s with 4 MiB. 2 MiB is also the most vCenter serves (VCenterMaxRequestSize).
	DefaultRequestSize = 2 << 20
	DefaultBlockSize   = 1 << 20
	// VCenterMaxRequestSize is the largest read vCenter's NFC serves reliably.
	VCenterMaxRequestSize = 2 << 20

	maxZeroRequest    = 1 << 30 // NBD lengths are 32-bit
	blockStatusWindow = 1 << 30 // block status is fetched lazily, this much at a time
	// aheadWindow is how far the ahead lane may get beyond the checkpoint (see queue.go);
	// it also bounds Checkpoint.Ahead: at 1 MiB pieces, 512 hashes (16 KiB) at most.
	aheadWindow        = 512 << 20
	defaultTimeout     = 60 * time.Second
	defaultCheckpoint  = 10 * time.Second
	defaultProgress    = time.Second
	finalFlushDeadline = 30 * time.Second
)

// Options tune a copy. Zero values take the defaults.
type Options struct {
	// Connections per side; a side that does not offer multi-conn gets one.
	Connections int
	// RequestSize of reads and writes; a multiple of BlockSize.
	RequestSize int64
	// MaxRequestSize caps RequestSize (VCenterMaxRequestSize for vCenter sources); 0: no cap.
	MaxRequestSize int64
	// BlockSize splits the areas into digest pieces.
	BlockSize int64
	// Areas to copy; nil copies the whole disk (the source's allocated extents).
	Areas []Extent
	// DestinationIsZero skips zero requests: the target is known to read as zeros.
	DestinationIsZero bool
	// SkipDigest leaves out the per-block SHA-256 (Result.Digest stays empty, checkpoints
	// carry no digest state): for copies nobody verifies later. The zero value hashes,
	// because backups need the digest.
	SkipDigest bool
	// Resume continues an interrupted copy of the same areas after its checkpoint.
	Resume *Checkpoint
	// CheckpointInterval is how often the target is flushed to advance the checkpoint.
	CheckpointInterval time.Duration
	// CommandTimeout bounds each NBD command, so a hung server fails the copy.
	CommandTimeout time.Duration
	// ConnectTimeout bounds each connection's handshake.
	ConnectTimeout time.Duration
	// OnBlock, when set, receives the hash of every piece of the areas in offset order (a
	// manifest: ManifestWriter.Add), from one goroutine; an error fails the copy. It needs
	// the digest (not SkipDigest). After a Resume it starts at the checkpoint.
	OnBlock func(BlockHash) error
	// Throttle, when set, paces the data writes: a bandwidth limit (see Throttle).
	Throttle Throttle
	// OnProgress, when set, is called every ProgressInterval and once at the end.
	OnProgress       func(Progress)
	ProgressInterval time.Duration
	Logger           *slog.Logger
}

// Checkpoint says where an interrupted copy resumes.
type Checkpoint struct {
	// Offset: every area byte below it is written and flushed on the target.
	Offset int64 `json:"offset"`
	// DigestState is the marshalled SHA-256 state over the pieces below Offset.
	DigestState []byte `json:"digestState,omitempty"`
	// BytesDone is the progress the interrupted attempt had reported (for BytesRecopied).
	BytesDone int64 `json:"bytesDone"`
	// Ahead are finished stretches beyond Offset, ascending; a resume skips them.
	Ahead []Finished `json:"ahead,omitempty"`
}

// Progress is a snapshot of a running copy.
type Progress struct {
	Checkpoint   Checkpoint
	BytesDone    int64 // area bytes finished (holes included)
	BytesTotal   int64 // area bytes to do
	BytesRead    int64
	BytesWritten int64
	BytesZeroed  int64
}

// Result describes a finished (or interrupted) copy.
type Result struct {
	Size          int64 // source size
	BytesRead     int64
	BytesWritten  int64
	BytesZeroed   int64
	BytesDone     int64
	BytesTotal    int64
	BytesRecopied int64 // redone after a resume
	Duration      time.Duration
	BlockSize     int64
	Digest        string   // hex SHA-256; set only when the copy completed
	Areas         []Extent // the areas copied; nil for a full copy
	Checkpoint    Checkpoint
}

// Copy is one copy job; its counters can be read while Run works.
type Copy struct {
	src, dst string // dst "" only computes the digest
	opts     Options
	log      *slog.Logger

	nRead, nWritten, nZeroed, nDone, nTotal atomic.Int64
	checkpoint                              atomic.Pointer[Checkpoint]
}

// New checks the options and prepares a copy from src to dst (NBD URIs).
func New(src, dst string, opts Options) (*Copy, error) {
	if src == "" || dst == "" {
		return nil, errors.New("blockcopy: source and target URIs are required")
	}
	return newCopy(src, dst, opts)
}

func newCopy(src, dst string, opts Options) (*Copy, error) {
	if opts.Connections <= 0 {
		opts.Connections = DefaultConnections
	}
	if opts.BlockSize <= 0 {
		opts.BlockSize = DefaultBlockSize
	}
	if opts.RequestSize <= 0 {
		opts.RequestSize = max(DefaultRequestSize, opts.BlockSize)
	}
	if opts.MaxRequestSize > 0 && opts.RequestSize > opts.MaxRequestSize {
		opts.RequestSize = opts.MaxRequestSize
	}
	if opts.RequestSize < opts.BlockSize || opts.RequestSize%opts.BlockSize != 0 {
		return nil, fmt.Errorf("blockcopy: request size %d must be a multiple of the block size %d", opts.RequestSize, opts.BlockSize)
	}
	if opts.RequestSize > 32<<20 {
		return nil, fmt.Errorf("blockcopy: request size %d above the NBD limit of 32 MiB", opts.RequestSize)
	}
	if opts.OnBlock != nil && opts.SkipDigest {
		return nil, errors.New("blockcopy: block hashes (OnBlock) need the digest, but SkipDigest is set")
	}
	if opts.CommandTimeout <= 0 {
		opts.CommandTimeout = defaultTimeout
	}
	if opts.CheckpointInterval <= 0 {
		opts.CheckpointInterval = defaultCheckpoint
	}
	if opts.ProgressInterval <= 0 {
		opts.ProgressInterval = defaultProgress
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Copy{src: src, dst: dst, opts: opts, log: log}
	c.checkpoint.Store(&Checkpoint{})
	return c, nil
}

// Progress returns the current counters; safe from any goroutine.
func (c *Copy) Progress() Progress {
	return Progress{
		Checkpoint:   *c.checkpoint.Load(),
		BytesDone:    c.nDone.Load(),
		BytesTotal:   c.nTotal.Load(),
		BytesRead:    c.nRead.Load(),
		BytesWritten: c.nWritten.Load(),
		BytesZeroed:  c.nZeroed.Load(),
	}
}

// ComputeDigest reads uri over the given areas (nil: the whole disk) and returns the digest
// a copy of those areas reports, reading only allocated extents (holes hash as zeros).
// opts.Areas, BlockSize, Connections, RequestSize and timeouts apply.
func ComputeDigest(ctx context.Context, uri string, opts Options) (string, error) {
	if uri == "" {
		return "", errors.New("blockcopy: URI is required")
	}
	opts.Resume = nil
	opts.SkipDigest = false
	c, err := newCopy(uri, "", opts)
	if err != nil {
		return "", err
	}
	res, err := c.Run(ctx)
	if err != nil {
		return "", err
	}
	return res.Digest, nil
}

// chunk kinds.
const (
	kindData = iota // read, then written (or zeroed where all zero)
	kindZero        // a zero request, no read
	kindSkip        // nothing to do (target already zero); only hashed
	kindDone        // finished before a resume; its sums come from the checkpoint
)

type chunk struct {
	off, n int64
	kind   int
	sums   []byte   // kindDone: the pieces' SHA-256, 32 bytes each
	holes  []Extent // kindData: stretches the source reports as zeros, not read
}

// slot holds one in-flight chunk; slots are reused round robin by sequence number.
type slot struct {
	c      chunk
	hashes [][32]byte // piece hashes of a data chunk
}

// run is the shared state of one Run.
type run struct {
	*Copy
	conns    *connections
	zh       *zeroHasher
	slots    []slot
	tokens   chan struct{} // free slots
	work     *queue        // sequence numbers for workers
	finished chan int64    // finished sequence numbers for the committer
	abort    context.CancelCauseFunc
	// cancelled: a worker left a chunk undone because the caller cancelled.
	cancelled atomic.Bool
	actx      context.Context // cancelled on the first error
	tctx      context.Context // a throttle's wait: ends with actx or the caller's cancel
}

// Run copies. On failure or cancel once the copy has started it returns the error together
// with a Result whose Checkpoint says where to resume; when it could not start (connect,
// bad areas or resume point) the Result is nil.
func (c *Copy) Run(ctx context.Context) (*Result, error) {
	start := time.Now()
	conns, err := connect(ctx, c.src, c.dst, c.opts)
	if err != nil {
		return nil, err
	}
	defer conns.close()

	areas, err := normalizeAreas(c.opts.Areas, conns.size)
	if err != nil {
		return nil, fmt.Errorf("blockcopy: %w", err)
	}
	resume := Checkpoint{}
	if c.opts.Resume != nil {
		resume = *c.opts.Resume
	}
	if resume.Offset < 0 || resume.Offset > conns.size {
		return nil, fmt.Errorf("blockcopy: resume offset %d outside the disk of %d bytes", resume.Offset, conns.size)
	}
	if err := checkAhead(resume.Ahead, resume.Offset, areas, c.opts.BlockSize, !c.opts.SkipDigest); err != nil {
		return nil, fmt.Errorf("blockcopy: resume: %w", err)
	}
	doneBelow := bytesBelow(areas, resume.Offset)
	if doneBelow > 0 && len(resume.DigestState) == 0 && !c.opts.SkipDigest {
		return nil, errors.New("blockcopy: resuming after offset 0 needs the digest state of the checkpoint")
	}
	doneBefore := doneBelow + finishedBytes(resume.Ahead)
	var dg *digest
	if !c.opts.SkipDigest {
		if dg, err = newDigest(resume.DigestState); err != nil {
			return nil, fmt.Errorf("blockcopy: %w", err)
		}
	}
	c.nTotal.Store(totalBytes(areas))
	c.nDone.Store(doneBefore)
	c.checkpoint.Store(&Checkpoint{Offset: resume.Offset, DigestState: resume.DigestState, BytesDone: doneBelow, Ahead: resume.Ahead})
	recopied := max(0, resume.BytesDone-doneBefore)

	r := &run{Copy: c, conns: conns, zh: newZeroHasher(c.opts.BlockSize)}
	r.actx, r.abort = context.WithCancelCause(context.Background())
	defer r.abort(nil)
	if c.opts.Throttle != nil {
		var stop func()
		r.tctx, stop = throttleContext(ctx, r.actx)
		defer stop()
	}
	window := max(4*workersPerConnection*c.opts.Connections, int(aheadWindow/c.opts.RequestSize))
	r.slots = make([]slot, window)
	perChunk := int(c.opts.RequestSize/c.opts.BlockSize) + 1
	for i := range r.slots {
		r.slots[i].hashes = make([][32]byte, 0, perChunk)
	}
	r.tokens = make(chan struct{}, window)
	for range window {
		r.tokens <- struct{}{}
	}
	r.work = newQueue(window)
	r.finished = make(chan int64, window)

	c.log.Info("copy starting", "source", nbd.RedactURI(c.src), "target", nbd.RedactURI(c.dst),
		"size", conns.size, "areas", len(areas), "bytesTotal", c.nTotal.Load(), "resumeOffset", resume.Offset,
		"sourceConnections", len(conns.src), "targetConnections", len(conns.dst), "blockStatus", conns.blockStatus,
		"requestSize", c.opts.RequestSize)

	stopProgress := c.reportProgress()
	defer stopProgress()

	workers, err := r.startWorkers()
	if err != nil {
		return nil, err
	}
	var producers sync.WaitGroup
	var dispatchErr error
	producers.Go(func() { dispatchErr = r.dispatch(ctx, clipAreas(areas, resume.Offset), resume.Ahead) })
	for _, w := range workers {
		producers.Go(func() { w.loop(ctx, r) })
	}
	committed := make(chan commitState, 1)
	go func() { committed <- r.commit(dg, resume.Offset, doneBelow) }()
	producers.Wait()
	close(r.finished)
	final := <-committed

	runErr := context.Cause(r.actx)
	if runErr == nil && dispatchErr != nil {
		runErr = dispatchErr
	}
	if runErr == nil && r.cancelled.Load() {
		runErr = fmt.Errorf("copy cancelled: %w", context.Cause(ctx))
	}
	// Flush what completed, also after a cancel or a source failure, so the checkpoint
	// covers it; a dead target fails this flush and the earlier checkpoint stands.
	if err := r.flushTarget(); err == nil {
		c.checkpoint.Store(&Checkpoint{Offset: final.offset, DigestState: final.state, BytesDone: final.done, Ahead: final.ahead})
	} else if runErr == nil {
		runErr = err
	}
	res := &Result{
		Size: conns.size, BytesRead: c.nRead.Load(), BytesWritten: c.nWritten.Load(), BytesZeroed: c.nZeroed.Load(),
		BytesDone: c.nDone.Load(), BytesTotal: c.nTotal.Load(), BytesRecopied: recopied,
		Duration: time.Since(start), BlockSize: c.opts.BlockSize, Checkpoint: *c.checkpoint.Load(),
	}
	if c.opts.Areas != nil {
		res.Areas = areas
	}
	if runErr != nil {
		c.log.Warn("copy stopped", "error", runErr, "checkpoint", res.Checkpoint.Offset, "bytesDone", res.BytesDone)
		return res, runErr
	}
	res.Digest = final.digest
	c.log.Info("copy finished", "bytesRead", res.BytesRead, "bytesWritten", res.BytesWritten,
		"bytesZeroed", res.BytesZeroed, "duration", res.Duration)
	return res, nil
}

// flushTarget makes completed writes durable; a no-op without a target. Any healthy
// connection will do: with several, the target offers multi-conn, so one flush covers all.
func (r *run) flushTarget() error {
	ctx, cancel := context.WithTimeout(context.Background(), finalFlushDeadline)
	defer cancel()
	var errs []error
	for _, h := range r.conns.dst {
		err := h.Flush(ctx)
		if err == nil {
			return nil
		}
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("flush target: %w", errors.Join(errs...))
	}
	return nil
}

// reportProgress calls OnProgress every interval until the returned stop, which also
// makes the last call.
func (c *Copy) reportProgress() func() {
	if c.opts.OnProgress == nil {
		return func() {}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(c.opts.ProgressInterval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				c.opts.OnProgress(c.Progress())
			case <-stop:
				return
			}
		}
	})
	return func() {
		close(stop)
		wg.Wait()
		c.opts.OnProgress(c.Progress())
	}
}

// SourceError is a failed read of the source (the target and the copy itself were fine), so
// a caller can look at the source's server for the real cause.
type SourceError struct{ Err error }

func (e *SourceError) Error() string { return e.Err.Error() }
func (e *SourceError) Unwrap() error { return e.Err }
