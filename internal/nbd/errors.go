package nbd

import (
	"errors"
	"fmt"
	"syscall"
)

// ErrClosed is returned by commands on a closed handle or one closed while they ran.
var ErrClosed = errors.New("nbd: handle closed")

// Error is a failed libnbd call with libnbd's message and errno. errors.Is(err, syscall.ECONNREFUSED)
// and similar work through Unwrap.
type Error struct {
	Op      string        // libnbd call, e.g. "connect", "pread"
	URI     string        // the server, without query
	Message string        // libnbd's message (nbd_get_error)
	Errno   syscall.Errno // nbd_get_errno; 0 when libnbd gave none
}

func (e *Error) Error() string {
	msg := e.Message
	if msg == "" {
		msg = "failed"
		if e.Errno != 0 {
			msg = e.Errno.Error()
		}
	}
	if e.URI != "" {
		return fmt.Sprintf("nbd %s %s: %s", e.Op, e.URI, msg)
	}
	return fmt.Sprintf("nbd %s: %s", e.Op, msg)
}

// Unwrap exposes the errno.
func (e *Error) Unwrap() error {
	if e.Errno == 0 {
		return nil
	}
	return e.Errno
}
