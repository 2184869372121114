package nbdkit

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// NBD fixed-newstyle negotiation (NBD protocol spec), just enough to prove a source opens.
const (
	nbdOptGo        = 7
	nbdRepAck       = 1
	nbdRepErrBit    = 1 << 31
	nbdReplyMagic   = 0x3e889045565a9
	nbdRequestMagic = 0x25609513
	nbdCmdDisc      = 2
	nbdFlagsClient  = 1 | 2 // fixed newstyle, no zeroes
)

var nbdGreeting = []byte("NBDMAGICIHAVEOPT")

// errExportRefused marks a server that is up but cannot open the export (for curl: the
// URL, the cookie or TLS failed); retrying will not help.
var errExportRefused = errors.New("export refused")

// probeNBD completes a handshake including NBD_OPT_GO, then disconnects. A greeting alone is
// not enough: nbdkit opens the plugin (curl's first request, vddk's login) only at GO.
func probeNBD(ctx context.Context, network, addr string) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	deadline := time.Now().Add(DefaultReadyTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := conn.SetDeadline(deadline); err != nil {
		return err
	}
	greeting := make([]byte, len(nbdGreeting)+2) // + 16-bit handshake flags
	if _, err := io.ReadFull(conn, greeting); err != nil {
		return fmt.Errorf("read greeting: %w", err)
	}
	if !bytes.Equal(greeting[:len(nbdGreeting)], nbdGreeting) {
		return fmt.Errorf("not an NBD newstyle server: greeting %q", greeting[:len(nbdGreeting)])
	}
	if binary.BigEndian.Uint16(greeting[len(nbdGreeting):])&nbdFlagsClient != nbdFlagsClient {
		return errors.New("server lacks fixed newstyle negotiation")
	}
	// Client flags, then NBD_OPT_GO for the default export "" with no info requests.
	msg := binary.BigEndian.AppendUint32(nil, nbdFlagsClient)
	msg = append(msg, nbdGreeting[8:]...)
	msg = binary.BigEndian.AppendUint32(msg, nbdOptGo)
	msg = binary.BigEndian.AppendUint32(msg, 4+2)
	msg = binary.BigEndian.AppendUint32(msg, 0) // export name length
	msg = binary.BigEndian.AppendUint16(msg, 0) // info requests
	if _, err := conn.Write(msg); err != nil {
		return fmt.Errorf("send NBD_OPT_GO: %w", err)
	}
	for {
		var hdr [20]byte
		if _, err := io.ReadFull(conn, hdr[:]); err != nil {
			return fmt.Errorf("read option reply: %w", err)
		}
		if binary.BigEndian.Uint64(hdr[:8]) != nbdReplyMagic {
			return errors.New("bad option reply magic")
		}
		kind, length := binary.BigEndian.Uint32(hdr[12:16]), binary.BigEndian.Uint32(hdr[16:20])
		if length > 64<<10 {
			return fmt.Errorf("option reply of %d bytes", length)
		}
		payload := make([]byte, length)
		if _, err := io.ReadFull(conn, payload); err != nil {
			return fmt.Errorf("read option reply: %w", err)
		}
		switch {
		case kind&nbdRepErrBit != 0:
			return fmt.Errorf("%w: NBD_OPT_GO error %#x: %s", errExportRefused, kind, payload)
		case kind == nbdRepAck:
			// Transmission phase: leave politely with NBD_CMD_DISC.
			disc := binary.BigEndian.AppendUint32(nil, nbdRequestMagic)
			disc = binary.BigEndian.AppendUint16(disc, 0)
			disc = binary.BigEndian.AppendUint16(disc, nbdCmdDisc)
			disc = append(disc, make([]byte, 8+8+4)...)
			_, err := conn.Write(disc)
			return err
		}
	}
}
