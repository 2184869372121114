package blockcopy

import "context"

// Throttle paces a copy's data writes, the payload that crosses the wire to the target
// (zero requests carry no payload and are not counted; a Stream's zeros are payload and
// are): WaitN is called before each data write with its length and returns once the write
// may go; an error fails the copy. It is called from several workers at once. A *rate.Limiter whose burst is at least the request
// size is one; internal/limits cuts larger waits for any burst.
type Throttle interface {
	WaitN(ctx context.Context, n int) error
}

// throttleContext is the context of a throttle's waits: unlike a command in flight, which
// runs on until it completes so the target stays consistent, a write still waiting for its
// turn is not sent, so the wait ends on the caller's cancel as well as on a failed copy.
func throttleContext(ctx, actx context.Context) (context.Context, func()) {
	tctx, cancel := context.WithCancelCause(actx)
	stopAfter := context.AfterFunc(ctx, func() { cancel(context.Cause(ctx)) })
	return tctx, func() {
		stopAfter()
		cancel(nil)
	}
}

// pace waits until the throttle, if any, lets n more bytes go to the target.
func (c *Copy) pace(ctx context.Context, n int64) error {
	if c.opts.Throttle == nil {
		return nil
	}
	return c.opts.Throttle.WaitN(ctx, int(n))
}
