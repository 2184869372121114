package limits_test

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/diskferry/diskferry/internal/limits"
)

// A token bucket refuses at once a wait it cannot finish before the context's deadline, so
// these tests check the bucket's arithmetic without measuring time: at 1 MB/s, 10 MB cannot
// pass within one second, whatever the machine's load.
func TestLimitHoldsBytesBeyondItsRate(t *testing.T) {
	l := limits.NewLimit(1_000_000)
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	err := l.WaitN(ctx, 10_000_000)
	if err == nil || !strings.Contains(err.Error(), "8Mbit/s") {
		t.Fatalf("WaitN(10 MB) at 1 MB/s within 1 s = %v, want a refusal naming the limit", err)
	}
}

// At 1 Mbit/s (125 kB/s) a full bucket holds 1 MiB; after that 1 MB more needs 8 s.
func TestLimitLetsBurstThroughThenPaces(t *testing.T) {
	l := limits.NewLimit(limits.MinRate)
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	if err := l.WaitN(ctx, 1<<20); err != nil {
		t.Fatalf("a full bucket refused its burst: %v", err)
	}
	if err := l.WaitN(ctx, 1_000_000); err == nil {
		t.Fatal("an emptied bucket let 1 MB through within a second at 125 kB/s")
	}
}

func TestPacerStricterLimitWins(t *testing.T) {
	job, site := limits.NewLimit(1_000_000), limits.NewLimit(100_000_000)
	p := limits.Pacer{job, site}
	if got := p.BytesPerSec(); got != 1_000_000 {
		t.Fatalf("effective rate %d, want the job's 1000000", got)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	err := p.WaitN(ctx, 3_000_000)
	if err == nil || !strings.Contains(err.Error(), "8Mbit/s") {
		t.Fatalf("3 MB under a 1 MB/s job limit within 1 s = %v, want the job's limit to refuse", err)
	}

	p = limits.Pacer{limits.NewLimit(100_000_000), limits.NewLimit(1_000_000)}
	ctx, cancel = context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	err = p.WaitN(ctx, 3_000_000)
	if err == nil || !strings.Contains(err.Error(), "8Mbit/s") {
		t.Fatalf("3 MB under a 1 MB/s site limit within 1 s = %v, want the site's limit to refuse", err)
	}
	if got := (limits.Pacer{}).BytesPerSec(); got != 0 {
		t.Fatalf("no limits: effective rate %d, want 0 (unlimited)", got)
	}
}

// Two copies of one job share one bucket: what one takes, the other cannot.
func TestJobsShareOneLimitPerKey(t *testing.T) {
	var jobs limits.Jobs
	a, releaseA := jobs.Acquire("wf-1", limits.MinRate)
	b, releaseB := jobs.Acquire("wf-1", limits.MinRate)
	other, releaseOther := jobs.Acquire("wf-2", limits.MinRate)
	if a != b {
		t.Fatal("two copies of one job got different limits")
	}
	if a == other {
		t.Fatal("two jobs share one limit")
	}
	// As above: 1 MiB is a full bucket at 125 kB/s, 1 MB more needs 8 s.
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	if err := a.WaitN(ctx, 1<<20); err != nil {
		t.Fatalf("first copy's burst: %v", err)
	}
	if err := b.WaitN(ctx, 1_000_000); err == nil {
		t.Fatal("the job's second copy got 1 MB within a second although the first had emptied their bucket")
	}
	if err := other.WaitN(ctx, 1<<20); err != nil {
		t.Fatalf("another job's copy was held by this job's limit: %v", err)
	}
	if jobs.Len() != 2 {
		t.Fatalf("%d jobs hold limits, want 2", jobs.Len())
	}
	releaseA()
	releaseA() // a second call must not free the other copy's hold
	if jobs.Len() != 2 {
		t.Fatalf("after one of two copies released: %d jobs, want 2", jobs.Len())
	}
	releaseB()
	releaseOther()
	if jobs.Len() != 0 {
		t.Fatalf("after every copy released: %d jobs still hold limits", jobs.Len())
	}
}

func TestJobsTakeTheNewestRate(t *testing.T) {
	var jobs limits.Jobs
	first, release1 := jobs.Acquire("wf", 1_000_000)
	defer release1()
	second, release2 := jobs.Acquire("wf", 2_000_000)
	defer release2()
	if first != second || second.BytesPerSec() != 2_000_000 {
		t.Fatalf("rate %d (same limit: %v), want the job's newest 2000000 on its one limit", second.BytesPerSec(), first == second)
	}
}

// A job's copies read its limit's rate (to log it, to name it in an error) while another copy
// of the job acquires it at a new rate and others release it; under -race any unguarded
// access fails here. Every copy sees one of the rates asked for, and the last release
// forgets the job.
func TestJobsRateChangesWhileCopiesUseIt(t *testing.T) {
	var jobs limits.Jobs
	rates := []int64{1_000_000, 2_000_000}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for range 200 {
				limit, release := jobs.Acquire("wf", rates[i%2])
				if got := (limits.Pacer{limit}).BytesPerSec(); !slices.Contains(rates, got) {
					t.Errorf("rate %d, want one of %v", got, rates)
				}
				ctx, cancel := context.WithCancel(t.Context())
				cancel()
				if err := limit.WaitN(ctx, 2<<20); err == nil {
					t.Error("a wait on a cancelled context succeeded")
				}
				release()
			}
		})
	}
	wg.Wait()
	if jobs.Len() != 0 {
		t.Fatalf("%d jobs hold limits after every copy released, want 0", jobs.Len())
	}
}
