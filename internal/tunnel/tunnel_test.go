package tunnel_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/tunnel"
)

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func baseConfig(s *testenv.SSHD) tunnel.Config {
	return tunnel.Config{
		Addr:           s.Addr,
		User:           s.User,
		KeyFile:        s.ClientKeyPath,
		KnownHostsFile: s.KnownHostsPath,
		// Tests about keepalives set their own; these only bound a reconnect.
		KeepaliveInterval: time.Second,
		DialTimeout:       10 * time.Second,
		MaxBackoff:        500 * time.Millisecond,
	}
}

func newManager(t testing.TB, cfg tunnel.Config) *tunnel.Manager {
	t.Helper()
	m, err := tunnel.New(cfg, testLogger(t))
	if err != nil {
		t.Fatalf("tunnel.New: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// echoServer stands in for a hub export: it echoes every byte back on the unix socket
// path, which it returns.
func echoServer(t testing.TB, path string) string {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				_, _ = io.Copy(conn, conn)
			}()
		}
	}()
	return path
}

// testPort names a forward; nothing listens on it, it is only the export's identity.
const testPort = testenv.SSHDExportPortMin

// dialForward connects to the forward socket of port.
func dialForward(m *tunnel.Manager, port int) (net.Conn, error) {
	return net.DialTimeout("unix", m.SocketPath(port), 10*time.Second)
}

// roundTrip sends payload through the forward of port and expects it echoed back.
func roundTrip(m *tunnel.Manager, port int, payload []byte) error {
	conn, err := dialForward(m, port)
	if err != nil {
		return err
	}
	defer conn.Close()
	// Bounds a hang; far beyond what a round trip takes even on a busy machine.
	_ = conn.SetDeadline(time.Now().Add(2 * time.Minute))
	writeErr := make(chan error, 1)
	go func() {
		_, err := conn.Write(payload)
		writeErr <- err
	}()
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(conn, got); err != nil {
		return err
	}
	if err := <-writeErr; err != nil {
		return err
	}
	if !bytes.Equal(got, payload) {
		return errors.New("echoed bytes differ from the bytes sent")
	}
	return nil
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestForwardCarriesBytesOnParallelConnections(t *testing.T) {
	s := testenv.StartSSHD(t)
	// The short test keepalive interval stays: a connection pumping 16 MiB is alive even
	// while a keepalive reply waits behind the data.
	m := newManager(t, baseConfig(s))
	remote := echoServer(t, s.ExportSocket(testPort))

	if err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: remote}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}
	if err := startRoundTrips(m, 4, randomBytes(t, 4<<20))(); err != nil {
		t.Fatalf("round trip through forward: %v", err)
	}
}

// startRoundTrips sends payload through the forward of testPort on n connections at once;
// wait returns the first error once all are done.
func startRoundTrips(m *tunnel.Manager, n int, payload []byte) (wait func() error) {
	errs := make(chan error, n)
	for range n {
		go func() { errs <- roundTrip(m, testPort, payload) }()
	}
	return func() error {
		var first error
		for range n {
			if err := <-errs; err != nil && first == nil {
				first = err
			}
		}
		return first
	}
}

// TestForwardIsPrivate: the forward listens on a unix socket in a 0700 directory and
// nowhere on TCP, so another local user cannot write to the export behind it (as the
// outside review did with qemu-io on the old 127.0.0.1 listener).
func TestForwardIsPrivate(t *testing.T) {
	s := testenv.StartSSHD(t)
	qemuIO := testenv.RequireCommand(t, "qemu-io")
	nbdSocket := startQemuNBD(t, s.ExportSocket(testPort))
	m := newManager(t, baseConfig(s))
	before := testenv.TCPListenersOf(t, os.Getpid())
	if err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: nbdSocket}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}
	if after := testenv.TCPListenersOf(t, os.Getpid()); len(after) > len(before) {
		t.Fatalf("EnsureForwards opened a TCP listener: %v, before %v", after, before)
	}
	dir := filepath.Dir(m.SocketPath(testPort))
	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o700 {
		t.Fatalf("forward socket directory %s has mode %v, want 0700", dir, st.Mode().Perm())
	}
	uri := "nbd+unix:///disk?socket=" + m.SocketPath(testPort)
	write := []string{"-f", "raw", "-c", "write -P 0xab 0 64k", uri}
	out, err := testenv.RunAs(t, "nobody", qemuIO, write...)
	if err == nil {
		t.Fatalf("user nobody wrote to the export through the forward:\n%s", out)
	}
	if !strings.Contains(strings.ToLower(out), "permission denied") {
		t.Fatalf("user nobody's write failed for another reason than permissions: %v\n%s", err, out)
	}
	// The same write as the forward's owner goes through: the refusal above is the guard.
	if out, err := exec.Command(qemuIO, write...).CombinedOutput(); err != nil {
		t.Fatalf("write through the forward as its owner: %v\n%s", err, out)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("socket directory %s still there after Close (stat: %v)", dir, err)
	}
}

