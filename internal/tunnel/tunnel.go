// Package tunnel keeps SSH local forwards from the SNA to the hub's exports: a unix socket
// in a private 0700 directory on the SNA, one per export port P, reaches the unix socket
// the hub's qemu-nbd serves export P on, through a direct-streamlocal@openssh.com channel.
// Neither end listens on TCP, so no other local process reaches an export. A small pool
// of SSH connections (Config.Connections) carries the forwards: sshd handles each
// connection in one single-threaded process, so one connection caps the tunnel at one
// core's crypto, and each new forwarded connection takes the pooled SSH connection with
// the fewest channels. Every SSH connection is dialled with the same pinned host key and
// account, on first use; keepalives detect a dead one (silent for several intervals; one
// still delivering data is alive) and it is redialled with backoff, so forwards outlive
// an sshd restart or a network outage (connections open at the time die, new ones use
// the redialled SSH connections).
//
// The hub's host key is pinned through a known_hosts file; there is no insecure mode.
package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// Defaults for the zero values of Config.
const (
	DefaultKeepaliveInterval = 15 * time.Second
	DefaultKeepaliveCountMax = 3
	DefaultDialTimeout       = 10 * time.Second
	DefaultMaxBackoff        = 30 * time.Second
	// DefaultConnections: sshd runs each connection in one process on one core, ~1.7-2 s
	// of CPU per GB here (500-600 MB/s), so two connections are the fewest that pass
	// 1 GB/s on a hub with the cores; on the 2-core rig two also measured fastest, more
	// only cost sshd CPU (docs/architecture.md, "The SSH tunnel's ceiling").
	DefaultConnections = 2
)

// DefaultCiphers is the cipher preference offered to the hub, by measurement
// (docs/security.md): AES-GCM runs on the AES instructions of both ends.
func DefaultCiphers() []string {
	return []string{ssh.CipherAES128GCM, ssh.CipherAES256GCM, ssh.CipherChaCha20Poly1305}
}

// copyBufferSize is the buffer per direction of a forwarded connection. An SSH channel
// delivers at most one 32 KiB packet per read, so larger buffers buy little; the 2 MiB
// channel window of both x/crypto/ssh and OpenSSH (64 packets) is what keeps a
// 100 Mbit/20 ms link (250 KB in flight) full.
const copyBufferSize = 128 << 10

// Config says where the hub's sshd is and how to log in.
type Config struct {
	Addr           string // host:port of the hub's sshd
	User           string
	KeyFile        string // private key in OpenSSH or PEM format, without passphrase
	KnownHostsFile string // must hold the hub's host key for Addr
	// SocketDir is where New makes the manager's private 0700 directory of forward
	// sockets (removed by Close). Default os.TempDir().
	SocketDir string

	// KeepaliveInterval is how often a keepalive@openssh.com request checks the connection.
	// Default DefaultKeepaliveInterval.
	KeepaliveInterval time.Duration
	// KeepaliveCountMax is how many intervals in a row a keepalive may wait for its reply
	// with nothing else arriving from the hub either before the connection is declared dead
	// (as OpenSSH's ServerAliveCountMax). Data arriving proves life as well as a reply, so a
	// busy connection is never dropped for a reply queued behind it. Default
	// DefaultKeepaliveCountMax.
	KeepaliveCountMax int
	// DialTimeout bounds TCP connect plus SSH handshake, and how long a new forwarded
	// connection waits for the SSH connection to come back. Default DefaultDialTimeout.
	DialTimeout time.Duration
	// MaxBackoff caps the wait between reconnect attempts. Default DefaultMaxBackoff.
	MaxBackoff time.Duration
	// Connections is how many SSH connections to the hub carry the forwards. Default
	// DefaultConnections.
	Connections int
	// Ciphers is the cipher preference offered to the hub; only x/crypto/ssh's secure
	// ciphers are accepted. Default DefaultCiphers().
	Ciphers []string
}

