package tunnel

import (
	"net"
	"sync"
)

// maxBatch bounds the bytes a batchConn holds for its socket; a writer beyond it waits.
const maxBatch = 1 << 20

// batchConn coalesces the SSH transport's writes. x/crypto/ssh writes and flushes each
// packet (at most 32 KiB of channel data) on its own, so a forwarded copy made one TCP write
// per packet: 64 % of the tunnel's CPU went to syscalls (BenchmarkTunnelMulti's profile).
// Here Write queues the packet and returns; one goroutine writes whatever queued while its
// previous write ran, in one syscall. A lone packet is written at once, so latency stays
// the socket's. Order is kept; the first write error is returned by every later Write, and
// Close (or that error) releases writers waiting for room.
type batchConn struct {
	net.Conn
	mu      sync.Mutex
	changed *sync.Cond // queued data, room, an error or close
	queued  []byte
	spare   []byte
	err     error
	closed  bool
	done    chan struct{}
}

func batchWrites(conn net.Conn) *batchConn {
	c := &batchConn{Conn: conn, done: make(chan struct{})}
	c.changed = sync.NewCond(&c.mu)
	go c.flush()
	return c
}

func (c *batchConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.err == nil && !c.closed && len(c.queued) > 0 && len(c.queued)+len(p) > maxBatch {
		c.changed.Wait()
	}
	switch {
	case c.err != nil:
		return 0, c.err
	case c.closed:
		return 0, net.ErrClosed
	}
	c.queued = append(c.queued, p...)
	c.changed.Broadcast()
	return len(p), nil
}

// flush writes what is queued until the connection fails or closes.
func (c *batchConn) flush() {
	defer close(c.done)
	for {
		c.mu.Lock()
		for len(c.queued) == 0 && !c.closed {
			c.changed.Wait()
		}
		if c.closed {
			c.mu.Unlock()
			return
		}
		out := c.queued
		c.queued, c.spare = c.spare[:0], nil
		c.changed.Broadcast() // room for the writers
		c.mu.Unlock()

		_, err := c.Conn.Write(out)

		c.mu.Lock()
		c.spare = out[:0]
		if err != nil {
			c.err = err
			c.changed.Broadcast()
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
	}
}

// Close closes the socket (a write in progress fails) and stops the flusher; bytes still
// queued are dropped, as a closed socket's unsent bytes are.
func (c *batchConn) Close() error {
	c.mu.Lock()
	c.closed = true
	c.changed.Broadcast()
	c.mu.Unlock()
	err := c.Conn.Close()
	<-c.done
	return err
}
