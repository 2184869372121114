package blockcopy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/limits"
	"github.com/diskferry/diskferry/internal/testenv"
)

// countingThrottle lets everything through and counts what it was asked for.
type countingThrottle struct {
	bytes, calls, largest atomic.Int64
}

func (c *countingThrottle) WaitN(ctx context.Context, n int) error {
	c.bytes.Add(int64(n))
	c.calls.Add(1)
	for {
		old := c.largest.Load()
		if int64(n) <= old || c.largest.CompareAndSwap(old, int64(n)) {
			return nil
		}
	}
}

// The throttle is asked for exactly the payload bytes written, never for zero requests.
func TestThrottleCountsDataWrites(t *testing.T) {
	src := fixture(t, 40*mib)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	dstPath := testenv.CreateQcow2(t, 40*mib)
	target := testenv.StartQemuNBD(t, dstPath, testenv.QemuNBDOptions{})

	throttle := &countingThrottle{}
	cp, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{Throttle: throttle})
	require.NoError(t, err)
	res, err := cp.Run(t.Context())
	require.NoError(t, err)
	requireSame(t, src, dstPath)

	require.Positive(t, res.BytesZeroed, "the fixture's written zeros must become zero requests")
	require.Equal(t, res.BytesWritten, throttle.bytes.Load(), "throttled bytes must be the data written")
	require.Less(t, throttle.bytes.Load(), res.BytesRead, "zero requests must not be throttled")
	require.LessOrEqual(t, throttle.largest.Load(), int64(blockcopy.DefaultRequestSize), "one wait per write, at most a request")
}

func TestThrottleErrorFailsCopy(t *testing.T) {
	src := fixture(t, 40*mib)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	target := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, 40*mib), testenv.QemuNBDOptions{})

	refused := errors.New("no bandwidth for you")
	cp, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{Throttle: throttleFunc(func(context.Context, int) error { return refused })})
	require.NoError(t, err)
	res, err := cp.Run(t.Context())
	require.ErrorIs(t, err, refused)
	require.NotNil(t, res)
	require.Zero(t, res.BytesWritten, "nothing may be written past a refusing throttle")
}

// A write waiting for its turn must not hold up a cancel: the wait ends with the caller's
// context although commands in flight run on a context of their own. Before the throttle's
// wait had a context of its own, this copy never returned.
func TestThrottleWaitEndsOnCancel(t *testing.T) {
	src := fixture(t, 40*mib)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	target := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, 40*mib), testenv.QemuNBDOptions{})

	waiting := make(chan struct{})
	var once sync.Once
	blocked := throttleFunc(func(ctx context.Context, n int) error {
		once.Do(func() { close(waiting) })
		<-ctx.Done()
		return ctx.Err()
	})
	cp, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{Throttle: blocked})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		_, err := cp.Run(ctx)
		done <- err
	}()
	<-waiting
	cancel()
	require.ErrorIs(t, <-done, context.Canceled)
}

type throttleFunc func(ctx context.Context, n int) error

func (f throttleFunc) WaitN(ctx context.Context, n int) error { return f(ctx, n) }

// A stream asks the throttle for every byte it writes, the zeros of holes too (an upload
// sends them), and ends with the throttle's error.
func TestStreamThrottleCountsEveryByte(t *testing.T) {
	raw := fixture(t, 40*mib)
	export := testenv.StartQemuNBD(t, qcow2Of(t, raw), testenv.QemuNBDOptions{Args: []string{"--read-only"}})

	throttle := &countingThrottle{}
	res, err := blockcopy.Stream(t.Context(), export.URI, io.Discard, blockcopy.Options{Throttle: throttle})
	require.NoError(t, err)
	require.Positive(t, res.BytesZeroed, "the fixture has holes")
	require.Equal(t, int64(40*mib), throttle.bytes.Load(), "every byte of the stream")

	refused := errors.New("no bandwidth for you")
	var out bytes.Buffer
	res, err = blockcopy.Stream(t.Context(), export.URI, &out,
		blockcopy.Options{Throttle: throttleFunc(func(context.Context, int) error { return refused })})
	require.ErrorIs(t, err, refused)
	require.Zero(t, out.Len(), "nothing may be written past a refusing throttle")
	require.Empty(t, res.Digest)
}

// A stream under a bandwidth limit goes no faster than the limit: a token bucket lets
// through at most its burst plus the rate times the time taken, so the margin here only
// covers the burst, never the machine's speed (a slow run is slower still).
func TestStreamIsPacedByALimit(t *testing.T) {
	const size, rate = 32 * mib, 16 * mib
	raw := fixture(t, size)
	export := testenv.StartQemuNBD(t, qcow2Of(t, raw), testenv.QemuNBDOptions{Args: []string{"--read-only"}})

	start := time.Now()
	res, err := blockcopy.Stream(t.Context(), export.URI, io.Discard, blockcopy.Options{Throttle: limits.NewLimit(rate)})
	require.NoError(t, err)
	elapsed := time.Since(start)
	require.Equal(t, int64(size), res.BytesDone)
	speed := float64(size) / elapsed.Seconds()
	t.Logf("%d bytes in %s: %s under a limit of %s", size, elapsed, limits.FormatRate(int64(speed)), limits.FormatRate(rate))
	require.LessOrEqual(t, speed, 1.5*rate, "%d bytes in %s is %s, over the limit of %s",
		size, elapsed, limits.FormatRate(int64(speed)), limits.FormatRate(rate))
}