// Forward makes the hub's export socket Remote reachable on the SNA at SocketPath(Port).
// Port is the export's port lease on the hub, its identity; nothing listens on it.
type Forward struct {
	Port   int    `json:"port"`
	Remote string `json:"remote"` // absolute path of the export's unix socket on the hub
}

// ErrRefused says the hub's sshd refused the channel to an export socket: nothing serves
// it (the export is not running), or the account may not open it.
var ErrRefused = errors.New("hub refused the channel")

// HostKeyError says the hub presented a host key known_hosts does not vouch for.
type HostKeyError struct {
	Host           string // the address dialled
	KnownHostsFile string
	Key            ssh.PublicKey // the key the server presented
	Unknown        bool          // the host has no entry at all (else: entries exist, none match)
}

func (e *HostKeyError) Error() string {
	presented := e.Key.Type() + " " + ssh.FingerprintSHA256(e.Key)
	if e.Unknown {
		return fmt.Sprintf("ssh host %s is not in known_hosts %s (it presented %s); add a line for %s to pin it",
			e.Host, e.KnownHostsFile, presented, knownhosts.Normalize(e.Host))
	}
	return fmt.Sprintf("ssh host key of %s (%s) does not match known_hosts %s: possible man-in-the-middle or a re-keyed hub",
		e.Host, presented, e.KnownHostsFile)
}

// ErrClosed is returned by a Manager after Close.
var ErrClosed = errors.New("tunnel manager closed")

// Manager owns a pool of SSH connections to the hub and the forwards over them. Its
// methods are safe for concurrent use.
type Manager struct {
	cfg       Config
	log       *slog.Logger
	signer    ssh.Signer
	hostKeys  ssh.HostKeyCallback
	hostAlgos []string

	ctx    context.Context // cancelled by Close; bounds every background goroutine
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	closed    bool
	slots     []*slot          // the pool, Config.Connections long
	forwards  map[int]*forward // by port
	socketDir string           // private directory of the forward sockets
}

// slot is one place in the pool: an SSH connection while one is up, and the dials and
// reconnects that keep it so. Its fields are guarded by Manager.mu.
type slot struct {
	id           int
	client       *sshConn      // nil while not connected
	dialing      chan struct{} // closed when the running dial ends; nil when none runs
	dialErr      error         // outcome of the last dial
	down         bool          // the last dial failed or the connection died; not back yet
	reconnecting bool
	channels     int // forwarded connections assigned to this slot and not yet ended
}

// sshConn is one SSH connection, closed exactly once by whoever gives up on it first.
type sshConn struct {
	*ssh.Client
	once sync.Once
}

func (c *sshConn) close() {
	c.once.Do(func() { _ = c.Client.Close() })
}

