package testenv_test

import (
	"bytes"
	"io"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/diskferry/diskferry/internal/testenv"
)

func sshdClient(t *testing.T, s *testenv.SSHD) *ssh.Client {
	t.Helper()
	keyPEM, err := os.ReadFile(s.ClientKeyPath)
	if err != nil {
		t.Fatalf("read client key: %v", err)
	}
	signer, err := ssh.ParsePrivateKey(keyPEM)
	if err != nil {
		t.Fatalf("parse client key: %v", err)
	}
	hostKeys, err := knownhosts.New(s.KnownHostsPath)
	if err != nil {
		t.Fatalf("known_hosts: %v", err)
	}
	client, err := ssh.Dial("tcp", s.Addr, &ssh.ClientConfig{
		User:            s.User,
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: hostKeys,
		Timeout:         5 * time.Second,
	})
	if err != nil {
		t.Fatalf("ssh dial %s: %v\nsshd log:\n%s", s.Addr, err, s.Log())
	}
	t.Cleanup(func() { client.Close() })
	return client
}

func TestSSHDForwardCarriesBytes(t *testing.T) {
	s := testenv.StartSSHD(t)

	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
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

	client := sshdClient(t, s)
	conn, err := client.Dial("tcp", echo.Addr().String())
	if err != nil {
		t.Fatalf("forward to %s: %v\nsshd log:\n%s", echo.Addr(), err, s.Log())
	}
	defer conn.Close()

	payload := bytes.Repeat([]byte("diskferry"), 100_000)
	go func() { _, _ = conn.Write(payload) }()
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(conn, got); err != nil {
		t.Fatalf("read echo through forward: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("bytes through the forward differ from the bytes sent")
	}
}

func TestSSHDRefusesForwardOutsideLoopback(t *testing.T) {
	s := testenv.StartSSHD(t)
	client := sshdClient(t, s)
	// PermitOpen allows 127.0.0.1:* only; the request is refused before any connect.
	_, err := client.Dial("tcp", net.JoinHostPort("localhost", strconv.Itoa(s.Port)))
	if err == nil {
		t.Fatal("forward to localhost (not 127.0.0.1) was allowed; PermitOpen not applied")
	}
}

func TestSSHDRestartKeepsPortAndKeys(t *testing.T) {
	s := testenv.StartSSHD(t)
	client := sshdClient(t, s)
	s.Restart()
	// The old connection died with the server's children.
	if _, _, err := client.SendRequest("keepalive@openssh.com", true, nil); err == nil {
		t.Fatal("connection survived an sshd restart")
	}
	sshdClient(t, s) // same address, same pinned host key
}
