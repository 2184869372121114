package tunnel

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"time"
)

// NBD newstyle handshake constants (NBD protocol, "Newstyle negotiation").
const (
	nbdMagic          = "NBDMAGIC"
	nbdOptMagic       = "IHAVEOPT"
	nbdFlagFixed      = 1 << 0 // server handshake flag / client flag: fixed newstyle
	nbdFlagNoZeroes   = 1 << 1 // server handshake flag / client flag: no zero padding
	nbdOptAbort       = 2
	nbdGreetingLength = 18 // magic, option magic, 16-bit handshake flags
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
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	setNoDelay(conn)
	deadline, callerDeadline := ctx.Deadline()
	if !callerDeadline {
		// The greeting crosses the tunnel once; a dial's worth of time is plenty.
		deadline = time.Now().Add(2 * m.cfg.DialTimeout)
	}
	_ = conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	greeting := make([]byte, nbdGreetingLength)
	if _, err := io.ReadFull(conn, greeting); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		if ctx.Err() != nil {
			return fmt.Errorf("read NBD greeting: %w", ctx.Err())
		}
		// The socket deadline is the caller's and may fire a moment before ctx notices.
		if callerDeadline && errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("read NBD greeting: %w", context.DeadlineExceeded)
		}
		return fmt.Errorf("read NBD greeting: %w", err)
	}
	if !bytes.Equal(greeting[:8], []byte(nbdMagic)) || !bytes.Equal(greeting[8:16], []byte(nbdOptMagic)) {
		return fmt.Errorf("not an NBD newstyle server: greeting %q", greeting[:16])
	}
	serverFlags := binary.BigEndian.Uint16(greeting[16:])

	// Echo the flags we understand, then abort the option haggling.
	msg := make([]byte, 0, 20)
	msg = binary.BigEndian.AppendUint32(msg, uint32(serverFlags&(nbdFlagFixed|nbdFlagNoZeroes)))
	msg = append(msg, nbdOptMagic...)
	msg = binary.BigEndian.AppendUint32(msg, nbdOptAbort)
	msg = binary.BigEndian.AppendUint32(msg, 0)
	if _, err := conn.Write(msg); err != nil {
		return fmt.Errorf("send NBD_OPT_ABORT: %w", err)
	}
	return nil
}
