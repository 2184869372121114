package testenv

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
)

// Addresses of the two ends of a WANLink. They exist only inside the link's own
// namespaces, so every link can use the same pair.
const (
	WANHubIP = "10.231.0.1"
	WANSNAIP = "10.231.0.2"
)

// Defaults of WANOptions: the "100 Mbit/20 ms link" of docs/architecture.md's performance targets.
const (
	DefaultWANRate         = 100_000_000 // bits per second, each direction
	DefaultWANDelay        = 10 * time.Millisecond
	DefaultWANQueuePackets = 1000 // netem's default limit
	DefaultWANMTU          = 1500
)

const (
	// wanFrameOverhead is charged per packet on top of its IP length, as netem's rate on a
	// veth charges the Ethernet header: the link carries what `tc netem rate` would.
	wanFrameOverhead = 14
	netnsDir         = "/run/netns"
)

// WANOptions shape the emulated link; zero values take the defaults above.
type WANOptions struct {
	Rate         int64         // bits per second, each direction
	Delay        time.Duration // one way; the round trip is twice this
	QueuePackets int           // packets held per direction (delayed or waiting for the rate) before tail drop
	// MTU of the link. 1500 is a real WAN's; 65535 gives what `tc netem rate` on a veth
	// measures, where TSO hands netem 64 KiB packets that pay one header each.
	MTU int
}

// WANLink is two network namespaces, a hub and an SNA, joined by an emulated WAN link:
// WANHubIP in HubNS and WANSNAIP in SNANS reach each other only through it.
//
// The kernel here has no sch_netem (nor fq or etf), so `tc netem` cannot delay packets.
// Each namespace gets a TUN device instead, and this process moves every packet from one
// to the other after the link's serialisation time (rate) and delay, dropping at the tail
// of a full queue: what netem's `delay D rate R limit L` does, on any kernel. TCP in the
// namespaces sees a real 1500-byte-MTU path with that rate and round trip.
type WANLink struct {
	HubNS, SNANS string
	Rate         int64
	Delay        time.Duration

	t       TB
	ip      string
	tuns    []*os.File
	done    chan struct{}
	wg      sync.WaitGroup
	dropped [2]atomic.Int64 // hub→SNA, SNA→hub
}

