package tunnel

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// gatedConn is a socket whose writes wait for the test: each Write is recorded, then blocks
// until release is closed (or returns fail when set).
type gatedConn struct {
	net.Conn
	mu      sync.Mutex
	writes  [][]byte
	entered chan struct{} // one per Write
	release chan struct{}
	fail    error
	closed  chan struct{}
}

func newGatedConn() *gatedConn {
	return &gatedConn{entered: make(chan struct{}, 1024), release: make(chan struct{}), closed: make(chan struct{})}
}

func (g *gatedConn) Write(p []byte) (int, error) {
	g.mu.Lock()
	g.writes = append(g.writes, bytes.Clone(p))
	fail := g.fail
	g.mu.Unlock()
	g.entered <- struct{}{}
	if fail != nil {
		return 0, fail
	}
	select {
	case <-g.release:
		return len(p), nil
	case <-g.closed:
		return 0, net.ErrClosed
	}
}

func (g *gatedConn) Close() error {
	close(g.closed)
	return nil
}

func (g *gatedConn) recorded() [][]byte {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.writes
}

// Packets queued while the socket is busy go out in one write, in order.
func TestBatchConnCoalescesWritesWhileTheSocketIsBusy(t *testing.T) {
	g := newGatedConn()
	c := batchWrites(g)
	defer c.Close()

	_, err := c.Write([]byte("first"))
	require.NoError(t, err)
	<-g.entered // the flusher is inside the socket's write with "first"
	for _, p := range []string{"-a", "-b", "-c"} {
		n, err := c.Write([]byte(p))
		require.NoError(t, err, "a write returns while the socket is busy")
		assert.Equal(t, len(p), n)
	}
	close(g.release)
	<-g.entered
	assert.Equal(t, [][]byte{[]byte("first"), []byte("-a-b-c")}, g.recorded(), "three packets, one write")
}

// Over a real socket every byte arrives in order, whatever the writers' sizes and timing.
func TestBatchConnKeepsEveryByteInOrder(t *testing.T) {
	a, b := net.Pipe()
	c := batchWrites(a)
	defer c.Close()
	rng := rand.New(rand.NewPCG(1, 2))
	var sent bytes.Buffer
	var packets [][]byte
	for range 500 {
		p := make([]byte, 1+rng.IntN(40<<10))
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		packets = append(packets, p)
		sent.Write(p)
	}
	got := make(chan []byte, 1)
	go func() {
		data, _ := io.ReadAll(io.LimitReader(b, int64(sent.Len())))
		got <- data
	}()
	for _, p := range packets {
		_, err := c.Write(p)
		require.NoError(t, err)
	}
	select {
	case data := <-got:
		require.True(t, bytes.Equal(sent.Bytes(), data), "the bytes read differ from the bytes written")
	case <-time.After(time.Minute):
		t.Fatal("the reader did not get every byte")
	}
}

// The socket's first write error is every later Write's, also for a writer waiting for room.
func TestBatchConnReturnsTheSocketsError(t *testing.T) {
	g := newGatedConn()
	boom := errors.New("connection reset")
	g.fail = boom
	c := batchWrites(g)
	defer c.Close()
	_, err := c.Write([]byte("x"))
	require.NoError(t, err, "queued before the socket failed")
	<-g.entered
	require.Eventually(t, func() bool {
		_, err := c.Write([]byte("y"))
		return errors.Is(err, boom)
	}, time.Minute, time.Millisecond, "later writes fail with the socket's error")
}

// A writer waiting for room is released by Close.
func TestBatchConnCloseReleasesAWaitingWriter(t *testing.T) {
	g := newGatedConn()
	c := batchWrites(g)
	_, err := c.Write([]byte("busy"))
	require.NoError(t, err)
	<-g.entered // the socket holds the flusher
	_, err = c.Write(make([]byte, maxBatch))
	require.NoError(t, err, "the queue takes one write of any size")
	blocked := make(chan error, 1)
	go func() {
		_, err := c.Write([]byte("more"))
		blocked <- err
	}()
	select {
	case err := <-blocked:
		t.Fatalf("a write beyond %d queued bytes returned (%v) instead of waiting", maxBatch, err)
	case <-time.After(100 * time.Millisecond):
	}
	require.NoError(t, c.Close())
	select {
	case err := <-blocked:
		require.ErrorIs(t, err, net.ErrClosed)
	case <-time.After(time.Minute):
		t.Fatal("Close left a writer waiting")
	}
}
