// Package heartbeat keeps an activity heartbeating while it waits on something that reports
// no progress of its own (nbdkit starting, a vCenter task, qemu-img check): without it a long
// wait looks like a dead worker to Temporal, and a cancel, which only a heartbeat's reply
// brings, does not reach the activity.
package heartbeat

import (
	"context"
	"sync"
	"time"

	"go.temporal.io/sdk/activity"
)

// Keeper heartbeats the last details it was given, every interval, until Stop.
type Keeper struct {
	ctx     context.Context
	mu      sync.Mutex
	details any // nil: heartbeats carry no details
	stop    chan struct{}
	done    chan struct{}
}

// Start heartbeats details at once and then every interval in the background. Pass the
// details of the previous attempt (or nil) so an early heartbeat does not erase them.
func Start(ctx context.Context, every time.Duration, details any) *Keeper {
	k := &Keeper{ctx: ctx, details: details, stop: make(chan struct{}), done: make(chan struct{})}
	k.beat()
	go func() {
		defer close(k.done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			select {
			case <-k.stop:
				return
			case <-ctx.Done():
				return
			case <-tick.C:
				k.beat()
			}
		}
	}()
	return k
}

// Record heartbeats details now and keeps them for the background heartbeats.
func (k *Keeper) Record(details any) {
	k.mu.Lock()
	k.details = details
	k.mu.Unlock()
	k.beat()
}

func (k *Keeper) beat() {
	k.mu.Lock()
	details := k.details
	k.mu.Unlock()
	if details == nil {
		activity.RecordHeartbeat(k.ctx)
		return
	}
	activity.RecordHeartbeat(k.ctx, details)
}

// Stop ends the background heartbeats and waits for them; call it before returning.
func (k *Keeper) Stop() {
	close(k.stop)
	<-k.done
}