func TestHalfCloseIsPassedOn(t *testing.T) {
	s := testenv.StartSSHD(t)
	m := newManager(t, baseConfig(s))
	remote := echoServer(t, s.ExportSocket(testPort))
	if err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: remote}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}
	conn, err := dialForward(m, testPort)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Minute))
	if _, err := conn.Write([]byte("last words")); err != nil {
		t.Fatal(err)
	}
	if err := conn.(*net.UnixConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	// The echo server sees EOF only if the half-close crossed the tunnel; it then closes,
	// so ReadAll ends.
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("read after half-close: %v", err)
	}
	if string(got) != "last words" {
		t.Fatalf("got %q after half-close, want %q", got, "last words")
	}
}

func TestEnsureForwardsIsIdempotent(t *testing.T) {
	s := testenv.StartSSHD(t)
	m := newManager(t, baseConfig(s))
	remote := echoServer(t, s.ExportSocket(testPort))
	fw := []tunnel.Forward{{Port: testPort, Remote: remote}}
	ctx := testContext(t)

	for i := range 3 {
		if err := m.EnsureForwards(ctx, fw); err != nil {
			t.Fatalf("EnsureForwards call %d: %v", i+1, err)
		}
	}
	if got := m.Forwards(); len(got) != 1 || got[0] != fw[0] {
		t.Fatalf("Forwards() = %v, want %v", got, fw)
	}
	if err := roundTrip(m, testPort, []byte("still one forward")); err != nil {
		t.Fatalf("round trip: %v", err)
	}

	err := m.EnsureForwards(ctx, []tunnel.Forward{{Port: testPort, Remote: remote + ".other"}})
	if err == nil || !strings.Contains(err.Error(), "already forwarded to hub socket") {
		t.Fatalf("re-pointing a forwarded port: got %v, want an 'already forwarded' error", err)
	}
}

func TestRelativeHubSocketIsClearError(t *testing.T) {
	s := testenv.StartSSHD(t)
	m := newManager(t, baseConfig(s))
	err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: "exports/port-10100.sock"}})
	if err == nil || !strings.Contains(err.Error(), "not an absolute path") {
		t.Fatalf("EnsureForwards with a relative hub socket: %v, want a 'not an absolute path' error", err)
	}
	if len(m.Forwards()) != 0 {
		t.Fatalf("a failed forward was recorded: %v", m.Forwards())
	}
}

func TestDropForwardsClosesListenerAndLiveConnections(t *testing.T) {
	s := testenv.StartSSHD(t)
	m := newManager(t, baseConfig(s))
	remote := echoServer(t, s.ExportSocket(testPort))
	if err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: remote}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}
	live, err := dialForward(m, testPort)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	_ = live.SetDeadline(time.Now().Add(time.Minute))
	if _, err := live.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(live, make([]byte, 1)); err != nil {
		t.Fatalf("echo before drop: %v", err)
	}

	m.DropForwards([]int{testPort})
	m.DropForwards([]int{testPort, testPort + 1}) // idempotent, unknown ports ignored

	if n, err := live.Read(make([]byte, 1)); err == nil {
		t.Fatalf("live connection still open after drop (read %d bytes)", n)
	}
	if conn, err := dialForward(m, testPort); err == nil {
		conn.Close()
		t.Fatal("forward socket still accepts after drop")
	}
	if len(m.Forwards()) != 0 {
		t.Fatalf("Forwards() after drop = %v", m.Forwards())
	}
}

