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
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/tunnel"
)

// exportPathBytes is the dense random data each copy of BenchmarkExportPath moves, and
// exportPathRounds how many copies each path makes per iteration, in turn.
const (
	exportPathBytes  = 256 << 20
	exportPathRounds = 5
)

// The paths BenchmarkExportPath compares.
const (
	pathTCP    = iota // the former transport: TCP listener, direct-tcpip, qemu-nbd on 127.0.0.1
	pathStream        // the new transport alone: unix listener, direct-streamlocal, qemu-nbd on a socket
	pathTunnel        // the product: tunnel.Manager's forward to the hub's export socket
)

// BenchmarkExportPath measures what the private export path costs: the same copy (our
// engine, 4 connections, a fresh qcow2 target served as the hub serves it) over one real
// sshd on loopback through (1) the transport the tunnel used before, a TCP listener and a
// direct-tcpip channel to a qemu-nbd on 127.0.0.1, (2) the new transport, a unix socket
// listener and a direct-streamlocal channel to a qemu-nbd unix socket, both relayed by a
// bare loop, and (3) the tunnel manager's forward as the product runs it. Each iteration
// makes exportPathRounds copies per path, in turn, so a busy machine's drift hits all
// alike; the medians are printed with their ratios to (1). `make bench` runs it.
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
	client := sshClient(b, sshd)

	port := testenv.SSHDExportPortMin
	copyOnce := func(path int) time.Duration {
		b.Helper()
		ctx := context.Background()
		image := filepath.Join(dir, "target.qcow2")
		_ = os.Remove(image)
		if err := qemu.CreateImage(ctx, image, exportPathBytes); err != nil {
			b.Fatal(err)
		}
		opts := qemu.ExportOptions{Path: image, Name: "disk", Connections: 4, Cache: "none", AIO: "native",
			PidFile: filepath.Join(dir, "target.pid")}
		if path == pathTCP {
			opts.Port = testenv.FreePort(b)
		} else {
			opts.Socket = sshd.ExportSocket(port)
		}
		exp, err := qemu.Start(ctx, opts)
		if err != nil {
			b.Fatal(err)
		}
		defer func() { _ = exp.Stop(context.Background(), 0) }()
		var target string
		switch path {
		case pathTCP:
			l := listen(b, "tcp", "127.0.0.1:0")
			defer l.Close()
			go relay(l, client, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(exp.Port)))
			target = "nbd://" + l.Addr().String() + "/disk"
		case pathStream:
			sock := filepath.Join(testenv.ShortTempDir(b), "relay.sock")
			l := listen(b, "unix", sock)
			defer l.Close()
			go relay(l, client, "unix", exp.Socket)
			target = "nbd+unix:///disk?socket=" + url.QueryEscape(sock)
		case pathTunnel:
			if err := m.EnsureForwards(ctx, []tunnel.Forward{{Port: port, Remote: exp.Socket}}); err != nil {
				b.Fatal(err)
			}
			defer m.DropForwards([]int{port})
			target = "nbd+unix:///disk?socket=" + url.QueryEscape(m.SocketPath(port))
		}
		cp, err := blockcopy.New(source.URI, target, blockcopy.Options{Connections: 4, DestinationIsZero: true})
		if err != nil {
			b.Fatal(err)
		}
		began := time.Now()
		res, err := cp.Run(ctx)
		if err != nil {
			b.Fatalf("copy on path %d: %v", path, err)
		}
		took := time.Since(began)
		if res.BytesWritten != exportPathBytes {
			b.Fatalf("copy on path %d wrote %d bytes, want %d", path, res.BytesWritten, exportPathBytes)
		}
		return took
	}

	times := make([][]time.Duration, 3)
	b.ResetTimer()
	for range b.N * exportPathRounds {
		for path := range times {
			times[path] = append(times[path], copyOnce(path))
		}
	}
	b.StopTimer()
	tcp, stream, tun := testenv.Median(times[pathTCP]), testenv.Median(times[pathStream]), testenv.Median(times[pathTunnel])
	b.ReportMetric(tun.Seconds(), "s/tunnel")
	b.ReportMetric(tcp.Seconds(), "s/tcp")
	fmt.Printf("bench export-path data=%dMiB tcp-relay=%.2fs streamlocal-relay=%.2fs tunnel=%.2fs stream/tcp=%.3f tunnel/tcp=%.3f runs=%d load=%s\n",
		exportPathBytes>>20, tcp.Seconds(), stream.Seconds(), tun.Seconds(), stream.Seconds()/tcp.Seconds(), tun.Seconds()/tcp.Seconds(),
		len(times[pathTCP]), loadAverage())
}

func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(b))[:3], "/")
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

func listen(b *testing.B, network, addr string) net.Listener {
	b.Helper()
	l, err := net.Listen(network, addr)
	if err != nil {
		b.Fatal(err)
	}
	return l
}

func sshClient(b *testing.B, sshd *testenv.SSHD) *ssh.Client {
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
	return client
}

// relay carries each connection l accepts through a channel of client to network/remote,
// with the tunnel's buffer size; it returns when l is closed.
func relay(l net.Listener, client *ssh.Client, network, remote string) {
	for {
		local, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer local.Close()
			channel, err := client.Dial(network, remote)
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
}
