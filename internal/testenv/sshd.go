package testenv

import (
	"bufio"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// SSHD is a throwaway OpenSSH server on 127.0.0.1 that accepts one generated client key,
// locked down as the SNA's account on a hub is (docs/operations.md): the key is
// restricted to a forced no-op command, and forwards reach only the export sockets of a
// hub run directory (HubRunDir, ports SSHDExportPortMin-SSHDExportPortMax): no TCP port,
// no other socket. A real tunnel endpoint for tests.
type SSHD struct {
	// HubRunDir is the hub run directory whose export sockets the key may reach
	// (HubRunDir/exports/port-P.sock); tests run their hub, or their stand-in, there.
	HubRunDir      string
	Addr           string        // 127.0.0.1:port
	Port           int           // the listening port, kept across Restart
	User           string        // the current user, the one the client key logs in as
	ClientKeyPath  string        // OpenSSH private key (ed25519, no passphrase), mode 0600
	KnownHostsPath string        // one line "[127.0.0.1]:port ssh-ed25519 ..." pinning the host key
	HostPublicKey  ssh.PublicKey // the server's host key

	t          TB
	opts       SSHDOptions
	binary     string
	dir        string
	configPath string
	logPath    string
	cmd        *exec.Cmd
	waited     chan struct{}
}

// The export ports whose sockets SSHD lets the key reach.
const (
	SSHDExportPortMin = 10100
	SSHDExportPortMax = 10199
)

// ExportSocket is where the hub serves the export of port, in HubRunDir.
func (s *SSHD) ExportSocket(port int) string { return exportSocket(s.HubRunDir, port) }

// exportSocket is the hub's layout (activities/hub): <run dir>/exports/port-<P>.sock.
func exportSocket(runDir string, port int) string {
	return filepath.Join(runDir, "exports", "port-"+strconv.Itoa(port)+".sock")
}

// SSHDOptions loosen the lockdown, for measurements only.
type SSHDOptions struct {
	// TCPForwarding allows direct-tcpip forwards to 127.0.0.1 as well: the tunnel's old
	// path, the yardstick of the export path benchmark.
	TCPForwarding bool
	// ClientKeyPath authorizes this existing client key (another SSHD's ClientKeyPath)
	// instead of a generated one, as one SNA key reaches several hubs.
	ClientKeyPath string
}

// StartSSHD starts /usr/sbin/sshd in the foreground on a free loopback port with a generated
// host key and client key, and stops it (with every connection it serves) in t.Cleanup.
func StartSSHD(t TB) *SSHD {
	t.Helper()
	return StartSSHDWith(t, SSHDOptions{})
}

// StartSSHDWith is StartSSHD with options.
func StartSSHDWith(t TB, opts SSHDOptions) *SSHD {
	t.Helper()
	Integration(t)
	binary := sshdBinary(t)
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		// sshd refuses to start without its privilege separation directory.
		Missing(t, "sshd privilege separation dir /run/sshd: %v", err)
	}
	current, err := user.Current()
	if err != nil {
		t.Fatalf("current user: %v", err)
	}

	dir := t.TempDir()
	// Short (socket paths are limited to 108 bytes) and open to other users up to the
	// exports directory, so a test's other-user check meets the hub's own permissions.
	runDir := ShortTempDir(t)
	if err := os.Chmod(runDir, 0o755); err != nil {
		t.Fatalf("hub run dir: %v", err)
	}
	if err := os.Mkdir(filepath.Join(runDir, "exports"), 0o750); err != nil {
		t.Fatalf("hub exports dir: %v", err)
	}
	s := &SSHD{
		HubRunDir:      runDir,
		User:           current.Username,
		ClientKeyPath:  filepath.Join(dir, "client_ed25519"),
		KnownHostsPath: filepath.Join(dir, "known_hosts"),
		t:              t,
		opts:           opts,
		binary:         binary,
		dir:            dir,
		configPath:     filepath.Join(dir, "sshd_config"),
		logPath:        filepath.Join(dir, "sshd.log"),
	}
	s.HostPublicKey = sshdWriteKey(t, filepath.Join(dir, "host_ed25519"))
	var clientPub ssh.PublicKey
	if opts.ClientKeyPath != "" {
		s.ClientKeyPath = opts.ClientKeyPath
		clientPub = sshdReadPublicKey(t, opts.ClientKeyPath)
	} else {
		clientPub = sshdWriteKey(t, s.ClientKeyPath)
	}
	sshdWriteFile(t, filepath.Join(dir, "authorized_keys"), tunnelAuthorizedKey(clientPub))

	// A port free a moment ago may be taken by a parallel test before sshd binds it.
	for attempt := 1; ; attempt++ {
		s.Port = FreePort(t)
		s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Port))
		s.writeConfig()
		err := s.start()
		if err == nil {
			break
		}
		if !errors.Is(err, errSSHDAddrInUse) || attempt == 3 {
			t.Fatalf("%v", err)
		}
	}
	t.Cleanup(s.stop)
	return s
}