func writeKnownHosts(t testing.TB, addr string, key ssh.PublicKey) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "known_hosts")
	if err := os.WriteFile(path, []byte(knownhosts.Line([]string{addr}, key)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func newEd25519(t testing.TB) (ssh.PublicKey, []byte) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	return sshPub, pem.EncodeToMemory(block)
}

func TestWrongHostKeyIsTypedError(t *testing.T) {
	s := testenv.StartSSHD(t)
	impostor, _ := newEd25519(t)
	cfg := baseConfig(s)
	cfg.KnownHostsFile = writeKnownHosts(t, s.Addr, impostor)
	m := newManager(t, cfg)

	err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: s.ExportSocket(testPort)}})
	var hostKeyErr *tunnel.HostKeyError
	if !errors.As(err, &hostKeyErr) {
		t.Fatalf("EnsureForwards error %v is not a *tunnel.HostKeyError", err)
	}
	if hostKeyErr.Unknown {
		t.Fatal("mismatch reported as unknown host")
	}
	msg := err.Error()
	for _, want := range []string{s.Addr, "does not match known_hosts", cfg.KnownHostsFile, ssh.FingerprintSHA256(s.HostPublicKey)} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not mention %q", msg, want)
		}
	}
	if len(m.Forwards()) != 0 {
		t.Fatalf("forward opened despite the host key error: %v", m.Forwards())
	}
}

func TestUnknownHostIsTypedError(t *testing.T) {
	s := testenv.StartSSHD(t)
	cfg := baseConfig(s)
	// The right key, but for another port: the host as dialled is not known.
	cfg.KnownHostsFile = writeKnownHosts(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Port+1)), s.HostPublicKey)
	m := newManager(t, cfg)

	err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: s.ExportSocket(testPort)}})
	var hostKeyErr *tunnel.HostKeyError
	if !errors.As(err, &hostKeyErr) || !hostKeyErr.Unknown {
		t.Fatalf("EnsureForwards error %v is not an unknown-host *tunnel.HostKeyError", err)
	}
	if !strings.Contains(err.Error(), "is not in known_hosts") {
		t.Fatalf("error %q does not say the host is not in known_hosts", err)
	}
}