// New checks the configuration and reads the key and known_hosts; it does not connect.
// The first EnsureForwards dials.
func New(cfg Config, log *slog.Logger) (*Manager, error) {
	if cfg.Addr == "" || cfg.User == "" || cfg.KeyFile == "" || cfg.KnownHostsFile == "" {
		return nil, errors.New("tunnel config: Addr, User, KeyFile and KnownHostsFile are required")
	}
	if _, _, err := net.SplitHostPort(cfg.Addr); err != nil {
		return nil, fmt.Errorf("tunnel config: ssh address %q: %w", cfg.Addr, err)
	}
	if cfg.KeepaliveInterval <= 0 {
		cfg.KeepaliveInterval = DefaultKeepaliveInterval
	}
	if cfg.KeepaliveCountMax <= 0 {
		cfg.KeepaliveCountMax = DefaultKeepaliveCountMax
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = DefaultMaxBackoff
	}
	if cfg.Connections <= 0 {
		cfg.Connections = DefaultConnections
	}
	if len(cfg.Ciphers) == 0 {
		cfg.Ciphers = DefaultCiphers()
	}
	for _, c := range cfg.Ciphers {
		if !slices.Contains(secureCiphers(), c) {
			return nil, fmt.Errorf("tunnel config: cipher %q is not one of %v", c, secureCiphers())
		}
	}
	if log == nil {
		log = slog.Default()
	}

	keyPEM, err := readPrivateKey(cfg.KeyFile)
	if err != nil {
		return nil, err
	}
	signer, err := ssh.ParsePrivateKey(keyPEM)
	if err != nil {
		var missing *ssh.PassphraseMissingError
		if errors.As(err, &missing) {
			return nil, fmt.Errorf("ssh key %s is passphrase-protected; the tunnel needs an unencrypted key file (mode 0600)", cfg.KeyFile)
		}
		return nil, fmt.Errorf("parse ssh key %s: %w", cfg.KeyFile, err)
	}
	hostKeys, err := knownhosts.New(cfg.KnownHostsFile)
	if err != nil {
		return nil, fmt.Errorf("read known_hosts %s: %w", cfg.KnownHostsFile, err)
	}
	// Without an entry for the host this stays nil; the handshake then fails with an
	// unknown-host HostKeyError, which is where callers look for it.
	algos := hostKeyAlgorithms(hostKeys, cfg.Addr)
	// MkdirTemp makes it 0700: only this user reaches the forwards.
	socketDir, err := os.MkdirTemp(cfg.SocketDir, "diskferry-tunnel-")
	if err != nil {
		return nil, fmt.Errorf("tunnel socket directory: %w", err)
	}

	slots := make([]*slot, cfg.Connections)
	for i := range slots {
		slots[i] = &slot{id: i}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Manager{
		cfg:       cfg,
		log:       log.With("component", "tunnel", "hub", cfg.Addr),
		signer:    signer,
		hostKeys:  hostKeys,
		hostAlgos: algos,
		ctx:       ctx,
		cancel:    cancel,
		slots:     slots,
		forwards:  map[int]*forward{},
		socketDir: socketDir,
	}, nil
}

// secureCiphers are the ciphers x/crypto/ssh implements that OpenSSH also considers secure.
func secureCiphers() []string {
	return ssh.SupportedAlgorithms().Ciphers
}

// CheckKeyMode refuses a private key file that group or others may access, as ssh does.
func CheckKeyMode(path string, mode fs.FileMode) error {
	if perm := mode.Perm(); perm&0o077 != 0 {
		return fmt.Errorf("ssh key %s has mode %04o: group or others may access it; make it 0600 (chmod 600 %s)", path, perm, path)
	}
	return nil
}

// readPrivateKey reads the key file, refusing it, as ssh does, when its owner is not the
// only one who may read it.
func readPrivateKey(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read ssh key: %w", err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read ssh key: %w", err)
	}
	if err := CheckKeyMode(path, info.Mode()); err != nil {
		return nil, err
	}
	key, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("read ssh key %s: %w", path, err)
	}
	return key, nil
}

// hostKeyAlgorithms lists the algorithms of the keys known_hosts holds for addr, so the
// handshake asks for a key that can be verified rather than whichever the server prefers.
func hostKeyAlgorithms(hostKeys ssh.HostKeyCallback, addr string) []string {
	// Checking a key that cannot match makes knownhosts list the keys it does hold.
	probe := probeKey{}
	var keyErr *knownhosts.KeyError
	if err := hostKeys(addr, &net.TCPAddr{IP: net.IPv4zero}, probe); !errors.As(err, &keyErr) {
		return nil
	}
	var algos []string
	seen := map[string]bool{}
	for _, known := range keyErr.Want {
		for _, algo := range algorithmsForKeyType(known.Key.Type()) {
			if !seen[algo] {
				seen[algo] = true
				algos = append(algos, algo)
			}
		}
	}
	return algos
}

func algorithmsForKeyType(keyType string) []string {
	if keyType == ssh.KeyAlgoRSA {
		return []string{ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, ssh.KeyAlgoRSA}
	}
	return []string{keyType}
}

