package testenv

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/diskferry/diskferry/internal/nbdprobe"
)

// NBDServer is a running NBD server started for a test.
type NBDServer struct {
	URI    string // nbd://127.0.0.1:PORT or nbd+unix:///?socket=PATH
	Path   string // the served file
	PID    int
	Port   int    // TCP servers
	Socket string // unix-socket servers
	cmd    *exec.Cmd
	waited chan struct{}
}

// Kill stops the server with SIGKILL and waits for it; safe to call more than once.
func (s *NBDServer) Kill() {
	_ = s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.waited
}

// Stop sends SIGSTOP, freezing the server with its connections open (a hung peer).
func (s *NBDServer) Stop() { _ = s.cmd.Process.Signal(syscall.SIGSTOP) }

// QemuNBDOptions tune StartQemuNBD.
type QemuNBDOptions struct {
	Format string   // image format; default qcow2
	Shared int      // --shared; default 8 (the default 1 hangs a second client)
	Args   []string // extra qemu-nbd arguments, e.g. --discard=unmap
}

// CreateQcow2 makes an empty qcow2 of size bytes in a temp dir and returns its path.
func CreateQcow2(t TB, size int64) string {
	t.Helper()
	qemuImg := RequireCommand(t, "qemu-img")
	path := filepath.Join(t.TempDir(), "disk.qcow2")
	out, err := exec.Command(qemuImg, "create", "-q", "-f", "qcow2", path, strconv.FormatInt(size, 10)).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img create %s: %v: %s", path, err, out)
	}
	return path
}

// StartQemuNBD serves path with `qemu-nbd -t --shared=N -b 127.0.0.1 -p PORT` and waits until
// the server greets. It is killed on cleanup.
func StartQemuNBD(t TB, path string, opts QemuNBDOptions) *NBDServer {
	t.Helper()
	bin := RequireCommand(t, "qemu-nbd")
	if opts.Format == "" {
		opts.Format = "qcow2"
	}
	if opts.Shared == 0 {
		opts.Shared = 8
	}
	var lastErr error
	for range 5 { // the free port may be taken between FreePort and bind
		port := FreePort(t)
		args := append([]string{"-t", "--shared=" + strconv.Itoa(opts.Shared), "-b", "127.0.0.1",
			"-p", strconv.Itoa(port), "-f", opts.Format}, opts.Args...)
		args = append(args, path)
		s, err := startNBD(t, bin, args, func() (net.Conn, error) {
			return net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
		})
		if err == nil {
			s.Path, s.Port = path, port
			s.URI = fmt.Sprintf("nbd://127.0.0.1:%d", port)
			return s
		}
		lastErr = err
		if !strings.Contains(err.Error(), "Address already in use") {
			break
		}
	}
	t.Fatalf("start qemu-nbd on %s: %v", path, lastErr)
	return nil
}

// NbdkitOptions tune StartNbdkitFile.
type NbdkitOptions struct {
	Filters []string // filter names, e.g. "delay"
	Params  []string // key=value for the plugin and filters, e.g. "rdelay=10ms"
}

// StartNbdkitFile serves path with `nbdkit --exit-with-parent -U SOCK file file=PATH`
// (foreground, so the test owns the PID) and waits until it greets. Killed on cleanup.
func StartNbdkitFile(t TB, path string, opts NbdkitOptions) *NBDServer {
	t.Helper()
	bin := RequireCommand(t, "nbdkit")
	sock := filepath.Join(ShortTempDir(t), "nbd.sock")
	args := []string{"-f", "--exit-with-parent", "-U", sock}
	for _, f := range opts.Filters {
		args = append(args, "--filter="+f)
	}
	args = append(args, "file", "file="+path)
	args = append(args, opts.Params...)
	s, err := startNBD(t, bin, args, func() (net.Conn, error) {
		return net.DialTimeout("unix", sock, time.Second)
	})
	if err != nil {
		t.Fatalf("start nbdkit on %s: %v", path, err)
	}
	s.Path, s.Socket = path, sock
	s.URI = "nbd+unix:///?socket=" + sock
	return s
}

// startNBD runs the server and waits for the NBD newstyle greeting ("NBDMAGIC" "IHAVEOPT"),
// which proves the server negotiates, not merely that the port accepts.
func startNBD(t TB, bin string, args []string, dial func() (net.Conn, error)) (*NBDServer, error) {
	t.Helper()
	var stderr bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	s := &NBDServer{PID: cmd.Process.Pid, cmd: cmd, waited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(s.waited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT) // a stopped process ignores SIGKILL until continued
		s.Kill()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-s.waited:
			return nil, fmt.Errorf("%s exited: %s", filepath.Base(bin), strings.TrimSpace(stderr.String()))
		default:
		}
		if err := greet(dial); err == nil {
			return s, nil
		} else if time.Now().After(deadline) {
			s.Kill()
			return nil, fmt.Errorf("%s not ready after 10s: %w: %s", filepath.Base(bin), err, stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func greet(dial func() (net.Conn, error)) error {
	c, err := dial()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return nbdprobe.Greet(ctx, c)
}

// WriteFileAt writes data at off in the file at path (creating it), for building fixtures
// with holes.
func WriteFileAt(t TB, path string, off int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatalf("write %s at %d: %v", path, off, err)
	}
}

// StartNbdkitSocket runs `nbdkit -f --exit-with-parent -U SOCK [--filter=F]… PLUGIN ARGS…`
// on the unix socket sock (e.g. an in-memory disk behind the error filter on a hub export's
// socket: a target that fails every write like a full disk) and waits until it greets.
// Killed on cleanup.
func StartNbdkitSocket(t TB, sock, plugin string, opts NbdkitOptions) *NBDServer {
	t.Helper()
	bin := RequireCommand(t, "nbdkit")
	args := []string{"-f", "--exit-with-parent", "-U", sock}
	for _, f := range opts.Filters {
		args = append(args, "--filter="+f)
	}
	args = append(args, plugin)
	args = append(args, opts.Params...)
	s, err := startNBD(t, bin, args, func() (net.Conn, error) {
		return net.DialTimeout("unix", sock, time.Second)
	})
	if err != nil {
		t.Fatalf("start nbdkit %s on %s: %v", plugin, sock, err)
	}
	s.URI = "nbd+unix:///?socket=" + sock
	return s
}