func TestRefusedLoginNamesUserAndKey(t *testing.T) {
	s := testenv.StartSSHD(t)
	_, strangerKey := newEd25519(t)
	keyPath := filepath.Join(t.TempDir(), "stranger")
	if err := os.WriteFile(keyPath, strangerKey, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := baseConfig(s)
	cfg.KeyFile = keyPath
	m := newManager(t, cfg)

	err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: s.ExportSocket(testPort)}})
	if err == nil || !strings.Contains(err.Error(), "ssh login to "+s.Addr+" as "+s.User) || !strings.Contains(err.Error(), keyPath) {
		t.Fatalf("refused login error %v does not name address, user and key file", err)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	s := testenv.StartSSHD(t)
	_, encrypted := newEncryptedKey(t)
	encPath := filepath.Join(t.TempDir(), "encrypted")
	if err := os.WriteFile(encPath, encrypted, 0o600); err != nil {
		t.Fatal(err)
	}
	_, plain := newEd25519(t)
	openPath := filepath.Join(t.TempDir(), "world-readable")
	if err := os.WriteFile(openPath, plain, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(openPath, 0o644); err != nil { // past the umask
		t.Fatal(err)
	}
	cases := map[string]struct {
		edit func(*tunnel.Config)
		want string
	}{
		"missing user":         {func(c *tunnel.Config) { c.User = "" }, "required"},
		"address without port": {func(c *tunnel.Config) { c.Addr = "127.0.0.1" }, "ssh address"},
		"unreadable key":       {func(c *tunnel.Config) { c.KeyFile = "/nonexistent/key" }, "read ssh key"},
		"passphrase key":       {func(c *tunnel.Config) { c.KeyFile = encPath }, "passphrase-protected"},
		"key others can read":  {func(c *tunnel.Config) { c.KeyFile = openPath }, "ssh key " + openPath + " has mode 0644: group or others may access it"},
		"missing known_hosts":  {func(c *tunnel.Config) { c.KnownHostsFile = "/nonexistent/known_hosts" }, "read known_hosts"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			cfg := baseConfig(s)
			tc.edit(&cfg)
			_, err := tunnel.New(cfg, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func newEncryptedKey(t testing.TB) (ssh.PublicKey, []byte) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	block, err := ssh.MarshalPrivateKeyWithPassphrase(priv, "", []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	return sshPub, pem.EncodeToMemory(block)
}

func eventually(t testing.TB, within time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not within %s: %v", what, within, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestForwardSurvivesSSHDRestart(t *testing.T) {
	s := testenv.StartSSHD(t)
	m := newManager(t, baseConfig(s))
	remote := echoServer(t, s.ExportSocket(testPort))
	if err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: remote}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}
	live, err := dialForward(m, testPort)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	if _, err := live.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	_ = live.SetDeadline(time.Now().Add(time.Minute))
	if _, err := io.ReadFull(live, make([]byte, 1)); err != nil {
		t.Fatalf("echo before restart: %v", err)
	}

	s.Restart()

	// The connection carried by the dead SSH connection ends.
	if _, err := io.ReadFull(live, make([]byte, 1)); err == nil {
		t.Fatal("a connection over the killed SSH connection still reads")
	}
	// New connections on the same listener go over the redialled SSH connection.
	eventually(t, time.Minute, "forward working after sshd restart", func() error {
		return roundTrip(m, testPort, []byte("after restart"))
	})
}

func TestForwardWaitsOutSSHDOutage(t *testing.T) {
	s := testenv.StartSSHD(t)
	// The proxy counts the manager's connection attempts; it closes those it cannot relay.
	proxy := startLinkProxy(t, s.Addr, 0)
	cfg := baseConfig(s)
	cfg.Addr = proxy.addr()
	cfg.KnownHostsFile = writeKnownHosts(t, proxy.addr(), s.HostPublicKey)
	m := newManager(t, cfg)
	remote := echoServer(t, s.ExportSocket(testPort))
	if err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: remote}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}
	s.Stop()
	// Several failed redials with backoff while the hub is gone.
	eventually(t, time.Minute, "three failed redials", func() error {
		if got := proxy.accepted.Load(); got < 4 {
			return fmt.Errorf("%d connection attempts so far", got)
		}
		return nil
	})
	if err := roundTrip(m, testPort, []byte("hub down")); err == nil {
		t.Fatal("round trip succeeded with sshd stopped")
	}
	s.Restart()
	eventually(t, time.Minute, "forward working after sshd came back", func() error {
		return roundTrip(m, testPort, []byte("hub back"))
	})
}

// linkProxy relays TCP to a target like a network link. It can silently stop relaying on
// the connections it holds, like a NAT or firewall that dropped its state: nothing is
// closed, nothing arrives; connections made after a freeze are relayed normally. With a
// rate, it delivers the target's bytes no faster than that, like a slow link.
type linkProxy struct {
	listener net.Listener
	rate     int // bytes per second from the target; 0: unlimited
	accepted atomic.Int32
	returned atomic.Int64 // bytes delivered from the target

	mu      sync.Mutex
	target  string
	conns   []net.Conn
	wg      sync.WaitGroup
	current *atomic.Bool
}

func startLinkProxy(t testing.TB, target string, rate int) *linkProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &linkProxy{listener: l, target: target, rate: rate, current: new(atomic.Bool)}
	t.Cleanup(func() {
		l.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	p.wg.Add(1)
	go p.serve()
	return p
}

func (p *linkProxy) addr() string { return p.listener.Addr().String() }

// retarget relays connections made from now on to another server.
func (p *linkProxy) retarget(target string) {
	p.mu.Lock()
	p.target = target
	p.mu.Unlock()
}

func (p *linkProxy) freeze() {
	p.mu.Lock()
	p.current.Store(true)
	p.current = new(atomic.Bool)
	p.mu.Unlock()
}

func (p *linkProxy) serve() {
	defer p.wg.Done()
	for {
		in, err := p.listener.Accept()
		if err != nil {
			return
		}
		p.accepted.Add(1)
		p.mu.Lock()
		target := p.target
		p.mu.Unlock()
		out, err := net.Dial("tcp", target)
		if err != nil {
			in.Close()
			continue
		}
		p.mu.Lock()
		frozen := p.current
		p.conns = append(p.conns, in, out)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.relay(out, in, frozen, 0, nil)
		go p.relay(in, out, frozen, p.rate, &p.returned)
	}
}

func (p *linkProxy) relay(dst, src net.Conn, frozen *atomic.Bool, rate int, delivered *atomic.Int64) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	if rate > 0 {
		buf = buf[:min(len(buf), rate/64)] // small steps keep the trickle steady
	}
	start := time.Now()
	var sent int64
	for {
		n, err := src.Read(buf)
		if err != nil {
			dst.Close()
			return
		}
		if frozen.Load() {
			continue
		}
		if rate > 0 {
			// The link's pace, not synchronisation: bytes leave no sooner than the rate allows.
			sent += int64(n)
			time.Sleep(time.Until(start.Add(time.Duration(sent) * time.Second / time.Duration(rate))))
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			src.Close()
			return
		}
		if delivered != nil {
			delivered.Add(int64(n))
		}
	}
}

func TestKeepaliveDetectsSilentlyDeadConnection(t *testing.T) {
	s := testenv.StartSSHD(t)
	proxy := startLinkProxy(t, s.Addr, 0)
	cfg := baseConfig(s)
	cfg.Addr = proxy.addr()
	cfg.KnownHostsFile = writeKnownHosts(t, proxy.addr(), s.HostPublicKey)
	cfg.KeepaliveInterval = 300 * time.Millisecond // and the default KeepaliveCountMax
	m := newManager(t, cfg)
	remote := echoServer(t, s.ExportSocket(testPort))
	if err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: remote}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}
	if got := proxy.accepted.Load(); got != 1 {
		t.Fatalf("proxy accepted %d connections before the freeze, want 1", got)
	}

	proxy.freeze()

	// Without any forwarded traffic, only the keepalive can notice the dead connection and
	// make the manager dial again: within five intervals, bounded here generously.
	eventually(t, time.Minute, "redial after silent connection death", func() error {
		if got := proxy.accepted.Load(); got < 2 {
			return errors.New("no new ssh connection yet")
		}
		return nil
	})
	if err := roundTrip(m, testPort, []byte("over the new connection")); err != nil {
		t.Fatalf("round trip after redial: %v", err)
	}
}