// probeKey is a public key no known_hosts line can hold.
type probeKey struct{}

func (probeKey) Type() string                        { return "diskferry-probe" }
func (probeKey) Marshal() []byte                     { return []byte("diskferry-probe") }
func (probeKey) Verify([]byte, *ssh.Signature) error { return errors.New("probe key verifies nothing") }

// SocketPath is the unix socket on which the forward of an export port listens.
func (m *Manager) SocketPath(port int) string {
	return filepath.Join(m.socketDir, "port-"+strconv.Itoa(port)+".sock")
}

// EnsureForwards makes each forward listen on SocketPath(Port). Forwards already in place
// are kept, so a retried call is harmless. It dials the hub first when not connected, so
// a wrong host key or refused login is returned here. A port already forwarded to a
// different hub socket is an error; forwards made before the error stay.
func (m *Manager) EnsureForwards(ctx context.Context, forwards []Forward) error {
	if err := m.connected(ctx); err != nil {
		return err
	}
	for _, f := range forwards {
		if err := m.ensure(f); err != nil {
			return err
		}
	}
	return nil
}

func (m *Manager) ensure(f Forward) error {
	if f.Port <= 0 || f.Port > 65535 {
		return fmt.Errorf("forward of port %d: port out of range", f.Port)
	}
	if !filepath.IsAbs(f.Remote) {
		return fmt.Errorf("forward of port %d: hub socket %q is not an absolute path", f.Port, f.Remote)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	if existing, ok := m.forwards[f.Port]; ok {
		if existing.spec.Remote != f.Remote {
			return fmt.Errorf("port %d already forwarded to hub socket %s, not %s",
				f.Port, existing.spec.Remote, f.Remote)
		}
		return nil
	}
	path := m.SocketPath(f.Port)
	listener, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("forward of port %d: listen on %s: %w", f.Port, path, err)
	}
	fw := &forward{spec: f, listener: listener, conns: map[*pipe]struct{}{}}
	m.forwards[f.Port] = fw
	m.wg.Add(1)
	go m.serve(fw)
	m.log.Info("forward opened", "port", f.Port, "local", path, "remote", f.Remote)
	return nil
}

// DropForwards closes the listeners of the given ports and the connections they carry.
// Ports not forwarded are ignored, so it is idempotent.
func (m *Manager) DropForwards(ports []int) {
	m.mu.Lock()
	var dropped []*forward
	for _, p := range ports {
		if fw, ok := m.forwards[p]; ok {
			delete(m.forwards, p)
			dropped = append(dropped, fw)
		}
	}
	m.mu.Unlock()
	for _, fw := range dropped {
		fw.close()
		m.log.Info("forward dropped", "port", fw.spec.Port, "remote", fw.spec.Remote)
	}
}

// Forwards lists the forwards in place, by port.
func (m *Manager) Forwards() []Forward {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Forward, 0, len(m.forwards))
	for _, fw := range m.forwards {
		out = append(out, fw.spec)
	}
	slices.SortFunc(out, func(a, b Forward) int { return a.Port - b.Port })
	return out
}

// Close drops every forward, its socket directory and the SSH connections. Idempotent.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	forwards := m.forwards
	m.forwards = map[int]*forward{}
	var clients []*sshConn
	for _, s := range m.slots {
		if s.client != nil {
			clients = append(clients, s.client)
			s.client = nil
		}
	}
	m.mu.Unlock()

	m.cancel()
	for _, fw := range forwards {
		fw.close()
	}
	for _, c := range clients {
		c.close()
	}
	m.wg.Wait()
	if err := os.RemoveAll(m.socketDir); err != nil {
		return fmt.Errorf("remove tunnel socket directory: %w", err)
	}
	return nil
}