// StartWANLink creates the namespaces and the link, and removes both in t.Cleanup. It needs
// root, iproute2 and /dev/net/tun; without them the test fails under CI and skips elsewhere.
func StartWANLink(t TB, opts WANOptions) *WANLink {
	t.Helper()
	ip := RequireCommand(t, "ip")
	if os.Geteuid() != 0 {
		Missing(t, "network namespaces need root (running as uid %d)", os.Geteuid())
	}
	if opts.Rate <= 0 {
		opts.Rate = DefaultWANRate
	}
	if opts.Delay <= 0 {
		opts.Delay = DefaultWANDelay
	}
	if opts.QueuePackets <= 0 {
		opts.QueuePackets = DefaultWANQueuePackets
	}
	if opts.MTU <= 0 {
		opts.MTU = DefaultWANMTU
	}

	// Unique per process and per link, so parallel runs never share or delete each other's.
	tag := fmt.Sprintf("%d-%04x", os.Getpid(), rand.Uint32N(1<<16))
	l := &WANLink{
		HubNS: "dfwan-hub-" + tag,
		SNANS: "dfwan-sna-" + tag,
		Rate:  opts.Rate,
		Delay: opts.Delay,
		t:     t,
		ip:    ip,
		done:  make(chan struct{}),
	}
	t.Cleanup(l.stop)

	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(ip, args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	for _, ns := range []string{l.HubNS, l.SNANS} {
		if out, err := exec.Command(ip, "netns", "add", ns).CombinedOutput(); err != nil {
			Missing(t, "ip netns add %s: %v: %s", ns, err, out)
		}
		run("-n", ns, "link", "set", "lo", "up")
	}

	// TUN names are global until moved; the random part of the tag keeps them apart.
	ends := []struct{ ns, dev, local, peer string }{
		{l.HubNS, "dfwh" + strings.ReplaceAll(tag, "-", ""), WANHubIP, WANSNAIP},
		{l.SNANS, "dfws" + strings.ReplaceAll(tag, "-", ""), WANSNAIP, WANHubIP},
	}
	for _, end := range ends {
		dev := end.dev[:min(len(end.dev), unix.IFNAMSIZ-1)]
		tun, err := openTUN(dev)
		if err != nil {
			Missing(t, "TUN device %s: %v", dev, err)
		}
		l.tuns = append(l.tuns, tun)
		// The open file stays attached to the device after it moves to the namespace.
		run("link", "set", dev, "netns", end.ns)
		run("-n", end.ns, "link", "set", dev, "mtu", fmt.Sprint(opts.MTU), "up")
		run("-n", end.ns, "addr", "add", end.local+"/32", "peer", end.peer+"/32", "dev", dev)
	}

	hub, sna := l.tuns[0], l.tuns[1]
	l.wg.Add(2)
	go l.carry(hub, sna, opts, &l.dropped[0])
	go l.carry(sna, hub, opts, &l.dropped[1])
	return l
}

func openTUN(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun name %q: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	// Non-blocking, the file joins Go's poller: Close wakes a pending Read.
	return os.NewFile(uintptr(fd), name), nil
}

// wanPacket is one IP packet in flight and the moment it leaves the far end of the link.
type wanPacket struct {
	buf *[]byte
	n   int
	due time.Time
}

// carry moves packets from one TUN device to the other. The reader stamps each packet
// with when it would finish crossing a link of l.Rate behind the packets before it, plus
// l.Delay; the writer hands it on at that moment, so the mean rate is exact even though
// timers fire late by up to a scheduler tick.
func (l *WANLink) carry(from, to *os.File, opts WANOptions, dropped *atomic.Int64) {
	defer l.wg.Done()
	queue := make(chan wanPacket, opts.QueuePackets)
	buffers := sync.Pool{New: func() any { b := make([]byte, opts.MTU); return &b }}

	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		timer := time.NewTimer(time.Hour)
		defer timer.Stop()
		for {
			var p wanPacket
			select {
			case p = <-queue:
			case <-l.done:
				return
			}
			if wait := time.Until(p.due); wait > 0 {
				timer.Reset(wait)
				select {
				case <-timer.C:
				case <-l.done:
					return
				}
			}
			// A packet the far stack refuses is lost, as on a real wire.
			_, _ = to.Write((*p.buf)[:p.n])
			buffers.Put(p.buf)
		}
	}()

	var linkFree time.Time // when the link finishes sending what is queued
	for {
		buf := buffers.Get().(*[]byte)
		n, err := from.Read(*buf)
		if err != nil {
			return // closed by stop
		}
		start := time.Now()
		if start.Before(linkFree) {
			start = linkFree
		}
		sent := start.Add(time.Duration(int64(n+wanFrameOverhead) * 8 * int64(time.Second) / l.Rate))
		select {
		case queue <- wanPacket{buf: buf, n: n, due: sent.Add(l.Delay)}:
			linkFree = sent
		default:
			dropped.Add(1)
			buffers.Put(buf)
		}
	}
}

// Dropped returns how many packets each direction lost to a full queue so far.
func (l *WANLink) Dropped() (hubToSNA, snaToHub int64) {
	return l.dropped[0].Load(), l.dropped[1].Load()
}

func (l *WANLink) stop() {
	close(l.done)
	for _, tun := range l.tuns {
		tun.Close()
	}
	l.wg.Wait()
	for _, ns := range []string{l.HubNS, l.SNANS} {
		if _, err := os.Stat(filepath.Join(netnsDir, ns)); err != nil {
			continue
		}
		if out, err := exec.Command(l.ip, "netns", "delete", ns).CombinedOutput(); err != nil {
			l.t.Errorf("ip netns delete %s: %v: %s", ns, err, out)
		}
	}
}

// Command runs name inside namespace ns (through `ip netns exec`, which execs name in
// place: the command's pid is the program's own).
func (l *WANLink) Command(ns, name string, args ...string) *exec.Cmd {
	return exec.Command(l.ip, append([]string{"netns", "exec", ns, name}, args...)...)
}