// TestKeepaliveKeepsBusySlowConnection is a slow link carrying more data than it drains in
// several keepalive intervals: a keepalive reply waits behind that data far longer than
// KeepaliveCountMax intervals, yet the bytes arriving meanwhile prove the connection alive.
// Declaring it dead (as the tunnel once did after one interval) would break the transfers
// and make the manager dial again.
func TestKeepaliveKeepsBusySlowConnection(t *testing.T) {
	s := testenv.StartSSHD(t)
	const rate = 1 << 20 // bytes per second from the hub
	proxy := startLinkProxy(t, s.Addr, rate)
	cfg := baseConfig(s)
	cfg.Addr = proxy.addr()
	cfg.KnownHostsFile = writeKnownHosts(t, proxy.addr(), s.HostPublicKey)
	cfg.KeepaliveInterval = 500 * time.Millisecond
	cfg.KeepaliveCountMax = 3
	// Two SSH connections carrying four bulk echoes each: the small echo lands behind bulk
	// data whichever it takes, and each connection's keepalive must tolerate the wait.
	cfg.Connections = 2
	m := newManager(t, cfg)
	remote := echoServer(t, s.ExportSocket(testPort))
	if err := m.EnsureForwards(testContext(t), []tunnel.Forward{{Port: testPort, Remote: remote}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}

	wait := startRoundTrips(m, 4*cfg.Connections, randomBytes(t, 2<<20))

	// The premise: while the bulk echoes queue on the link, a reply waits longer than the
	// keepalive would have tolerated of a silent connection. A small echo on a channel of
	// its own measures that wait; a slower machine only makes it longer.
	began := proxy.returned.Load()
	eventually(t, time.Minute, "bulk echoes queued on the link", func() error {
		if got := proxy.returned.Load() - began; got < 1<<20 {
			return fmt.Errorf("%d bytes echoed so far", got)
		}
		return nil
	})
	start := time.Now()
	if err := roundTrip(m, testPort, []byte("behind the queue")); err != nil {
		t.Fatalf("small round trip behind the bulk: %v", err)
	}
	waited := time.Since(start)
	tolerated := time.Duration(cfg.KeepaliveCountMax) * cfg.KeepaliveInterval
	t.Logf("a reply waited %s behind the queued data; a silent connection is dropped after %s", waited, tolerated)
	// Without the premise the test would pass on the old keepalive too; load only lengthens
	// the wait, so this cannot fail on a busy machine.
	if waited <= tolerated {
		t.Fatalf("premise not met: a reply waited only %s behind the queued data, not longer than %s", waited, tolerated)
	}

	if err := wait(); err != nil {
		t.Fatalf("bulk round trip over the slow link: %v", err)
	}
	if got := proxy.accepted.Load(); got != int32(cfg.Connections) {
		t.Fatalf("the manager dialled %d times for a pool of %d: a busy connection was dropped", got, cfg.Connections)
	}
	if waited <= tolerated {
		t.Fatalf("test premise not met: the reply waited %s, not more than %s", waited, tolerated)
	}
}

// startQemuNBD serves a fresh raw image on a unix socket, as the hub does, and returns
// the socket's path.
func startQemuNBD(t testing.TB, sock string) string {
	t.Helper()
	bin := testenv.RequireCommand(t, "qemu-nbd")
	image := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(image, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(image, 1<<20); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--persistent", "--shared=4", "--format=raw", "--socket="+sock,
		"--export-name=disk", image)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu-nbd: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	eventually(t, time.Minute, "qemu-nbd listening", func() error {
		select {
		case <-exited:
			t.Fatalf("qemu-nbd exited: %s", stderr.String())
		default:
		}
		conn, err := net.Dial("unix", sock)
		if err != nil {
			return err
		}
		return conn.Close()
	})
	return sock
}

func TestHealthHandshakesWithNBDServerThroughForward(t *testing.T) {
	s := testenv.StartSSHD(t)
	nbdSocket := startQemuNBD(t, s.ExportSocket(testPort))
	m := newManager(t, baseConfig(s))
	ctx := testContext(t)
	if err := m.EnsureForwards(ctx, []tunnel.Forward{{Port: testPort, Remote: nbdSocket}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}
	// Repeated checks must not use up qemu-nbd's --shared client slots.
	start := time.Now()
	const checks = 6
	for i := range checks {
		if err := m.Health(ctx, testPort); err != nil {
			t.Fatalf("Health check %d through forward to qemu-nbd: %v", i+1, err)
		}
	}
	t.Logf("NBD handshake through the tunnel: %v each", time.Since(start)/checks)
}

func TestHealthFailsClearly(t *testing.T) {
	s := testenv.StartSSHD(t)
	m := newManager(t, baseConfig(s))
	ctx := testContext(t)

	// Nothing serves the hub socket: sshd refuses the channel.
	const refusedPort, echoPort = testPort, testPort + 1
	nothing := s.ExportSocket(refusedPort)
	// Not NBD: the echo server sends no greeting, so the check times out.
	if err := m.EnsureForwards(ctx, []tunnel.Forward{
		{Port: refusedPort, Remote: nothing},
		{Port: echoPort, Remote: echoServer(t, s.ExportSocket(echoPort))},
	}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}

	err := m.Health(ctx, refusedPort)
	if !errors.Is(err, tunnel.ErrRefused) || !strings.Contains(err.Error(), "forward failed") || !strings.Contains(err.Error(), nothing) {
		t.Fatalf("Health to a missing hub socket: %v, want the channel refusal named", err)
	}

	shortCtx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	if err := m.Health(shortCtx, echoPort); err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Health to a silent server: %v, want a deadline error", err)
	}

	if err := m.Health(ctx, testPort+2); err == nil || !strings.Contains(err.Error(), "not forwarded") {
		t.Fatalf("Health on a port the manager does not forward: %v", err)
	}
}

func TestCloseStopsEverything(t *testing.T) {
	s := testenv.StartSSHD(t)
	m := newManager(t, baseConfig(s))
	ctx := testContext(t)
	remote := echoServer(t, s.ExportSocket(testPort))
	if err := m.EnsureForwards(ctx, []tunnel.Forward{{Port: testPort, Remote: remote}}); err != nil {
		t.Fatalf("EnsureForwards: %v", err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if conn, err := dialForward(m, testPort); err == nil {
		conn.Close()
		t.Fatal("forward still listening after Close")
	}
	if err := m.EnsureForwards(ctx, []tunnel.Forward{{Port: testPort, Remote: remote}}); !errors.Is(err, tunnel.ErrClosed) {
		t.Fatalf("EnsureForwards after Close: %v, want ErrClosed", err)
	}
}

// BenchmarkForwardThroughput measures one forwarded connection over loopback: the
// tunnel's own ceiling (crypto and copying), far above the 100 Mbit WAN target.
func BenchmarkForwardThroughput(b *testing.B) {
	s := testenv.StartSSHD(b)
	cfg := baseConfig(s)
	cfg.KeepaliveInterval = time.Minute
	m := newManager(b, cfg)
	sinkPath := s.ExportSocket(testPort)
	sink, err := net.Listen("unix", sinkPath)
	if err != nil {
		b.Fatal(err)
	}
	defer sink.Close()
	received := make(chan int64, 1)
	go func() {
		conn, err := sink.Accept()
		if err != nil {
			received <- 0
			return
		}
		defer conn.Close()
		n, _ := io.Copy(io.Discard, conn)
		received <- n
	}()
	if err := m.EnsureForwards(context.Background(), []tunnel.Forward{{Port: testPort, Remote: sinkPath}}); err != nil {
		b.Fatal(err)
	}
	conn, err := dialForward(m, testPort)
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	for range b.N {
		if _, err := conn.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	_ = conn.(*net.UnixConn).CloseWrite()
	if n := <-received; n != int64(b.N)*int64(len(chunk)) {
		b.Fatalf("sink received %d bytes, want %d", n, int64(b.N)*int64(len(chunk)))
	}
	b.StopTimer()
	conn.Close()
}

// BenchmarkForwardFirstByte measures a new forwarded connection up to the server's first
// bytes (an NBD-sized greeting): the channel open plus one reply, where a Nagle/delayed-ACK
// stall would add ~40 ms.
func BenchmarkForwardFirstByte(b *testing.B) {
	s := testenv.StartSSHD(b)
	cfg := baseConfig(s)
	cfg.KeepaliveInterval = time.Minute
	m := newManager(b, cfg)
	greeterPath := s.ExportSocket(testPort)
	greeter, err := net.Listen("unix", greeterPath)
	if err != nil {
		b.Fatal(err)
	}
	defer greeter.Close()
	go func() {
		for {
			conn, err := greeter.Accept()
			if err != nil {
				return
			}
			_, _ = conn.Write([]byte("NBDMAGICIHAVEOPT\x00\x03"))
			go func() {
				_, _ = io.Copy(io.Discard, conn)
				conn.Close()
			}()
		}
	}()
	if err := m.EnsureForwards(context.Background(), []tunnel.Forward{{Port: testPort, Remote: greeterPath}}); err != nil {
		b.Fatal(err)
	}
	greeting := make([]byte, 18)
	b.ResetTimer()
	for range b.N {
		conn, err := dialForward(m, testPort)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(conn, greeting); err != nil {
			b.Fatal(err)
		}
		conn.Close()
	}
}