// connected returns once some SSH connection of the pool is up, dialling one when none
// is, so that a wrong host key or a refused login surfaces to the caller.
func (m *Manager) connected(ctx context.Context) error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return ErrClosed
	}
	for _, s := range m.slots {
		if s.client != nil {
			m.mu.Unlock()
			return nil
		}
	}
	s := m.best()
	m.mu.Unlock()
	_, err := m.connection(ctx, s)
	return err
}

// best is the slot a new forwarded connection should use: one that is not down, then
// the one carrying the fewest channels, then the first. m.mu must be held.
func (m *Manager) best() *slot {
	var pick *slot
	for _, s := range m.slots {
		if pick == nil || s.down != pick.down && !s.down || s.down == pick.down && s.channels < pick.channels {
			pick = s
		}
	}
	return pick
}

// connection returns the slot's live SSH connection, dialling when there is none.
// Concurrent callers share one dial, which runs on the manager's context so that one
// caller giving up does not abort it for the others.
func (m *Manager) connection(ctx context.Context, s *slot) (*sshConn, error) {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil, ErrClosed
	}
	if s.client != nil {
		c := s.client
		m.mu.Unlock()
		return c, nil
	}
	if s.dialing == nil {
		s.dialing = make(chan struct{})
		m.wg.Add(1)
		go m.dial(s, s.dialing)
	}
	done := s.dialing
	m.mu.Unlock()

	select {
	case <-done:
	case <-ctx.Done():
		return nil, fmt.Errorf("wait for ssh connection to %s: %w", m.cfg.Addr, ctx.Err())
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if s.client != nil {
		return s.client, nil
	}
	if m.closed {
		return nil, ErrClosed
	}
	return nil, s.dialErr
}

func (m *Manager) dial(s *slot, done chan struct{}) {
	defer m.wg.Done()
	client, inbound, err := m.connect(m.ctx, s.id)

	m.mu.Lock()
	s.dialing = nil
	s.dialErr = err
	switch {
	case err == nil && m.closed:
		client.close()
	case err == nil:
		s.client = client
		s.down = false
		m.wg.Add(1)
		go m.watch(s, client, inbound)
	default:
		// A slot that cannot connect heals on its own while forwards need it; meanwhile
		// new forwarded connections prefer the others.
		s.down = true
		m.startReconnect(s)
		if !m.closed {
			m.log.Warn("ssh connection failed", "conn", s.id, "err", err)
		}
	}
	m.mu.Unlock()
	close(done)
}

// startReconnect starts the slot's reconnect loop unless one runs, the manager is closed
// or no forward remains. m.mu must be held.
func (m *Manager) startReconnect(s *slot) {
	if m.closed || len(m.forwards) == 0 || s.reconnecting {
		return
	}
	s.reconnecting = true
	m.wg.Add(1)
	// Started even when Close runs meanwhile: reconnect sees it and returns, releasing the
	// WaitGroup slot taken above, which Close waits for.
	go m.reconnect(s)
}

