package limits

import (
	"context"
	"sync"
)

// Slots caps how many copies run at once; a nil *Slots or a cap of 0 caps nothing.
type Slots struct {
	free chan struct{}
}

// NewSlots returns n slots; n <= 0: unlimited (nil).
func NewSlots(n int) *Slots {
	if n <= 0 {
		return nil
	}
	s := &Slots{free: make(chan struct{}, n)}
	for range n {
		s.free <- struct{}{}
	}
	return s
}

// Cap is the number of slots, 0 when unlimited.
func (s *Slots) Cap() int {
	if s == nil {
		return 0
	}
	return cap(s.free)
}

// InUse is how many slots are taken now.
func (s *Slots) InUse() int {
	if s == nil {
		return 0
	}
	return cap(s.free) - len(s.free)
}

// Acquire takes a slot. When none is free it calls waiting once, then blocks until a slot
// frees or ctx ends (its error then). The returned release gives the slot back; calling it
// again does nothing, so every exit path may call it.
func (s *Slots) Acquire(ctx context.Context, waiting func()) (release func(), err error) {
	if s == nil {
		return func() {}, nil
	}
	select {
	case <-s.free:
	default:
		if waiting != nil {
			waiting()
		}
		select {
		case <-s.free:
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	}
	var once sync.Once
	return func() { once.Do(func() { s.free <- struct{}{} }) }, nil
}
