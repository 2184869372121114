package testenv_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/diskferry/diskferry/internal/testenv"
)

// serveCounts answers every connection with the number of bytes it received before EOF.
func serveCounts(t *testing.T, l net.Listener) {
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				n, _ := io.Copy(io.Discard, conn)
				_ = binary.Write(conn, binary.BigEndian, n)
			}()
		}
	}()
}

func TestWANLinkDelaysAndLimitsRate(t *testing.T) {
	testenv.Integration(t)
	var hubNS, snaNS string
	t.Run("link", func(t *testing.T) {
		link := testenv.StartWANLink(t, testenv.WANOptions{})
		hubNS, snaNS = link.HubNS, link.SNANS
		listener, err := link.Listen(link.HubNS, net.JoinHostPort(testenv.WANHubIP, "5000"))
		if err != nil {
			t.Fatal(err)
		}
		serveCounts(t, listener)

		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		began := time.Now()
		conn, err := link.DialContext(ctx, link.SNANS, listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		// connect() returns after SYN and SYN-ACK: at least one round trip of 2×10 ms. Only the
		// lower bound is asserted: a busy machine adds time, never takes it away.
		if rtt := time.Since(began); rtt < 20*time.Millisecond {
			t.Errorf("TCP connect over the link took %v, want at least one 20 ms round trip", rtt)
		}

		const size = 6 << 20
		began = time.Now()
		if _, err := io.CopyN(conn, zeroReader{}, size); err != nil {
			t.Fatalf("send: %v", err)
		}
		if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		var received int64
		if err := binary.Read(conn, binary.BigEndian, &received); err != nil {
			t.Fatalf("read count: %v", err)
		}
		elapsed := time.Since(began)
		if received != size {
			t.Fatalf("hub received %d bytes, sent %d", received, size)
		}
		// The link caps the rate: payload is at most 1448/1514 of the wire. How close a transfer
		// comes to the cap depends on the machine's load; make bench measures that, not this test.
		rate := float64(size*8) / elapsed.Seconds()
		if rate > float64(link.Rate) {
			t.Errorf("bulk transfer ran at %.1f Mbit/s over a %d Mbit/s link", rate/1e6, link.Rate/1e6)
		}
		t.Logf("connect+bulk: %.1f Mbit/s", rate/1e6)

		local, err := net.Listen("tcp", net.JoinHostPort(testenv.WANHubIP, "0"))
		if err == nil {
			local.Close()
			t.Errorf("%s is bound in the test's own namespace; it must exist only inside %s", testenv.WANHubIP, link.HubNS)
		}
	})
	for _, ns := range []string{hubNS, snaNS} {
		if _, err := os.Stat(filepath.Join("/run/netns", ns)); !os.IsNotExist(err) {
			t.Errorf("namespace %s still present after cleanup (stat: %v)", ns, err)
		}
	}
}

func TestWANLinkSSHDForwardsInsideHub(t *testing.T) {
	link := testenv.StartWANLink(t, testenv.WANOptions{})
	s := link.StartSSHD(t)

	// A unix socket, as an export: sshd in the hub namespace reaches it by path.
	echo, err := net.Listen("unix", s.ExportSocket(testenv.SSHDExportPortMin))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { echo.Close() })
	go func() {
		for {
			conn, err := echo.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				_, _ = io.Copy(conn, conn)
			}()
		}
	}()

	keyPEM, err := os.ReadFile(s.ClientKeyPath)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	hostKeys, err := knownhosts.New(s.KnownHostsPath)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := link.DialContext(ctx, link.SNANS, s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	sshConn, chans, reqs, err := ssh.NewClientConn(conn, s.Addr, &ssh.ClientConfig{
		User:            s.User,
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: hostKeys,
	})
	if err != nil {
		conn.Close()
		t.Fatalf("ssh login over the link: %v\nsshd log:\n%s", err, s.Log())
	}
	client := ssh.NewClient(sshConn, chans, reqs)
	defer client.Close()

	channel, err := client.Dial("unix", echo.Addr().String())
	if err != nil {
		t.Fatalf("forward to hub %s: %v", echo.Addr(), err)
	}
	defer channel.Close()
	payload := bytes.Repeat([]byte("diskferry"), 1000)
	if _, err := channel.Write(payload); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(channel, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("echo through sshd in the hub namespace returned different bytes")
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
