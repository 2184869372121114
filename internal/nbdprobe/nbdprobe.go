// Package nbdprobe proves an NBD server answers, in pure Go: it runs just enough of the
// fixed-newstyle handshake (NBD protocol spec, "Newstyle negotiation") on a connection the
// caller dialled. Greet proves a server negotiates; Open proves it also opens an export.
//
// Both honour ctx: its deadline becomes the connection's deadline and a cancel unblocks a
// pending read or write at once. They change the connection's deadlines, and leave the
// connection finished (negotiation aborted or disconnected): the caller only closes it.
package nbdprobe

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// ErrExportRefused means the server negotiates but answered NBD_OPT_GO with an error: the
// export is unknown or could not be opened (for nbdkit's curl plugin: the URL, cookie or TLS
// failed). Retrying will not help.
var ErrExportRefused = errors.New("NBD export refused")

const (
	greetingMagic = "NBDMAGIC"
	optionMagic   = "IHAVEOPT"
	replyMagic    = 0x3e889045565a9
	requestMagic  = 0x25609513

	flagFixedNewstyle = 1 << 0 // handshake flag, echoed as client flag
	flagNoZeroes      = 1 << 1 // handshake flag, echoed as client flag

	optAbort  = 2
	optGo     = 7
	repAck    = 1
	repErrBit = 1 << 31
	cmdDisc   = 2
	maxName   = 4096     // longest export name the spec lets a server require support for
	maxReply  = 64 << 10 // a larger option reply is not one a probe needs to read
)

// Greet reads the server's greeting, checks it offers fixed-newstyle negotiation, and ends
// the negotiation politely with NBD_OPT_ABORT. For qemu-nbd a greeting proves a client slot:
// a server at its --shared limit accepts the connection but stays silent.
func Greet(ctx context.Context, conn net.Conn) error {
	return negotiate(ctx, conn, optAbort, nil, nil)
}

// Open runs the handshake through NBD_OPT_GO for export, then leaves with NBD_CMD_DISC.
// A greeting alone does not prove a source opens: nbdkit opens its plugin (curl's first
// request, vddk's login) only at NBD_OPT_GO. An error reply wraps ErrExportRefused.
func Open(ctx context.Context, conn net.Conn, export string) error {
	if len(export) > maxName {
		return fmt.Errorf("NBD export name of %d bytes exceeds %d", len(export), maxName)
	}
	// NBD_OPT_GO data: export name length, name, number of info requests (none).
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 0)
	return negotiate(ctx, conn, optGo, data, func() error { return awaitGo(ctx, conn, export) })
}

// negotiate reads the greeting and sends option with data, then runs finish if given, all
// with ctx governing conn.
func negotiate(ctx context.Context, conn net.Conn, option uint32, data []byte, finish func() error) error {
	stop, err := bind(ctx, conn)
	if err != nil {
		return err
	}
	defer stop()
	clientFlags, err := readGreeting(ctx, conn)
	if err != nil {
		return err
	}
	msg := binary.BigEndian.AppendUint32(nil, clientFlags)
	msg = append(msg, optionMagic...)
	msg = binary.BigEndian.AppendUint32(msg, option)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := conn.Write(msg); err != nil {
		return failed(ctx, "send "+optionName(option), err)
	}
	if finish == nil {
		return nil
	}
	return finish()
}

func optionName(option uint32) string {
	switch option {
	case optAbort:
		return "NBD_OPT_ABORT"
	case optGo:
		return "NBD_OPT_GO"
	}
	return fmt.Sprintf("NBD option %d", option)
}

