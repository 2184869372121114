package nbdprobe_test

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/nbdprobe"
	"github.com/diskferry/diskferry/internal/testenv"
)

func dial(t *testing.T, network, addr string) net.Conn {
	t.Helper()
	conn, err := net.DialTimeout(network, addr, 2*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

func dialQemuNBD(t *testing.T, s *testenv.NBDServer) net.Conn {
	return dial(t, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Port)))
}

// serve runs handle on every connection to a loopback listener and returns its address.
func serve(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	t.Cleanup(func() {
		l.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer conn.Close()
				handle(conn)
			})
		}
	})
	return l.Addr().String()
}

// silent accepts and never greets, like a qemu-nbd at its --shared limit; it returns once
// the client closes.
func silent(conn net.Conn) { _, _ = io.Copy(io.Discard, conn) }

func TestGreetQemuNBDAbortsNegotiation(t *testing.T) {
	s := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, 1<<20), testenv.QemuNBDOptions{})
	conn := dialQemuNBD(t, s)

	require.NoError(t, nbdprobe.Greet(t.Context(), conn))

	// The server understood NBD_OPT_ABORT: it acknowledges and closes rather than waiting
	// for more options.
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(3*time.Second)))
	_, err := io.ReadAll(conn)
	assert.NoError(t, err, "qemu-nbd closes the connection after NBD_OPT_ABORT")
}

func TestOpenQemuNBDExport(t *testing.T) {
	s := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, 1<<20), testenv.QemuNBDOptions{Args: []string{"--export-name=a"}})

	conn := dialQemuNBD(t, s)
	require.NoError(t, nbdprobe.Open(t.Context(), conn, "a"))
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(3*time.Second)))
	_, err := io.ReadAll(conn)
	assert.NoError(t, err, "qemu-nbd closes the connection after NBD_CMD_DISC")

	err = nbdprobe.Open(t.Context(), dialQemuNBD(t, s), "b")
	require.ErrorIs(t, err, nbdprobe.ErrExportRefused)
	assert.Contains(t, err.Error(), `"b"`, "the refusal names the export")
}

func TestGreetAndOpenNbdkitFile(t *testing.T) {
	image := filepath.Join(t.TempDir(), "disk.raw")
	require.NoError(t, os.WriteFile(image, make([]byte, 1<<16), 0o600))
	s := testenv.StartNbdkitFile(t, image, testenv.NbdkitOptions{})

	assert.NoError(t, nbdprobe.Greet(t.Context(), dial(t, "unix", s.Socket)))
	assert.NoError(t, nbdprobe.Open(t.Context(), dial(t, "unix", s.Socket), ""))
}

func TestSilentServerEndsAtDeadline(t *testing.T) {
	addr := serve(t, silent)
	for name, probe := range map[string]func(context.Context, net.Conn) error{
		"Greet": nbdprobe.Greet,
		"Open":  func(ctx context.Context, c net.Conn) error { return nbdprobe.Open(ctx, c, "") },
	} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
			defer cancel()
			began := time.Now()
			err := probe(ctx, dial(t, "tcp", addr))
			require.ErrorIs(t, err, context.DeadlineExceeded)
			assert.ErrorContains(t, err, "read NBD greeting")
			assert.Less(t, time.Since(began), 2*time.Second)
		})
	}
}

func TestCancelUnblocksProbe(t *testing.T) {
	addr := serve(t, silent)
	ctx, cancel := context.WithCancel(t.Context())
	time.AfterFunc(100*time.Millisecond, cancel)
	began := time.Now()

	err := nbdprobe.Greet(ctx, dial(t, "tcp", addr))
	require.ErrorIs(t, err, context.Canceled)
	assert.Less(t, time.Since(began), 2*time.Second)

	err = nbdprobe.Open(ctx, dial(t, "tcp", addr), "")
	assert.ErrorIs(t, err, context.Canceled, "a done ctx fails before any I/O")
}

// A server that greets properly and then never answers NBD_OPT_GO: the deadline covers the
// whole handshake, not just the greeting.
func TestOpenDeadlineCoversOptionReply(t *testing.T) {
	addr := serve(t, func(conn net.Conn) {
		if _, err := conn.Write([]byte("NBDMAGICIHAVEOPT\x00\x03")); err == nil {
			silent(conn)
		}
	})
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	err := nbdprobe.Open(ctx, dial(t, "tcp", addr), "")
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.ErrorContains(t, err, "read NBD option reply")
}

func TestNotNBDFailsClearly(t *testing.T) {
	for name, tc := range map[string]struct {
		send    string
		wantMsg string
		wantErr error
	}{
		"http server":       {send: "HTTP/1.1 400 Bad Request\r\n\r\n", wantMsg: "not an NBD newstyle server"},
		"oldstyle server":   {send: "NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53" + "\x00\x00\x00\x00\x00\x10\x00\x00\x00\x01", wantMsg: "not an NBD newstyle server"},
		"no fixed newstyle": {send: "NBDMAGICIHAVEOPT\x00\x00", wantMsg: "lacks fixed newstyle"},
		"closes at once":    {send: "", wantMsg: "read NBD greeting", wantErr: io.ErrUnexpectedEOF},
		"closes midway":     {send: "NBDMAGIC", wantMsg: "read NBD greeting", wantErr: io.ErrUnexpectedEOF},
	} {
		t.Run(name, func(t *testing.T) {
			addr := serve(t, func(conn net.Conn) { _, _ = io.WriteString(conn, tc.send) })
			for _, err := range []error{
				nbdprobe.Greet(t.Context(), dial(t, "tcp", addr)),
				nbdprobe.Open(t.Context(), dial(t, "tcp", addr), ""),
			} {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.wantMsg)
				assert.False(t, errors.Is(err, nbdprobe.ErrExportRefused), "not a refusal: %v", err)
				if tc.wantErr != nil {
					assert.ErrorIs(t, err, tc.wantErr)
				}
			}
		})
	}
}

func TestOpenRejectsOverlongExportName(t *testing.T) {
	addr := serve(t, silent)
	err := nbdprobe.Open(t.Context(), dial(t, "tcp", addr), strings.Repeat("x", 4097))
	assert.ErrorContains(t, err, "exceeds 4096")
}
