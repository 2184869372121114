package limits

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"golang.org/x/time/rate"
)

// burst is the most a limit lets through at once after an idle spell, and the piece size a
// wait is cut into. Tokens that come while every copy is busy sending are kept up to it, so
// a copy that stalled briefly on the network catches up; 1 MiB is under a fifth of a second
// at 50 Mbit and a few percent of a minute at 1 Mbit (MinRate), and less than one request.
const burst = 1 << 20

// Limit is a token bucket of bytes per second, safe for concurrent use: every copy that
// waits on the same Limit shares its rate.
type Limit struct {
	// bytesPerSec is the rate the bucket was last set to, for logs and errors; atomic, as a
	// job's limit changes rate (Jobs.Acquire) while its other copies read it.
	bytesPerSec atomic.Int64
	bucket      *rate.Limiter
}

// NewLimit returns a limit of bytesPerSec (> 0).
func NewLimit(bytesPerSec int64) *Limit {
	l := &Limit{bucket: rate.NewLimiter(rate.Limit(bytesPerSec), burst)}
	l.bytesPerSec.Store(bytesPerSec)
	return l
}

// BytesPerSec is the limit's rate.
func (l *Limit) BytesPerSec() int64 { return l.bytesPerSec.Load() }

// WaitN returns once n more bytes may go, or with ctx's error (the bytes not yet waited
// for are given back to the bucket).
func (l *Limit) WaitN(ctx context.Context, n int) error {
	for n > 0 {
		piece := min(n, burst)
		if err := l.bucket.WaitN(ctx, piece); err != nil {
			return fmt.Errorf("wait for bandwidth (%s): %w", FormatRate(l.BytesPerSec()), err)
		}
		n -= piece
	}
	return nil
}

// Pacer waits on each of its limits in turn, so the strictest one sets the pace. Order
// them narrowest first (the job's, then the site's): a copy held back by its job's limit
// then takes no tokens from the site's bucket that other jobs could use meanwhile.
type Pacer []*Limit

// WaitN returns once n more bytes may go under every limit.
func (p Pacer) WaitN(ctx context.Context, n int) error {
	for _, l := range p {
		if err := l.WaitN(ctx, n); err != nil {
			return err
		}
	}
	return nil
}

// BytesPerSec is the effective rate: the strictest limit's, 0 without any.
func (p Pacer) BytesPerSec() int64 {
	var eff int64
	for _, l := range p {
		if r := l.BytesPerSec(); eff == 0 || r < eff {
			eff = r
		}
	}
	return eff
}

// Jobs hands out one Limit per job key (a workflow ID), shared by that job's concurrent
// copies on this SNA, and forgets it when the last of them releases it.
type Jobs struct {
	mu   sync.Mutex
	jobs map[string]*jobLimit
}

type jobLimit struct {
	limit *Limit
	users int
}

// Acquire returns the job's limit at bytesPerSec (a job asking again with another rate gets
// the new rate for all its copies) and the release to call once the copy ends; release may
// be called more than once.
func (j *Jobs) Acquire(key string, bytesPerSec int64) (*Limit, func()) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.jobs == nil {
		j.jobs = make(map[string]*jobLimit)
	}
	e, ok := j.jobs[key]
	if !ok {
		e = &jobLimit{limit: NewLimit(bytesPerSec)}
		j.jobs[key] = e
	} else if e.limit.BytesPerSec() != bytesPerSec {
		// Under j.mu, so the bucket's rate and the one recorded change together.
		e.limit.bucket.SetLimit(rate.Limit(bytesPerSec))
		e.limit.bytesPerSec.Store(bytesPerSec)
	}
	e.users++
	var once sync.Once
	return e.limit, func() {
		once.Do(func() {
			j.mu.Lock()
			defer j.mu.Unlock()
			if e.users--; e.users == 0 {
				delete(j.jobs, key)
			}
		})
	}
}

// Len is how many jobs hold a limit now.
func (j *Jobs) Len() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.jobs)
}