// tunnelAuthorizedKey is the authorized_keys line of the SNA's key, as docs/operations.md
// shows it: every feature off (restrict), forwarding back on (sshd_config narrows it to
// stream-local), and a forced command that does nothing, so no session runs anything.
func tunnelAuthorizedKey(pub ssh.PublicKey) []byte {
	return append([]byte(`restrict,port-forwarding,command="/bin/false" `), ssh.MarshalAuthorizedKey(pub)...)
}

func (s *SSHD) writeConfig() {
	t := s.t
	t.Helper()
	sshdWriteFile(t, s.KnownHostsPath, []byte(knownhosts.Line([]string{s.Addr}, s.HostPublicKey)+"\n"))
	// Exports are unix sockets: the SNA's key reaches them by stream-local forwarding and
	// nothing on TCP (the hub's MariaDB, Temporal), nor a shell. OpenSSH gates stream-local
	// forwards with AllowTcpForwarding and matches their paths against PermitOpen, so
	// "local" plus a PermitOpen of exactly the export sockets allows those and nothing else.
	// A path is written in brackets, as an IPv6 address, or its '/' would end the host.
	permit := []string{"PermitOpen"}
	for p := SSHDExportPortMin; p <= SSHDExportPortMax; p++ {
		permit = append(permit, "["+s.ExportSocket(p)+"]:*")
	}
	if s.opts.TCPForwarding {
		permit = append(permit, "127.0.0.1:*")
	}
	config := strings.Join([]string{
		"AllowTcpForwarding local",
		strings.Join(permit, " "),
		"ListenAddress " + s.Addr,
		"HostKey " + filepath.Join(s.dir, "host_ed25519"),
		"PidFile " + filepath.Join(s.dir, "sshd.pid"),
		"AuthorizedKeysFile " + filepath.Join(s.dir, "authorized_keys"),
		"AuthenticationMethods publickey",
		"PubkeyAuthentication yes",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"UsePAM no",
		// The temp dir is not laid out the way StrictModes wants a home directory.
		"StrictModes no",
		"PermitRootLogin prohibit-password",
		"AllowUsers " + s.User,
		"AllowStreamLocalForwarding local",
		"AllowAgentForwarding no",
		"X11Forwarding no",
		"PermitTTY no",
		"PermitUserRC no",
		"ForceCommand /bin/false",
		"UseDNS no",
		"PrintMotd no",
		"MaxStartups 100",
		"LogLevel VERBOSE",
		"",
	}, "\n")
	sshdWriteFile(t, s.configPath, []byte(config))
}

var errSSHDAddrInUse = errors.New("sshd port already in use")

// Stop kills the server and every connection it serves, as a crash or reboot would.
func (s *SSHD) Stop() {
	s.t.Helper()
	s.stop()
}

