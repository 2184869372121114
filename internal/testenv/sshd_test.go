package testenv_test

import (
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
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

// unixEcho serves an echo on a unix socket at path, standing in for an export.
func unixEcho(t *testing.T, path string) string {
	t.Helper()
	echo, err := net.Listen("unix", path)
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
	return path
}

func TestSSHDStreamLocalForwardCarriesBytes(t *testing.T) {
	s := testenv.StartSSHD(t)
	path := unixEcho(t, s.ExportSocket(testenv.SSHDExportPortMin))
	client := sshdClient(t, s)
	conn, err := client.Dial("unix", path)
	if err != nil {
		t.Fatalf("stream-local forward to %s: %v\nsshd log:\n%s", path, err, s.Log())
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

// TestSSHDIsLockedDown: the SNA's key opens no shell, runs no command, reaches no TCP port
// (the hub's MariaDB and Temporal listen on loopback) and no socket but the exports'.
func TestSSHDIsLockedDown(t *testing.T) {
	s := testenv.StartSSHD(t)
	client := sshdClient(t, s)

	// A loopback TCP service, as MariaDB on the hub: sshd itself listens on one.
	if conn, err := client.Dial("tcp", s.Addr); err == nil {
		conn.Close()
		t.Fatalf("TCP forward to %s was allowed", s.Addr)
	}

	const marker = "diskferry-shell-ran"
	for name, run := range map[string]func(*ssh.Session) error{
		"exec": func(sess *ssh.Session) error { return sess.Run("echo " + marker) },
		"shell": func(sess *ssh.Session) error {
			sess.Stdin = strings.NewReader("echo " + marker + "\nexit 0\n")
			if err := sess.Shell(); err != nil {
				return err
			}
			return sess.Wait()
		},
	} {
		sess, err := client.NewSession()
		if err != nil {
			continue // refusing the session outright is locked down too
		}
		var out, errOut bytes.Buffer
		sess.Stdout, sess.Stderr = &out, &errOut
		err = run(sess)
		sess.Close()
		if err == nil || strings.Contains(out.String(), marker) {
			t.Errorf("%s ran (err %v): %q %q", name, err, out.String(), errOut.String())
		}
	}

	// A socket outside the exports, as MariaDB's or Docker's.
	if conn, err := client.Dial("unix", unixEcho(t, filepath.Join(t.TempDir(), "other.sock"))); err == nil {
		conn.Close()
		t.Fatal("stream-local forward to a socket that is no export was allowed")
	}

	// Still the one thing the account is for.
	if conn, err := client.Dial("unix", unixEcho(t, s.ExportSocket(testenv.SSHDExportPortMax))); err != nil {
		t.Fatalf("stream-local forward refused: %v\nsshd log:\n%s", err, s.Log())
	} else {
		conn.Close()
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

// A second SSHD given the first one's client key lets that key in and forwards to its own
// run directory's exports.
func TestSSHDSharedClientKey(t *testing.T) {
	first := testenv.StartSSHD(t)
	second := testenv.StartSSHDWith(t, testenv.SSHDOptions{ClientKeyPath: first.ClientKeyPath})
	if second.ClientKeyPath != first.ClientKeyPath || second.HubRunDir == first.HubRunDir {
		t.Fatalf("second sshd: key %s, run dir %s", second.ClientKeyPath, second.HubRunDir)
	}
	path := unixEcho(t, second.ExportSocket(testenv.SSHDExportPortMin))
	conn, err := sshdClient(t, second).Dial("unix", path)
	if err != nil {
		t.Fatalf("forward with the shared key: %v\nsshd log:\n%s", err, second.Log())
	}
	conn.Close()
}
