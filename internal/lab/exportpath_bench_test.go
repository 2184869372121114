package lab_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/tunnel"
)

// exportPathBytes is the dense random data each copy of BenchmarkExportPath moves.
const exportPathBytes = 512 << 20

// BenchmarkExportPath measures what the private export path costs: the same copy (our
// engine, 4 connections, a fresh qcow2 target served as the hub serves it) through the
// tunnel manager's stream-local forward to a qemu-nbd unix socket, against the path it
// replaced, a TCP forward (direct-tcpip) to a qemu-nbd on 127.0.0.1, both over one real
// sshd on loopback. Runs alternate; the medians are printed with their ratio.
// `make bench` runs it.
func BenchmarkExportPath(b *testing.B) {
	testenv.RequireCommand(b, "qemu-nbd")
	sshd := testenv.StartSSHDWith(b, testenv.SSHDOptions{TCPForwarding: true})
	dir := b.TempDir()
	data := filepath.Join(dir, "source.raw")
	writeRandomFile(b, data, exportPathBytes)
	source := testenv.StartNbdkitFile(b, data, testenv.NbdkitOptions{})

	m, err := tunnel.New(tunnel.Config{Addr: sshd.Addr, User: sshd.User, KeyFile: sshd.ClientKeyPath,
		KnownHostsFile: sshd.KnownHostsPath, KeepaliveInterval: time.Minute}, slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	tcpForward := startTCPForward(b, sshd)

	port := testenv.SSHDExportPortMin
	copyOnce := func(stream bool) time.Duration {
		b.Helper()
		ctx := context.Background()
		image := filepath.Join(dir, "target.qcow2")
		_ = os.Remove(image)
		if err := qemu.CreateImage(ctx, image, exportPathBytes); err != nil {
			b.Fatal(err)
		}
		opts := qemu.ExportOptions{Path: image, Name: "disk", Connections: 4, Cache: "none", AIO: "native",
			PidFile: filepath.Join(dir, "target.pid")}
		if stream {
			opts.Socket = sshd.ExportSocket(port)
		} else {
			opts.Port = testenv.FreePort(b)
		}
		exp, err := qemu.Start(ctx, opts)
		if err != nil {
			b.Fatal(err)
		}
		defer func() { _ = exp.Stop(context.Background(), 0) }()
		var target string
		if stream {
			if err := m.EnsureForwards(ctx, []tunnel.Forward{{Port: port, Remote: exp.Socket}}); err != nil {
				b.Fatal(err)
			}
			defer m.DropForwards([]int{port})
			target = (&url.URL{Scheme: "nbd+unix", Path: "/disk", RawQuery: "socket=" + url.QueryEscape(m.SocketPath(port))}).String()
		} else {
			target = "nbd://" + tcpForward.to(exp.Port) + "/disk"
		}
		cp, err := blockcopy.New(source.URI, target, blockcopy.Options{Connections: 4, DestinationIsZero: true})
		if err != nil {
			b.Fatal(err)
		}
		began := time.Now()
		res, err := cp.Run(ctx)
		if err != nil {
			b.Fatalf("copy (stream-local %t): %v", stream, err)
		}
		took := time.Since(began)
		if res.BytesWritten != exportPathBytes {
			b.Fatalf("copy (stream-local %t) wrote %d bytes, want %d", stream, res.BytesWritten, exportPathBytes)
		}
		return took
	}

	var tcp, stream []time.Duration
	b.ResetTimer()
	for range b.N {
		tcp = append(tcp, copyOnce(false))
		stream = append(stream, copyOnce(true))
	}
	b.StopTimer()
	tcpMedian, streamMedian := median(tcp), median(stream)
	b.ReportMetric(streamMedian.Seconds(), "s/streamlocal")
	b.ReportMetric(tcpMedian.Seconds(), "s/tcp")
	fmt.Printf("bench export-path data=%dMiB tcp-forward=%.2fs streamlocal=%.2fs time-ratio=%.3f runs=%d\n",
		exportPathBytes>>20, tcpMedian.Seconds(), streamMedian.Seconds(), streamMedian.Seconds()/tcpMedian.Seconds(), b.N)
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func writeRandomFile(b *testing.B, path string, size int64) {
	b.Helper()
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if _, err := io.CopyN(f, rand.Reader, size); err != nil {
		b.Fatal(err)
	}
}

// tcpForward is the tunnel's former path, kept here only as the yardstick: a listener on
// 127.0.0.1 whose connections go through a direct-tcpip channel to a hub port.
type tcpForward struct {
	client *ssh.Client
	mu     sync.Mutex
	ports  map[int]string // hub port → local address
	b      *testing.B
}

func startTCPForward(b *testing.B, sshd *testenv.SSHD) *tcpForward {
	b.Helper()
	keyPEM, err := os.ReadFile(sshd.ClientKeyPath)
	if err != nil {
		b.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(keyPEM)
	if err != nil {
		b.Fatal(err)
	}
	hostKeys, err := knownhosts.New(sshd.KnownHostsPath)
	if err != nil {
		b.Fatal(err)
	}
	client, err := ssh.Dial("tcp", sshd.Addr, &ssh.ClientConfig{User: sshd.User, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: hostKeys, Timeout: 10 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { client.Close() })
	return &tcpForward{client: client, ports: map[int]string{}, b: b}
}

// to returns the local address forwarded to the hub's 127.0.0.1:port.
func (f *tcpForward) to(port int) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if addr, ok := f.ports[port]; ok {
		return addr
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.b.Fatal(err)
	}
	f.b.Cleanup(func() { l.Close() })
	remote := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	go func() {
		for {
			local, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer local.Close()
				channel, err := f.client.Dial("tcp", remote)
				if err != nil {
					return
				}
				defer channel.Close()
				done := make(chan struct{}, 2)
				go func() { _, _ = io.CopyBuffer(channel, local, make([]byte, 128<<10)); done <- struct{}{} }()
				go func() { _, _ = io.CopyBuffer(local, channel, make([]byte, 128<<10)); done <- struct{}{} }()
				<-done
			}()
		}
	}()
	f.ports[port] = l.Addr().String()
	return f.ports[port]
}
