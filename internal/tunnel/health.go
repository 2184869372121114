package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"

	"github.com/diskferry/diskferry/internal/nbdprobe"
)

// Health proves a forward end to end: it connects to 127.0.0.1:localPort, which goes
// through the SSH connection to the hub port, reads the NBD newstyle greeting there,
// and ends the negotiation politely with NBD_OPT_ABORT. A port that is not forwarded by
// this manager is an error, so another local listener cannot pass for the tunnel.
func (m *Manager) Health(ctx context.Context, localPort int) error {
	m.mu.Lock()
	fw, ok := m.forwards[localPort]
	closed := m.closed
	m.mu.Unlock()
	if closed {
		return ErrClosed
	}
	if !ok {
		return fmt.Errorf("tunnel health: local port %d is not forwarded", localPort)
	}

	err := m.nbdHandshake(ctx, localPort)
	if err == nil {
		return nil
	}
	if cause := fw.err(); cause != nil && errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("tunnel health 127.0.0.1:%d -> hub port %d: %w (forward failed: %v)",
			localPort, fw.spec.Remote, err, cause)
	}
	return fmt.Errorf("tunnel health 127.0.0.1:%d -> hub port %d: %w", localPort, fw.spec.Remote, err)
}

func (m *Manager) nbdHandshake(ctx context.Context, port int) error {
	if _, ok := ctx.Deadline(); !ok {
		// The greeting crosses the tunnel once; a dial's worth of time is plenty.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 2*m.cfg.DialTimeout)
		defer cancel()
	}
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	setNoDelay(conn)
	return nbdprobe.Greet(ctx, conn)
}
