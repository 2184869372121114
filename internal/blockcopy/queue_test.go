package blockcopy

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func pushed(n int) *queue {
	q := newQueue(n)
	for i := range n {
		q.push(int64(i))
	}
	return q
}

func take(t *testing.T, q *queue, lane int) int64 {
	t.Helper()
	seq, ok := q.take(lane)
	require.True(t, ok)
	return seq
}

func TestQueueLanes(t *testing.T) {
	q := pushed(200)
	assert.Equal(t, int64(0), take(t, q, laneFront), "the front lane takes the oldest")
	assert.Equal(t, int64(100), take(t, q, laneAhead), "the ahead lane starts halfway up")
	assert.Equal(t, int64(101), take(t, q, laneAhead), "and goes on in order")
	assert.Equal(t, int64(1), take(t, q, laneFront))

	// Both lanes last wrote data: the ahead lane skips to find zeros instead.
	q.finished(laneFront, 0, true)
	q.finished(laneAhead, 101, true)
	assert.Equal(t, int64(102+aheadStride), take(t, q, laneAhead))
	// A late report from before the jump says nothing about the new region.
	q.finished(laneAhead, 101, true)
	assert.Equal(t, int64(103+aheadStride), take(t, q, laneAhead))
	// One lane on data, the other on zeros: both stay where they are.
	q.finished(laneAhead, 102+aheadStride, false)
	assert.Equal(t, int64(104+aheadStride), take(t, q, laneAhead))
	assert.Equal(t, int64(2), take(t, q, laneFront))
	// Both in zeros: the ahead lane skips to look for data.
	q.finished(laneFront, 2, false)
	assert.Equal(t, int64(105+2*aheadStride), take(t, q, laneAhead))
}

func TestQueueAheadRestartsWhenCaughtUp(t *testing.T) {
	q := pushed(10)
	assert.Equal(t, int64(5), take(t, q, laneAhead))
	for want := range int64(5) {
		assert.Equal(t, want, take(t, q, laneFront))
	}
	// Pending is 6..9, none below the ahead lane's next: the front lane caught up.
	assert.Equal(t, int64(8), take(t, q, laneAhead), "restarted halfway up what is pending")
	assert.Equal(t, int64(9), take(t, q, laneAhead))
	// Past the top of what is pending: back halfway up the rest (6, 7).
	assert.Equal(t, int64(7), take(t, q, laneAhead))
}

func TestQueueCloseAndWait(t *testing.T) {
	q := newQueue(4)
	got := make(chan int64)
	go func() {
		seq, ok := q.take(laneAhead)
		if ok {
			got <- seq
		}
		close(got)
	}()
	select {
	case <-got:
		t.Fatal("take returned from an empty queue")
	case <-time.After(20 * time.Millisecond):
	}
	q.push(0)
	assert.Equal(t, int64(0), <-got)
	q.close()
	_, ok := q.take(laneFront)
	assert.False(t, ok, "closed and empty")
}

// Every chunk is taken exactly once, whatever the lanes do.
func TestQueueTakesEachOnce(t *testing.T) {
	const n = 5000
	q := newQueue(n)
	var mu sync.Mutex
	seen := make(map[int64]int)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for {
				seq, ok := q.take(i % 2)
				if !ok {
					return
				}
				q.finished(i%2, seq, seq%3 == 0)
				mu.Lock()
				seen[seq]++
				mu.Unlock()
			}
		})
	}
	for i := range n {
		q.push(int64(i))
	}
	q.close()
	wg.Wait()
	require.Len(t, seen, n)
	for seq, c := range seen {
		require.Equal(t, 1, c, "chunk %d", seq)
	}
}
