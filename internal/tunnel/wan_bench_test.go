package tunnel_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/tunnel"
)

// The benchmark re-runs its own test binary inside the SNA namespace (tunnel.Manager
// dials and listens from whatever thread it likes, so it needs a process of its own
// there); this variable hands that child its job.
const wanChildEnv = "DISKFERRY_WAN_BENCH_CHILD"

const (
	wanTransferBytes = 100 << 20
	wanSinkPort      = 10809 // the raw sink on hub WANHubIP, and the forward's port
	wanLinkBytesRate = float64(testenv.DefaultWANRate) / 8
)

// wanJob is what the child in the SNA namespace needs; wanResult what it measured.
type wanJob struct {
	SSHAddr        string `json:"ssh_addr"`
	User           string `json:"user"`
	KeyFile        string `json:"key_file"`
	KnownHostsFile string `json:"known_hosts_file"`
	SinkSocket     string `json:"sink_socket"` // on the hub, behind sshd
	Bytes          int64  `json:"bytes"`
}

type wanResult struct {
	RawSeconds    float64 `json:"raw_seconds"`
	TunnelSeconds float64 `json:"tunnel_seconds"`
}

const wanResultPrefix = "wan-result "

// BenchmarkTunnelWAN measures docs/architecture.md's target "through the SSH tunnel over an emulated
// 100 Mbit/20 ms link: at least 95% of link rate". Each iteration sends wanTransferBytes
// SNA→hub (the direction of a backup) once over plain TCP across the link, the yardstick,
// and once through tunnel.Manager's forward: its unix socket in the SNA namespace → real
// sshd on the hub → a unix socket there, as an export is reached. A transfer ends when
// the hub has confirmed every byte, so socket buffers cannot flatter the rate.
//
//	sudo go test -run '^$' -bench '^BenchmarkTunnelWAN$' -benchtime 1x ./internal/tunnel
func BenchmarkTunnelWAN(b *testing.B) {
	if job := os.Getenv(wanChildEnv); job != "" {
		runWANChild(b, job)
		return
	}
	link := testenv.StartWANLink(b, testenv.WANOptions{})
	sshd := link.StartSSHD(b)
	// Raw, across the link.
	listener, err := link.Listen(link.HubNS, net.JoinHostPort(testenv.WANHubIP, strconv.Itoa(wanSinkPort)))
	if err != nil {
		b.Fatal(err)
	}
	serveWANSink(b, listener)
	// Behind sshd: a unix socket belongs to no network namespace; sshd reaches it by path.
	sinkSocket := sshd.ExportSocket(testenv.SSHDExportPortMin)
	listener, err = net.Listen("unix", sinkSocket)
	if err != nil {
		b.Fatal(err)
	}
	serveWANSink(b, listener)
	job, err := json.Marshal(wanJob{
		SSHAddr:        sshd.Addr,
		User:           sshd.User,
		KeyFile:        sshd.ClientKeyPath,
		KnownHostsFile: sshd.KnownHostsPath,
		SinkSocket:     sinkSocket,
		Bytes:          wanTransferBytes,
	})
	if err != nil {
		b.Fatal(err)
	}

	var raw, tunneled float64
	b.ResetTimer()
	for range b.N {
		r := runWANChildProcess(b, link, string(job))
		raw += r.RawSeconds
		tunneled += r.TunnelSeconds
	}
	b.StopTimer()

	rawRate := float64(b.N) * wanTransferBytes / raw
	tunnelRate := float64(b.N) * wanTransferBytes / tunneled
	hubToSNA, snaToHub := link.Dropped()
	b.ReportMetric(rawRate/1e6, "raw-MB/s")
	b.ReportMetric(tunnelRate/1e6, "tunnel-MB/s")
	b.ReportMetric(tunnelRate/rawRate, "tunnel/raw")
	b.ReportMetric(tunnelRate/wanLinkBytesRate, "of-link")
	fmt.Printf("bench tunnel-wan link=100Mbit rtt=20ms raw=%.2fMB/s tunnel=%.2fMB/s ratio=%.3f of-link=%.3f target>=0.95 runs=%d drops=%d/%d\n",
		rawRate/1e6, tunnelRate/1e6, tunnelRate/rawRate, tunnelRate/wanLinkBytesRate, b.N, snaToHub, hubToSNA)
}

