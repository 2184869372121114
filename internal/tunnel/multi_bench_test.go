package tunnel_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/tunnel"
)

// The shape of a multi-disk backup: four disks, each copied over the copy engine's four
// NBD connections, every connection a forwarded connection of its disk's forward.
const (
	multiForwards = 4
	multiStreams  = 4 // per forward
	multiBytes    = 1 << 30
	multiRounds   = 3
)

// BenchmarkTunnelMulti measures the tunnel as a multi-disk backup loads it, on loopback
// through a real sshd: multiForwards forwards × multiStreams connections each send
// multiBytes in all, SNA→hub, to unix-socket sinks on the hub that confirm every byte. It
// runs the pool (Config.Connections default) and a single SSH connection alternately,
// multiRounds times each, and prints medians with the CPU seconds of sshd and of this
// process (the tunnel plus the senders and sinks) per GB, and the rates those costs
// allow: with every core on this path (ceiling_cores), and with one core per sshd
// process, the per-connection limit (ceiling_sshd).
//
//	go test -run '^$' -bench '^BenchmarkTunnelMulti$' -benchtime 1x ./internal/tunnel
//
// DISKFERRY_BENCH_TUNNEL_CONNECTIONS (e.g. "1,2,4,8") and DISKFERRY_BENCH_TUNNEL_CIPHER
// measure other pool sizes and a single cipher instead, for choosing the defaults.
func BenchmarkTunnelMulti(b *testing.B) {
	s := testenv.StartSSHD(b)
	ports := make([]int, multiForwards)
	forwards := make([]tunnel.Forward, multiForwards)
	for i := range ports {
		ports[i] = testPort + i
		sink := s.ExportSocket(ports[i])
		listener, err := net.Listen("unix", sink)
		if err != nil {
			b.Fatal(err)
		}
		serveWANSink(b, listener)
		forwards[i] = tunnel.Forward{Port: ports[i], Remote: sink}
	}
	sizes := []int{1, tunnel.DefaultConnections}
	if env := os.Getenv("DISKFERRY_BENCH_TUNNEL_CONNECTIONS"); env != "" {
		sizes = nil
		for _, f := range strings.Split(env, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 1 {
				b.Fatalf("DISKFERRY_BENCH_TUNNEL_CONNECTIONS=%q: want positive counts", env)
			}
			sizes = append(sizes, n)
		}
	}
	var ciphers []string
	if c := os.Getenv("DISKFERRY_BENCH_TUNNEL_CIPHER"); c != "" {
		ciphers = []string{c}
	}
	chunk := make([]byte, 1<<20)
	_, _ = rand.Read(chunk)

	results := map[int][]multiResult{}
	var cipher string
	b.ResetTimer()
	for range b.N {
		for range multiRounds {
			// Alternating sizes, so load from other users of the machine hits all alike.
			for _, n := range sizes {
				r, c := runMulti(b, s, n, ciphers, forwards, chunk)
				results[n] = append(results[n], r)
				cipher = c
			}
		}
	}
	b.StopTimer()

	load, _ := os.ReadFile("/proc/loadavg")
	single := median(results[sizes[0]])
	for _, n := range sizes {
		r := median(results[n])
		b.ReportMetric(r.rate/1e6, fmt.Sprintf("MB/s-conns=%d", n))
		// The ceilings the CPU costs imply: all cores busy with this path alone, and each
		// sshd process (one per SSH connection, single-threaded) on a core of its own.
		cpuCeiling := float64(runtime.NumCPU()) / (r.sshdCPU + r.ownCPU) * 1e3
		sshdCeiling := float64(n) / r.sshdCPU * 1e3
		fmt.Printf("bench tunnel-multi conns=%d forwards=%d streams=%d cipher=%s rate=%.0fMB/s conns%d=%.0fMB/s ratio=%.2f sshd_cpu=%.2fs/GB ours_cpu=%.2fs/GB ceiling_cores=%.0fMB/s ceiling_sshd=%.0fMB/s cores=%d runs=%d load=%s target >= 1000 MB/s\n",
			n, multiForwards, multiForwards*multiStreams, cipher, r.rate/1e6, sizes[0], single.rate/1e6, r.rate/single.rate,
			r.sshdCPU, r.ownCPU, cpuCeiling, sshdCeiling, runtime.NumCPU(), len(results[n]), strings.Fields(string(load))[0])
	}
}

type multiResult struct {
	rate    float64 // bytes per second
	sshdCPU float64 // seconds per GB
	ownCPU  float64 // seconds per GB
}