// connect dials and logs in. The counter it returns moves whenever bytes arrive on the
// connection, which is what the keepalive watches.
func (m *Manager) connect(ctx context.Context, id int) (*sshConn, *atomic.Uint64, error) {
	dialer := net.Dialer{Timeout: m.cfg.DialTimeout, KeepAlive: 30 * time.Second}
	conn, err := dialer.DialContext(ctx, "tcp", m.cfg.Addr)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to hub sshd %s: %w", m.cfg.Addr, err)
	}
	setNoDelay(conn)
	// The handshake has no context of its own; a deadline bounds it.
	_ = conn.SetDeadline(time.Now().Add(m.cfg.DialTimeout))

	var hostKeyErr *HostKeyError
	config := &ssh.ClientConfig{
		Config:            ssh.Config{Ciphers: m.cfg.Ciphers},
		User:              m.cfg.User,
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(m.signer)},
		HostKeyAlgorithms: m.hostAlgos,
		// Every connection of the pool checks the pinned key; none trusts another's check.
		HostKeyCallback: func(host string, remote net.Addr, key ssh.PublicKey) error {
			err := m.hostKeys(host, remote, key)
			var keyErr *knownhosts.KeyError
			if errors.As(err, &keyErr) {
				hostKeyErr = &HostKeyError{Host: host, KnownHostsFile: m.cfg.KnownHostsFile, Key: key, Unknown: len(keyErr.Want) == 0}
				return hostKeyErr
			}
			return err
		},
	}
	inbound := new(atomic.Uint64)
	transport := batchWrites(countReads(quickAck(conn), inbound))
	c, chans, reqs, err := ssh.NewClientConn(transport, m.cfg.Addr, config)
	if err != nil {
		transport.Close()
		if hostKeyErr != nil {
			return nil, nil, hostKeyErr
		}
		return nil, nil, fmt.Errorf("ssh login to %s as %s with key %s: %w", m.cfg.Addr, m.cfg.User, m.cfg.KeyFile, err)
	}
	_ = conn.SetDeadline(time.Time{})
	var cipher string
	if meta, ok := c.(ssh.AlgorithmsConnMetadata); ok {
		cipher = meta.Algorithms().Write.Cipher
	}
	m.log.Info("ssh connected", "conn", id, "cipher", cipher)
	return &sshConn{Client: ssh.NewClient(c, chans, reqs)}, inbound, nil
}

// watch ends when the connection does: closed by the server, the network, a failed
// keepalive or Close. It then forgets the connection and, while forwards remain, redials.
func (m *Manager) watch(s *slot, client *sshConn, inbound *atomic.Uint64) {
	defer m.wg.Done()
	ended := make(chan error, 1)
	go func() { ended <- client.Wait() }()

	ticker := time.NewTicker(m.cfg.KeepaliveInterval)
	reason := m.keepalive(client, inbound, ticker.C, ended)
	ticker.Stop()
	client.close()

	m.mu.Lock()
	if s.client == client {
		s.client = nil
		s.down = true
	}
	if s.client == nil {
		m.startReconnect(s)
	}
	m.mu.Unlock()
	if m.ctx.Err() == nil {
		m.log.Warn("ssh connection lost", "conn", s.id, "reason", reason)
	}
}

// requester sends SSH global requests; *ssh.Client is one.
type requester interface {
	SendRequest(name string, wantReply bool, payload []byte) (bool, []byte, error)
}

// keepalive sends keepalive@openssh.com on every tick, one at a time, until the connection
// ends or a keepalive waited KeepaliveCountMax intervals in a row with nothing arriving
// from the hub, and says why it stopped. A reply may take many intervals: on a busy link it
// waits behind the data queued ahead of it, and that data arriving proves the connection
// alive just as well.
func (m *Manager) keepalive(client requester, inbound *atomic.Uint64, ticks <-chan time.Time, ended <-chan error) string {
	quiet := silence{countMax: m.cfg.KeepaliveCountMax, seen: inbound.Load()}
	var replied chan error // nil while no request is outstanding
	for {
		select {
		case err := <-ended:
			if err == nil {
				return "closed"
			}
			return err.Error()
		case <-m.ctx.Done():
			return "manager closed"
		case err := <-replied:
			replied = nil
			if err != nil {
				return "keepalive: " + err.Error()
			}
		case <-ticks:
			if quiet.tick(inbound.Load(), replied != nil) {
				return fmt.Sprintf("keepalive unanswered and nothing received from the hub for %d intervals of %s",
					m.cfg.KeepaliveCountMax, m.cfg.KeepaliveInterval)
			}
			if replied == nil {
				replied = make(chan error, 1)
				go func(replied chan<- error) {
					// OpenSSH answers an unknown global request with a failure; any answer
					// proves life. The call returns at the latest when the connection closes.
					_, _, err := client.SendRequest("keepalive@openssh.com", true, nil)
					replied <- err
				}(replied)
			}
		}
	}
}