// awaitGo reads the replies to NBD_OPT_GO; on its ack the connection is in the transmission
// phase, which it leaves with NBD_CMD_DISC.
func awaitGo(ctx context.Context, conn net.Conn, export string) error {
	for {
		kind, payload, err := readReply(ctx, conn, optGo)
		if err != nil {
			return err
		}
		switch {
		case kind&repErrBit != 0:
			return fmt.Errorf("%w: NBD_OPT_GO for export %q: error %#x: %s", ErrExportRefused, export, kind, payload)
		case kind == repAck:
			// Request: magic, flags, type, cookie, offset, length.
			disc := binary.BigEndian.AppendUint32(nil, requestMagic)
			disc = binary.BigEndian.AppendUint16(disc, 0)
			disc = binary.BigEndian.AppendUint16(disc, cmdDisc)
			disc = append(disc, make([]byte, 8+8+4)...)
			if _, err := conn.Write(disc); err != nil {
				return failed(ctx, "send NBD_CMD_DISC", err)
			}
			return nil
		}
		// NBD_REP_INFO (the export's size and flags) precedes the ack; a probe needs none.
	}
}

// bind makes ctx govern conn: its deadline (or none) becomes conn's, and a cancel moves the
// deadline into the past so a blocked read or write returns. stop ends the cancel watch.
func bind(ctx context.Context, conn net.Conn) (stop func() bool, err error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("NBD handshake: %w", err)
	}
	deadline, _ := ctx.Deadline()
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, fmt.Errorf("NBD handshake: set deadline: %w", err)
	}
	return context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) }), nil
}

// readGreeting reads and checks the greeting and returns the client flags to answer with:
// the handshake flags both sides understand.
func readGreeting(ctx context.Context, conn net.Conn) (uint32, error) {
	var greeting [len(greetingMagic) + len(optionMagic) + 2]byte // + 16-bit handshake flags
	if _, err := io.ReadFull(conn, greeting[:]); err != nil {
		return 0, failed(ctx, "read NBD greeting", err)
	}
	if string(greeting[:16]) != greetingMagic+optionMagic {
		return 0, fmt.Errorf("not an NBD newstyle server: greeting %q", greeting[:16])
	}
	flags := uint32(binary.BigEndian.Uint16(greeting[16:]))
	if flags&flagFixedNewstyle == 0 {
		return 0, fmt.Errorf("NBD server lacks fixed newstyle negotiation (handshake flags %#x)", flags)
	}
	return flags & (flagFixedNewstyle | flagNoZeroes), nil
}

// readReply reads one option reply to option and returns its type and payload.
func readReply(ctx context.Context, conn net.Conn, option uint32) (uint32, []byte, error) {
	var hdr [8 + 4 + 4 + 4]byte // magic, option, reply type, length
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		return 0, nil, failed(ctx, "read NBD option reply", err)
	}
	if magic := binary.BigEndian.Uint64(hdr[:8]); magic != replyMagic {
		return 0, nil, fmt.Errorf("NBD option reply: bad magic %#x", magic)
	}
	if got := binary.BigEndian.Uint32(hdr[8:12]); got != option {
		return 0, nil, fmt.Errorf("NBD option reply: for option %d, want %d", got, option)
	}
	kind, length := binary.BigEndian.Uint32(hdr[12:16]), binary.BigEndian.Uint32(hdr[16:20])
	if length > maxReply {
		return 0, nil, fmt.Errorf("NBD option reply: %d bytes exceed %d", length, maxReply)
	}
	payload := make([]byte, length)
	if _, err := io.ReadFull(conn, payload); err != nil {
		return 0, nil, failed(ctx, "read NBD option reply", err)
	}
	return kind, payload, nil
}

// failed names the step that failed. A deadline error on conn comes from ctx (bind set it),
// possibly a moment before ctx itself reports done, so it is reported as ctx's error. A
// server that closes before sending anything is an unexpected EOF, like one that stops
// midway.
func failed(ctx context.Context, step string, err error) error {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil:
		err = ctx.Err()
	case errors.Is(err, os.ErrDeadlineExceeded):
		err = context.DeadlineExceeded
	case errors.Is(err, io.EOF):
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("%s: %w", step, err)
}
