package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"

	"github.com/diskferry/diskferry/internal/nbdprobe"
)

// Health proves a forward end to end: it connects to the port's forward socket, which goes
// through the SSH connection to the hub's export socket, reads the NBD newstyle greeting
// there, and ends the negotiation politely with NBD_OPT_ABORT. A port that is not
// forwarded by this manager is an error. When the hub refused the channel, the error
// wraps ErrRefused.
func (m *Manager) Health(ctx context.Context, port int) error {
	m.mu.Lock()
	fw, ok := m.forwards[port]
	closed := m.closed
	m.mu.Unlock()
	if closed {
		return ErrClosed
	}
	if !ok {
		return fmt.Errorf("tunnel health: port %d is not forwarded", port)
	}

	err := m.nbdHandshake(ctx, port)
	if err == nil {
		return nil
	}
	if cause := fw.err(); cause != nil && errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("tunnel health of port %d -> hub %s: %w (forward failed: %w)",
			port, fw.spec.Remote, err, cause)
	}
	return fmt.Errorf("tunnel health of port %d -> hub %s: %w", port, fw.spec.Remote, err)
}

func (m *Manager) nbdHandshake(ctx context.Context, port int) error {
	if _, ok := ctx.Deadline(); !ok {
		// The greeting crosses the tunnel once; a dial's worth of time is plenty.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 2*m.cfg.DialTimeout)
		defer cancel()
	}
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "unix", m.SocketPath(port))
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	return nbdprobe.Greet(ctx, conn)
}