// silence counts keepalive intervals in a row in which a keepalive was waiting for its
// reply and nothing at all arrived from the hub.
type silence struct {
	countMax int
	seen     uint64 // the inbound counter at the previous tick
	missed   int
}

// tick takes the inbound counter at the end of an interval, and whether a keepalive sent
// before the interval is still unanswered, and reports whether the connection is dead.
func (s *silence) tick(inbound uint64, awaitingReply bool) bool {
	if inbound != s.seen {
		s.seen = inbound
		s.missed = 0
		return false
	}
	if !awaitingReply {
		return false
	}
	s.missed++
	return s.missed >= s.countMax
}

// countReads wraps the SSH connection's socket so that every read that returns bytes
// moves the counter.
func countReads(conn net.Conn, inbound *atomic.Uint64) net.Conn {
	return &countingConn{Conn: conn, inbound: inbound}
}

type countingConn struct {
	net.Conn
	inbound *atomic.Uint64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.inbound.Add(1)
	}
	return n, err
}

// reconnect redials the slot with exponential backoff until connected, closed, or no
// forwards remain.
func (m *Manager) reconnect(s *slot) {
	defer m.wg.Done()
	defer func() {
		m.mu.Lock()
		s.reconnecting = false
		m.mu.Unlock()
	}()
	backoff := 250 * time.Millisecond
	for attempt := 1; ; attempt++ {
		m.mu.Lock()
		stop := m.closed || len(m.forwards) == 0
		m.mu.Unlock()
		if stop {
			return
		}
		ctx, cancel := context.WithTimeout(m.ctx, m.cfg.DialTimeout)
		_, err := m.connection(ctx, s)
		cancel()
		if err == nil {
			m.log.Info("ssh reconnected", "conn", s.id, "attempt", attempt)
			return
		}
		if m.ctx.Err() != nil {
			return
		}
		m.log.Error("ssh reconnect failed", "conn", s.id, "attempt", attempt, "retry_in", backoff, "err", err)
		select {
		case <-time.After(backoff):
		case <-m.ctx.Done():
			return
		}
		backoff = min(2*backoff, m.cfg.MaxBackoff)
	}
}

// forward is one listening local port and the connections it carries.
type forward struct {
	spec     Forward
	listener net.Listener

	mu      sync.Mutex
	closed  bool
	conns   map[*pipe]struct{}
	lastErr error // why the last connection could not reach the hub socket
}

func (f *forward) close() {
	f.listener.Close()
	f.mu.Lock()
	f.closed = true
	conns := f.conns
	f.conns = map[*pipe]struct{}{}
	f.mu.Unlock()
	for p := range conns {
		p.close()
	}
}

func (f *forward) track(p *pipe) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.conns[p] = struct{}{}
	return true
}

func (f *forward) untrack(p *pipe) {
	f.mu.Lock()
	delete(f.conns, p)
	f.mu.Unlock()
}

func (f *forward) setErr(err error) {
	f.mu.Lock()
	f.lastErr = err
	f.mu.Unlock()
}

func (f *forward) err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lastErr
}

func (m *Manager) serve(f *forward) {
	defer m.wg.Done()
	for {
		conn, err := f.listener.Accept()
		if err != nil {
			return // closed by DropForwards or Close
		}
		m.wg.Add(1)
		go m.carry(f, conn)
	}
}

// carry connects one accepted local connection to the hub socket and copies both ways.
func (m *Manager) carry(f *forward, local net.Conn) {
	defer m.wg.Done()
	p := &pipe{local: local}
	if !f.track(p) {
		local.Close()
		return
	}
	defer f.untrack(p)
	defer p.close()

	remote, release, err := m.openChannel(f.spec.Remote)
	if err != nil {
		f.setErr(err)
		m.log.Warn("forwarded connection failed", "port", f.spec.Port, "remote", f.spec.Remote, "err", err)
		return
	}
	defer release()
	f.setErr(nil)
	p.setRemote(remote)
	p.copy()
}

