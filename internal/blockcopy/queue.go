package blockcopy

import (
	"slices"
	"sync"
)

// Workers serve one of two lanes. The front lane takes the oldest dispatched chunk, so the
// checkpoint advances; the ahead lane works further up the window. A disk mixes regions
// that are bound by the target (data to write) with regions bound by reading (zeros and
// holes the source reports as data): with one in-order stream the copy alternates between
// the two bottlenecks, with two lanes it is usually in both kinds at once. In
// scripts/bench.sh's zeros case (1 GiB of data in 4 regions, 3 GiB of written zeros) a
// quarter of the CPU was idle in order, and the target's disk in every zero region.
const (
	laneFront = iota
	laneAhead
)

// aheadStride is how many chunks the ahead lane skips when both lanes are in the same kind
// of region.
const aheadStride = 32

// queue hands dispatched chunks (sequence numbers, ascending) to the workers of both lanes.
type queue struct {
	mu      sync.Mutex
	ready   sync.Cond
	pending []int64 // dispatched, not yet taken; ascending
	closed  bool
	ahead   int64 // the ahead lane's next sequence number
	// aheadFrom is where the ahead lane last jumped to; its chunks below tell nothing about
	// the region it is in now.
	aheadFrom int64
	last      [2]laneState
}

// laneState is what a lane's last finished chunk was.
type laneState struct {
	known bool
	wrote bool // it had data to write
}

func newQueue(capacity int) *queue {
	q := &queue{pending: make([]int64, 0, capacity)}
	q.ready.L = &q.mu
	return q
}

// push adds the next sequence number; they arrive in ascending order.
func (q *queue) push(seq int64) {
	q.mu.Lock()
	q.pending = append(q.pending, seq)
	q.mu.Unlock()
	q.ready.Signal()
}

// finished records what kind of chunk a lane last finished.
func (q *queue) finished(lane int, seq int64, wrote bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if lane == laneAhead && seq < q.aheadFrom {
		return
	}
	q.last[lane] = laneState{known: true, wrote: wrote}
}

// close ends the queue once the pending chunks are taken.
func (q *queue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.ready.Broadcast()
}

// take returns the next chunk for a lane; false when the queue is closed and empty.
func (q *queue) take(lane int) (int64, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.pending) == 0 {
		if q.closed {
			return 0, false
		}
		q.ready.Wait()
	}
	i := 0
	if lane == laneAhead {
		// Continue the ahead lane's ascending run; once the front lane has caught up with
		// it (nothing left below it), restart it halfway up what is pending.
		j, _ := slices.BinarySearch(q.pending, q.ahead)
		jump := false
		if front, ahead := q.last[laneFront], q.last[laneAhead]; j > 0 && j < len(q.pending) &&
			front.known && ahead.known && front.wrote == ahead.wrote {
			// Both lanes wait on the same resource: skip ahead to find the other kind.
			j, _ = slices.BinarySearch(q.pending, q.ahead+aheadStride)
			jump = true
		}
		if j == 0 || j == len(q.pending) {
			j = len(q.pending) / 2
			jump = true
		}
		i = j
		q.ahead = q.pending[i] + 1
		if jump {
			q.aheadFrom = q.pending[i]
			q.last[laneAhead].known = false
		}
	}
	seq := q.pending[i]
	q.pending = slices.Delete(q.pending, i, i+1)
	return seq, true
}