// runWANChildProcess runs one measurement in the SNA namespace and returns its result.
func runWANChildProcess(b *testing.B, link *testenv.WANLink, job string) wanResult {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := link.Command(link.SNANS, os.Args[0],
		"-test.run=^$", "-test.bench=^BenchmarkTunnelWAN$", "-test.benchtime=1x", "-test.count=1")
	cmd.Env = append(os.Environ(), wanChildEnv+"="+job)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		b.Fatalf("start child in %s: %v", link.SNANS, err)
	}
	// Killed by its own pid if the benchmark ends early; `ip netns exec` execs in place.
	stop := context.AfterFunc(ctx, func() { _ = cmd.Process.Kill() })
	defer stop()
	b.Cleanup(func() { _ = cmd.Process.Kill() })
	err := cmd.Wait()
	if err != nil {
		b.Fatalf("child in %s: %v\nstdout:\n%s\nstderr:\n%s", link.SNANS, err, stdout.String(), stderr.String())
	}
	scanner := bufio.NewScanner(&stdout)
	for scanner.Scan() {
		line, ok := strings.CutPrefix(scanner.Text(), wanResultPrefix)
		if !ok {
			continue
		}
		var r wanResult
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			b.Fatalf("child result %q: %v", line, err)
		}
		return r
	}
	b.Fatalf("child in %s printed no result:\n%s\nstderr:\n%s", link.SNANS, stdout.String(), stderr.String())
	return wanResult{}
}

// runWANChild is the SNA side: a tunnel.Manager with one forward, a raw transfer across
// the link and one through the forward. It prints its result for the parent.
func runWANChild(b *testing.B, encoded string) {
	var job wanJob
	if err := json.Unmarshal([]byte(encoded), &job); err != nil {
		b.Fatalf("child job: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	m, err := tunnel.New(tunnel.Config{
		Addr:           job.SSHAddr,
		User:           job.User,
		KeyFile:        job.KeyFile,
		KnownHostsFile: job.KnownHostsFile,
	}, log)
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if err := m.EnsureForwards(ctx, []tunnel.Forward{{Port: wanSinkPort, Remote: job.SinkSocket}}); err != nil {
		b.Fatal(err)
	}

	chunk := make([]byte, 1<<20)
	// Random bytes: nothing on the way may shrink them.
	_, _ = rand.Read(chunk)
	var result wanResult
	result.RawSeconds, err = sendToSink(ctx, "tcp", net.JoinHostPort(testenv.WANHubIP, strconv.Itoa(wanSinkPort)), chunk, job.Bytes)
	if err != nil {
		b.Fatalf("raw transfer: %v", err)
	}
	result.TunnelSeconds, err = sendToSink(ctx, "unix", m.SocketPath(wanSinkPort), chunk, job.Bytes)
	if err != nil {
		b.Fatalf("tunnel transfer: %v", err)
	}
	out, err := json.Marshal(result)
	if err != nil {
		b.Fatal(err)
	}
	fmt.Printf("%s%s\n", wanResultPrefix, out)
}

// sendToSink connects, sends size bytes, half-closes and waits for the sink's count; it
// returns the seconds from dial to confirmation.
func sendToSink(ctx context.Context, network, addr string, chunk []byte, size int64) (float64, error) {
	began := time.Now()
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return 0, fmt.Errorf("dial %s: %w", addr, err)
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	for sent := int64(0); sent < size; {
		n, err := conn.Write(chunk[:min(int64(len(chunk)), size-sent)])
		sent += int64(n)
		if err != nil {
			return 0, fmt.Errorf("send to %s after %d bytes: %w", addr, sent, err)
		}
	}
	if err := conn.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		return 0, fmt.Errorf("half-close %s: %w", addr, err)
	}
	var received int64
	if err := binary.Read(conn, binary.BigEndian, &received); err != nil {
		return 0, fmt.Errorf("read byte count from %s: %w", addr, err)
	}
	if received != size {
		return 0, fmt.Errorf("sink behind %s received %d bytes, sent %d", addr, received, size)
	}
	return time.Since(began).Seconds(), nil
}

// serveWANSink discards what each connection sends and answers its byte count at EOF.
func serveWANSink(b *testing.B, listener net.Listener) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	b.Cleanup(func() {
		listener.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[conn] = struct{}{}
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(conns, conn)
					mu.Unlock()
					conn.Close()
				}()
				n, err := io.Copy(io.Discard, conn)
				if err != nil {
					return
				}
				_ = binary.Write(conn, binary.BigEndian, n)
			}()
		}
	}()
}