// median takes each figure's median on its own.
func median(rs []multiResult) multiResult {
	pick := func(f func(multiResult) float64) float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	return multiResult{
		rate:    pick(func(r multiResult) float64 { return r.rate }),
		sshdCPU: pick(func(r multiResult) float64 { return r.sshdCPU }),
		ownCPU:  pick(func(r multiResult) float64 { return r.ownCPU }),
	}
}

// runMulti moves multiBytes through a fresh manager of n SSH connections and returns
// the rate and CPU costs, and the cipher the connections negotiated.
func runMulti(b *testing.B, s *testenv.SSHD, n int, ciphers []string, forwards []tunnel.Forward, chunk []byte) (multiResult, string) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var logged bytes.Buffer
	var logMu sync.Mutex
	cfg := baseConfig(s)
	cfg.KeepaliveInterval = time.Minute
	cfg.Connections = n
	cfg.Ciphers = ciphers
	m, err := tunnel.New(cfg, slog.New(slog.NewTextHandler(lockedWriter{&logMu, &logged}, nil)))
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if err := m.EnsureForwards(ctx, forwards); err != nil {
		b.Fatal(err)
	}
	// Warm-up: one stream per SSH connection makes the pool dial all of them, so the
	// measurement holds no handshakes.
	if err := sendAll(ctx, m, forwards, n, int64(n)<<20, chunk); err != nil {
		b.Fatal(err)
	}

	sshdBefore := sshdCPUSeconds(b, s)
	ownBefore := ownCPUSeconds()
	began := time.Now()
	if err := sendAll(ctx, m, forwards, multiForwards*multiStreams, multiBytes, chunk); err != nil {
		b.Fatal(err)
	}
	elapsed := time.Since(began).Seconds()
	gb := float64(multiBytes) / 1e9
	r := multiResult{
		rate:    multiBytes / elapsed,
		sshdCPU: (sshdCPUSeconds(b, s) - sshdBefore) / gb,
		ownCPU:  (ownCPUSeconds() - ownBefore) / gb,
	}
	logMu.Lock()
	defer logMu.Unlock()
	if got := strings.Count(logged.String(), "ssh connected"); got != n {
		b.Fatalf("the manager made %d SSH connections, want %d:\n%s", got, n, logged.String())
	}
	cipher := "?"
	if _, after, ok := strings.Cut(logged.String(), "cipher="); ok {
		cipher = strings.Fields(after)[0]
	}
	return r, cipher
}

// sendAll sends total bytes over streams connections spread round-robin on the forwards,
// all at once, each confirmed by its sink.
func sendAll(ctx context.Context, m *tunnel.Manager, forwards []tunnel.Forward, streams int, total int64, chunk []byte) error {
	errs := make(chan error, streams)
	for i := range streams {
		port := forwards[i%len(forwards)].Port
		go func() {
			_, err := sendToSink(ctx, "unix", m.SocketPath(port), chunk, total/int64(streams))
			errs <- err
		}()
	}
	var first error
	for range streams {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

type lockedWriter struct {
	mu  *sync.Mutex
	buf *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func ownCPUSeconds() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// sshdCPUSeconds sums the user and system time of the test sshd's processes: its
// listener (found by its config file, next to its known_hosts) and every descendant.
func sshdCPUSeconds(b *testing.B, s *testenv.SSHD) float64 {
	b.Helper()
	config := filepath.Join(filepath.Dir(s.KnownHostsPath), "sshd_config")
	type proc struct {
		ppid  int
		ticks int64
	}
	procs := map[int]proc{}
	listener := 0
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		end := bytes.LastIndexByte(stat, ')')
		fields := strings.Fields(string(stat[end+1:]))
		// After the command: state ppid ... utime(12) stime(13), counted from state at 0.
		if len(fields) < 13 {
			continue
		}
		ppid, _ := strconv.Atoi(fields[1])
		utime, _ := strconv.ParseInt(fields[11], 10, 64)
		stime, _ := strconv.ParseInt(fields[12], 10, 64)
		procs[pid] = proc{ppid: ppid, ticks: utime + stime}
		if cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline")); bytes.Contains(cmdline, []byte(config)) {
			listener = pid
		}
	}
	if listener == 0 {
		b.Fatalf("no sshd running with %s", config)
	}
	var ticks int64
	for pid, p := range procs {
		for q := pid; q > 1; q = procs[q].ppid {
			if q == listener {
				ticks += p.ticks
				break
			}
			if _, ok := procs[q]; !ok {
				break
			}
		}
	}
	// USER_HZ is 100 on Linux.
	return float64(ticks) / 100
}
