package tunnel_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/tunnel"
)

// holdForwarded opens n forwarded connections to the echo server behind port and proves
// each carries bytes; they stay open until the test ends.
func holdForwarded(t *testing.T, m *tunnel.Manager, port, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, n)
	for i := range conns {
		conn, err := dialForward(m, port)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		_ = conn.SetDeadline(time.Now().Add(time.Minute))
		if _, err := conn.Write([]byte{byte(i)}); err != nil {
			t.Fatalf("write on forwarded connection %d: %v", i, err)
		}
		if _, err := io.ReadFull(conn, make([]byte, 1)); err != nil {
			t.Fatalf("echo on forwarded connection %d: %v", i, err)
		}
		conns[i] = conn
	}
	return conns
}

// The pool spreads forwarded connections over its SSH connections (the one with the
// fewest channels first), and every one of them, killed silently, is noticed by its own
// keepalive and redialled while forwards remain.
func TestPoolSpreadsConnectionsAndHealsEachOne(t *testing.T) {
	s := testenv.StartSSHD(t)
	proxy := startLinkProxy(t, s.Addr, 0)
	cfg := baseConfig(s)
	cfg.Addr = proxy.addr()
	cfg.KnownHostsFile = writeKnownHosts(t, proxy.addr(), s.HostPublicKey)
	cfg.KeepaliveInterval = 300 * time.Millisecond
	cfg.Connections = 3
	m := newManager(t, cfg)
	remote := echoServer(t, s.ExportSocket(testPort))
	if err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: remote}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}
	if got := proxy.accepted.Load(); got != 1 {
		t.Fatalf("%d SSH connections after EnsureForwards, want 1 (the others are dialled on use)", got)
	}

	// Held open at once, three forwarded connections take one SSH connection each.
	held := holdForwarded(t, m, testPort, cfg.Connections)
	if got := proxy.accepted.Load(); got != int32(cfg.Connections) {
		t.Fatalf("%d forwarded connections held open went over %d SSH connections, want %d", len(held), got, cfg.Connections)
	}
	for _, c := range held {
		c.Close()
	}

	proxy.freeze()

	// No traffic: only each connection's keepalive can notice and redial it.
	eventually(t, time.Minute, "every pooled connection redialled", func() error {
		if got := proxy.accepted.Load(); got < 2*int32(cfg.Connections) {
			return fmt.Errorf("%d SSH connections dialled so far", got)
		}
		return nil
	})
	if err := startRoundTrips(m, 2*cfg.Connections, randomBytes(t, 1<<20))(); err != nil {
		t.Fatalf("round trips over the redialled pool: %v", err)
	}
}

// Every SSH connection of the pool checks the pinned host key: when a further connection
// reaches a server with another key (an impostor taking over the address), it is refused
// before login, and forwarded connections keep using the verified ones.
func TestPoolChecksHostKeyOnEveryConnection(t *testing.T) {
	hub := testenv.StartSSHD(t)
	impostor := testenv.StartSSHD(t)
	proxy := startLinkProxy(t, hub.Addr, 0)
	cfg := baseConfig(hub)
	cfg.Addr = proxy.addr()
	cfg.KnownHostsFile = writeKnownHosts(t, proxy.addr(), hub.HostPublicKey)
	cfg.Connections = 2
	var logged bytes.Buffer
	var logMu sync.Mutex
	m, err := tunnel.New(cfg, slog.New(slog.NewTextHandler(io.MultiWriter(lockedWriter{&logMu, &logged}, testWriter{t}), nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	remote := echoServer(t, hub.ExportSocket(testPort))
	if err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: remote}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}
	first := holdForwarded(t, m, testPort, 1)

	proxy.retarget(impostor.Addr)

	// The second forwarded connection asks for the idle second SSH connection, which meets
	// the impostor; it falls back to the verified one.
	if err := roundTrip(m, testPort, []byte("despite the impostor")); err != nil {
		t.Fatalf("round trip while a pooled connection meets an impostor: %v", err)
	}
	if got := proxy.accepted.Load(); got < 2 {
		t.Fatalf("the pool dialled %d times, want the second connection tried", got)
	}
	logMu.Lock()
	log := logged.String()
	logMu.Unlock()
	if !strings.Contains(log, "does not match known_hosts") {
		t.Fatalf("no host key mismatch logged for the second connection:\n%s", log)
	}
	if strings.Contains(impostor.Log(), "Accepted publickey") {
		t.Fatalf("the tunnel logged in to the impostor:\n%s", impostor.Log())
	}
	if _, err := first[0].Write([]byte("x")); err != nil {
		t.Fatalf("the verified connection stopped carrying: %v", err)
	}
	if _, err := io.ReadFull(first[0], make([]byte, 1)); err != nil {
		t.Fatalf("the verified connection stopped carrying: %v", err)
	}
}

func TestPoolSizeAndCiphersAreChecked(t *testing.T) {
	s := testenv.StartSSHD(t)
	cfg := baseConfig(s)
	cfg.Ciphers = []string{"aes128-cbc"}
	if _, err := tunnel.New(cfg, testLogger(t)); err == nil || !strings.Contains(err.Error(), "aes128-cbc") {
		t.Fatalf("New with an insecure cipher: %v, want it refused by name", err)
	}
	cfg.Ciphers = nil
	cfg.Connections = -1
	m := newManager(t, cfg)
	if err := m.EnsureForwards(testContext(t), nil); err != nil {
		t.Fatalf("EnsureForwards with the default pool size: %v", err)
	}
	if err := m.Close(); err != nil || !errors.Is(m.EnsureForwards(testContext(t), nil), tunnel.ErrClosed) {
		t.Fatalf("Close: %v", err)
	}
}