// Listen opens a TCP listener inside namespace ns. Its connections live there; this
// process serves them from any thread.
func (l *WANLink) Listen(ns, addr string) (net.Listener, error) {
	var listener net.Listener
	err := inNetns(ns, func() error {
		var err error
		listener, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on %s in %s: %w", addr, ns, err)
	}
	return listener, nil
}

// DialContext opens a TCP connection from inside namespace ns.
func (l *WANLink) DialContext(ctx context.Context, ns, addr string) (net.Conn, error) {
	var conn net.Conn
	err := inNetns(ns, func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s from %s: %w", addr, ns, err)
	}
	return conn, nil
}

// inNetns runs fn on an OS thread switched into namespace ns. The thread stays locked and
// so ends with its goroutine: no other goroutine ever runs in the namespace by accident.
// Sockets fn creates keep the namespace after it returns.
func inNetns(ns string, fn func() error) error {
	result := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		handle, err := os.Open(filepath.Join(netnsDir, ns))
		if err != nil {
			result <- err
			return
		}
		defer handle.Close()
		if err := unix.Setns(int(handle.Fd()), unix.CLONE_NEWNET); err != nil {
			result <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		result <- fn()
	}()
	return <-result
}

// NetnsSSHD is a throwaway OpenSSH server listening on WANHubIP:22 inside a WANLink's hub
// namespace, configured like SSHD (one generated client key, locked down to stream-local
// forwarding).
type NetnsSSHD struct {
	HubRunDir      string // as SSHD's
	Addr           string // WANHubIP:22, reachable from the SNA namespace
	User           string
	ClientKeyPath  string
	KnownHostsPath string
	HostPublicKey  ssh.PublicKey

	logPath string
	cmd     *exec.Cmd
	waited  chan struct{}
}

// StartSSHD starts sshd in the hub namespace and stops it, with every connection it
// serves, in t.Cleanup. It returns once the server answers from the SNA namespace.
func (l *WANLink) StartSSHD(t TB) *NetnsSSHD {
	t.Helper()
	binary := sshdBinary(t)
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		Missing(t, "sshd privilege separation dir /run/sshd: %v", err)
	}
	current, err := user.Current()
	if err != nil {
		t.Fatalf("current user: %v", err)
	}
	dir := t.TempDir()
	// The config is SSHD's; only the listening address differs.
	runDir := ShortTempDir(t)
	if err := os.Mkdir(filepath.Join(runDir, "exports"), 0o750); err != nil {
		t.Fatalf("hub exports dir: %v", err)
	}
	cfg := &SSHD{
		HubRunDir:      runDir,
		Addr:           net.JoinHostPort(WANHubIP, "22"),
		User:           current.Username,
		ClientKeyPath:  filepath.Join(dir, "client_ed25519"),
		KnownHostsPath: filepath.Join(dir, "known_hosts"),
		t:              t,
		dir:            dir,
		configPath:     filepath.Join(dir, "sshd_config"),
	}
	cfg.HostPublicKey = sshdWriteKey(t, filepath.Join(dir, "host_ed25519"))
	clientPub := sshdWriteKey(t, cfg.ClientKeyPath)
	sshdWriteFile(t, filepath.Join(dir, "authorized_keys"), tunnelAuthorizedKey(clientPub))
	cfg.writeConfig()

	s := &NetnsSSHD{
		HubRunDir:      cfg.HubRunDir,
		Addr:           cfg.Addr,
		User:           cfg.User,
		ClientKeyPath:  cfg.ClientKeyPath,
		KnownHostsPath: cfg.KnownHostsPath,
		HostPublicKey:  cfg.HostPublicKey,
		logPath:        filepath.Join(dir, "sshd.log"),
	}
	logFile, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatalf("sshd log: %v", err)
	}
	defer logFile.Close()
	cmd := l.Command(l.HubNS, binary, "-D", "-e", "-f", cfg.configPath)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("start sshd in %s: %v", l.HubNS, err)
	}
	s.cmd = cmd
	s.waited = make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(s.waited)
	}()
	t.Cleanup(func() { s.stop(t) })

	deadline := time.Now().Add(10 * time.Second)
	for !l.sshdAnswers(s.Addr) {
		select {
		case <-s.waited:
			t.Fatalf("sshd exited during start in %s:\n%s", l.HubNS, s.Log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("sshd not answering on %s from %s after 10s:\n%s", s.Addr, l.SNANS, s.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return s
}

func (l *WANLink) sshdAnswers(addr string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn, err := l.DialContext(ctx, l.SNANS, addr)
	if err != nil {
		return false
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	banner := make([]byte, len("SSH-2.0-"))
	_, err = io.ReadFull(conn, banner)
	return err == nil && string(banner) == "SSH-2.0-"
}

// ExportSocket is where the hub serves the export of port, in HubRunDir.
func (s *NetnsSSHD) ExportSocket(port int) string { return exportSocket(s.HubRunDir, port) }

// Log returns what sshd wrote to stderr, for failure messages.
func (s *NetnsSSHD) Log() string {
	b, _ := os.ReadFile(s.logPath)
	return string(b)
}

// stop kills sshd and its per-connection children, found by parent pid while it is
// stopped (they call setsid, so a process-group kill would miss them).
func (s *NetnsSSHD) stop(t TB) {
	pid := s.cmd.Process.Pid
	_ = syscall.Kill(pid, syscall.SIGSTOP)
	for _, child := range sshdDescendants(pid) {
		_ = syscall.Kill(child, syscall.SIGKILL)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	select {
	case <-s.waited:
	case <-time.After(10 * time.Second):
		t.Errorf("sshd pid %d did not exit after SIGKILL", pid)
	}
}