// openChannel opens a direct-streamlocal channel to a unix socket on the hub over the
// pooled SSH connection with the fewest channels, and returns what gives that place back.
// A connection that cannot be had or died unnoticed is given up (its slot redials) and
// the open retried once on the next best.
func (m *Manager) openChannel(target string) (net.Conn, func(), error) {
	var lastErr error
	for range 2 {
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			return nil, nil, ErrClosed
		}
		s := m.best()
		s.channels++
		m.mu.Unlock()
		release := func() {
			m.mu.Lock()
			s.channels--
			m.mu.Unlock()
		}

		remote, err := m.openOn(s, target)
		if err == nil {
			return remote, release, nil
		}
		release()
		if errors.Is(err, ErrRefused) || errors.Is(err, ErrClosed) {
			return nil, nil, err
		}
		lastErr = err
	}
	return nil, nil, lastErr
}

func (m *Manager) openOn(s *slot, target string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(m.ctx, m.cfg.DialTimeout)
	defer cancel()
	client, err := m.connection(ctx, s)
	if err != nil {
		return nil, err
	}
	remote, err := client.DialContext(ctx, "unix", target)
	if err == nil {
		return remote, nil
	}
	var refused *ssh.OpenChannelError
	if errors.As(err, &refused) {
		return nil, fmt.Errorf("%w to %s: %w", ErrRefused, target, err)
	}
	client.close()
	m.forget(s, client)
	return nil, fmt.Errorf("open channel to hub %s: %w", target, err)
}

// forget drops a connection known to be dead so the next caller dials instead of
// waiting for watch to notice.
func (m *Manager) forget(s *slot, client *sshConn) {
	m.mu.Lock()
	if s.client == client {
		s.client = nil
		s.down = true
	}
	m.mu.Unlock()
}

// pipe is one forwarded connection: the accepted local socket and its SSH channel.
type pipe struct {
	local net.Conn

	mu     sync.Mutex
	remote net.Conn
	closed bool
}

func (p *pipe) setRemote(remote net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		remote.Close()
		return
	}
	p.remote = remote
}

func (p *pipe) close() {
	p.mu.Lock()
	p.closed = true
	remote := p.remote
	p.mu.Unlock()
	p.local.Close()
	if remote != nil {
		remote.Close()
	}
}

// copy moves bytes both ways. An end-of-stream is passed on as a half-close so protocols
// that shut down one direction first keep working; an error tears both sides down.
func (p *pipe) copy() {
	p.mu.Lock()
	remote := p.remote
	p.mu.Unlock()
	if remote == nil {
		return
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		p.pump(remote, p.local)
	}()
	go func() {
		defer wg.Done()
		p.pump(p.local, remote)
	}()
	wg.Wait()
}

type closeWriter interface{ CloseWrite() error }

func (p *pipe) pump(dst, src net.Conn) {
	buf := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(buf)
	// Hiding ReadFrom/WriteTo keeps io.CopyBuffer on our large buffer instead of the
	// 32 KiB fallback a net.Conn would use with a non-socket peer.
	_, err := io.CopyBuffer(writerOnly{dst}, readerOnly{src}, *buf)
	if err != nil {
		p.close()
		return
	}
	if cw, ok := dst.(closeWriter); ok {
		_ = cw.CloseWrite()
	}
}

var copyBuffers = sync.Pool{New: func() any {
	b := make([]byte, copyBufferSize)
	return &b
}}

type writerOnly struct{ io.Writer }
type readerOnly struct{ io.Reader }

// setNoDelay disables Nagle on the SSH connection: NBD's small request headers otherwise
// stall on delayed ACKs (~40 ms per round trip). Go sets it by default; this states the
// requirement.
func setNoDelay(conn net.Conn) {
	if tcp, ok := conn.(*net.TCPConn); ok {
		_ = tcp.SetNoDelay(true)
	}
}