// Restart stops the server (dropping its connections) and starts it again on the same
// port with the same keys.
func (s *SSHD) Restart() {
	s.t.Helper()
	s.stop()
	if err := s.start(); err != nil {
		s.t.Fatalf("restart sshd on %s: %v", s.Addr, err)
	}
}

// Log returns what the current sshd run wrote to stderr, for failure messages.
func (s *SSHD) Log() string {
	b, _ := os.ReadFile(s.logPath)
	return string(b)
}

func (s *SSHD) start() error {
	logFile, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("sshd log: %w", err)
	}
	defer logFile.Close()

	// sshd re-executes itself and therefore needs its absolute path.
	cmd := exec.Command(s.binary, "-D", "-e", "-f", s.configPath)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start sshd: %w", err)
	}
	s.cmd = cmd
	s.waited = make(chan struct{})
	go func(done chan struct{}) {
		_ = cmd.Wait()
		close(done)
	}(s.waited)

	deadline := time.Now().Add(10 * time.Second)
	for {
		if sshdBanner(s.Addr) {
			return nil
		}
		select {
		case <-s.waited:
			s.cmd = nil
			log := s.Log()
			if strings.Contains(log, "Address already in use") {
				return fmt.Errorf("%w: %s", errSSHDAddrInUse, log)
			}
			return fmt.Errorf("sshd exited during start:\n%s", log)
		default:
		}
		if time.Now().After(deadline) {
			s.stop()
			return fmt.Errorf("sshd not answering on %s after 10s:\n%s", s.Addr, s.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop kills the listener and its per-connection children. Those call setsid, so a
// process-group kill would miss them; they are found by parent pid before the listener
// goes away and they would be reparented.
func (s *SSHD) stop() {
	if s.cmd == nil {
		return
	}
	pid := s.cmd.Process.Pid
	_ = syscall.Kill(pid, syscall.SIGSTOP)
	for _, child := range sshdDescendants(pid) {
		_ = syscall.Kill(child, syscall.SIGKILL)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	select {
	case <-s.waited:
	case <-time.After(10 * time.Second):
		s.t.Errorf("sshd pid %d did not exit after SIGKILL", pid)
	}
	s.cmd = nil
}

// sshdDescendants lists the pids below pid, children before grandchildren.
func sshdDescendants(pid int) []int {
	children := map[int][]int{}
	for _, st := range allProcs() {
		children[st.PPID] = append(children[st.PPID], st.PID)
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		next := queue[0]
		queue = queue[1:]
		out = append(out, children[next]...)
		queue = append(queue, children[next]...)
	}
	return out
}

func sshdBanner(addr string) bool {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "SSH-2.0-")
}

func sshdBinary(t TB) string {
	t.Helper()
	if path, err := exec.LookPath("sshd"); err == nil {
		if abs, err := filepath.Abs(path); err == nil {
			return abs
		}
	}
	const debianPath = "/usr/sbin/sshd"
	if _, err := os.Stat(debianPath); err != nil {
		Missing(t, "sshd not found in PATH nor at %s (apt-get install openssh-server)", debianPath)
	}
	return debianPath
}

// sshdWriteKey writes a fresh ed25519 private key in OpenSSH format with mode 0600
// and returns its public half.
func sshdWriteKey(t TB, path string) ssh.PublicKey {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatalf("generate ed25519 key: %v", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatalf("marshal private key: %v", err)
	}
	sshdWriteFile(t, path, pem.EncodeToMemory(block))
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatalf("ssh public key: %v", err)
	}
	return sshPub
}

// sshdReadPublicKey returns the public half of an OpenSSH private key file.
func sshdReadPublicKey(t TB, path string) ssh.PublicKey {
	t.Helper()
	pem, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read client key: %v", err)
	}
	signer, err := ssh.ParsePrivateKey(pem)
	if err != nil {
		t.Fatalf("parse client key %s: %v", path, err)
	}
	return signer.PublicKey()
}

func sshdWriteFile(t TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
}
