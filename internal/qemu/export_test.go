package qemu

import (
	"cmp"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/diskferry/diskferry/internal/testenv"
)

func TestExportArgs(t *testing.T) {
	base := ExportOptions{Path: "/hub/d.qcow2", PidFile: "/run/d.pid", Port: 10809, Name: "disk-204"}
	for _, conns := range []int{0, 1, 4} {
		opts := base
		opts.Connections = conns
		args, err := opts.Args()
		require.NoError(t, err)
		// --shared must exceed the connections the copy opens, and is never left at qemu's default of 1.
		assert.Contains(t, args, "--shared="+strconv.Itoa(max(conns, 1)+1))
		shared := sharedOf(t, args)
		assert.GreaterOrEqual(t, shared, 2)
		assert.Greater(t, shared, conns)
	}

	args, err := base.Args()
	require.NoError(t, err)
	for _, want := range []string{"--fork", "--pid-file=/run/d.pid", "-t", "--bind=127.0.0.1", "--port=10809",
		"--export-name=disk-204", "--format=qcow2"} {
		assert.Contains(t, args, want)
	}
	discard, detect := slices.Index(args, "--discard=unmap"), slices.Index(args, "--detect-zeroes=unmap")
	require.True(t, discard >= 0 && detect >= 0, "%v", args)
	assert.Less(t, discard, detect, "qemu-nbd exits unless --discard=unmap precedes --detect-zeroes=unmap")
	assert.Equal(t, "/hub/d.qcow2", args[len(args)-1])

	opts := base
	opts.Addr, opts.Cache, opts.AIO, opts.ReadOnly = "10.0.0.5", "none", "native", true
	args, err = opts.Args()
	require.NoError(t, err)
	assert.Contains(t, args, "--bind=10.0.0.5")
	assert.Contains(t, args, "--cache=none")
	assert.Contains(t, args, "--aio=native")
	assert.Contains(t, args, "--read-only")

	sock := ExportOptions{Path: "/hub/d.qcow2", PidFile: "/run/d.pid", Socket: "/run/d.sock"}
	args, err = sock.Args()
	require.NoError(t, err)
	assert.Contains(t, args, "--socket=/run/d.sock")
	assert.NotContains(t, strings.Join(args, " "), "--port")
	assert.Equal(t, 2, sharedOf(t, args))

	for name, bad := range map[string]ExportOptions{
		"no path":      {PidFile: "/p", Port: 1},
		"no pid file":  {Path: "/i", Port: 1},
		"no port":      {Path: "/i", PidFile: "/p"},
		"port range":   {Path: "/i", PidFile: "/p", Port: 70000},
		"both":         {Path: "/i", PidFile: "/p", Port: 1, Socket: "/s"},
		"cache":        {Path: "/i", PidFile: "/p", Port: 1, Cache: "fast"},
		"aio native":   {Path: "/i", PidFile: "/p", Port: 1, AIO: "native"},
		"negative con": {Path: "/i", PidFile: "/p", Port: 1, Connections: -1},
	} {
		_, err := bad.Args()
		assert.Error(t, err, name)
	}
}

func sharedOf(t *testing.T, args []string) int {
	t.Helper()
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--shared="); ok {
			n, err := strconv.Atoi(v)
			require.NoError(t, err)
			return n
		}
	}
	t.Fatalf("no --shared in %v", args)
	return 0
}

type exportFixture struct {
	dir   string
	image string
}

func newExportFixture(t *testing.T) exportFixture {
	t.Helper()
	testenv.RequireCommand(t, "qemu-nbd")
	requireQemuImg(t)
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.qcow2")
	require.NoError(t, CreateImage(testCtx(t), image, testSize))
	return exportFixture{dir: dir, image: image}
}

func (f exportFixture) start(t *testing.T, opts ExportOptions) (*Export, error) {
	t.Helper()
	opts.Path = cmp.Or(opts.Path, f.image)
	if opts.PidFile == "" {
		opts.PidFile = filepath.Join(f.dir, "export-"+strconv.Itoa(opts.Port)+".pid")
	}
	exp, err := Start(testCtx(t), opts)
	if err == nil {
		t.Cleanup(func() { _ = exp.Stop(context.Background(), 5*time.Second) })
	}
	return exp, err
}

// greet opens a connection and reads the NBD greeting, leaving the connection open.
func greet(t *testing.T, network, addr string) net.Conn {
	t.Helper()
	conn, err := net.DialTimeout(network, addr, 2*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(3*time.Second)))
	buf := make([]byte, 16)
	_, err = io.ReadFull(conn, buf)
	require.NoError(t, err, "the server must greet this connection")
	assert.Equal(t, "NBDMAGICIHAVEOPT", string(buf))
	return conn
}

func TestExportLifecycle(t *testing.T) {
	f := newExportFixture(t)
	port := testenv.FreePort(t)
	began := time.Now()
	exp, err := f.start(t, ExportOptions{Port: port, Name: "disk", Connections: 2, Cache: "writeback"})
	require.NoError(t, err)
	t.Logf("export ready in %v", time.Since(began))
	assert.Equal(t, "nbd://127.0.0.1:"+strconv.Itoa(port)+"/disk", exp.URI())

	// The daemon runs in its own session, so it survives the worker's process group.
	sid, err := unix.Getsid(exp.PID)
	require.NoError(t, err)
	assert.Equal(t, exp.PID, sid)

	found, err := Find(exp.PidFile)
	require.NoError(t, err)
	assert.Equal(t, exp.PID, found.PID)
	assert.Equal(t, port, found.Port)
	assert.Equal(t, "127.0.0.1", found.Addr)
	assert.Equal(t, "disk", found.Name)
	assert.Equal(t, f.image, found.Path)
	assert.Equal(t, exp.URI(), found.URI())

	// Connections=2 and both held open: a third client still gets its greeting
	// (the "--shared=1 hangs the second connection" lesson).
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	greet(t, "tcp", addr)
	greet(t, "tcp", addr)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	require.NoError(t, greetExport(ctx, "tcp", addr))

	info, err := Info(testCtx(t), f.image)
	require.NoError(t, err, "info -U works on a served image")
	assert.Equal(t, testSize, info.VirtualSize)
	_, err = Check(testCtx(t), f.image)
	assert.ErrorIs(t, err, ErrImageLocked, "check without force-share must not read a served image")

	// Stop through a handle recovered from the pid file, as a restarted worker would.
	require.NoError(t, found.Stop(testCtx(t), 5*time.Second))
	assert.NoFileExists(t, exp.PidFile)
	_, err = Find(exp.PidFile)
	assert.ErrorIs(t, err, ErrNotRunning)
	_, err = net.DialTimeout("tcp", addr, time.Second)
	assert.Error(t, err, "nothing listens after stop")
	require.NoError(t, exp.Stop(testCtx(t), time.Second), "already gone counts as stopped")
	require.NoError(t, StopPidFile(testCtx(t), exp.PidFile, time.Second))

	_, err = Check(testCtx(t), f.image)
	assert.NoError(t, err, "the image is clean and unlocked after stop")
}

// qemu-nbd outlives the worker's call; whatever secret the worker's environment holds
// must not be readable in the daemon's.
func TestExportGetsNoWorkerSecrets(t *testing.T) {
	t.Setenv("DISKFERRY_VCENTER_PASSWORD", "not-for-children")
	f := newExportFixture(t)
	exp, err := f.start(t, ExportOptions{Socket: filepath.Join(f.dir, "e.sock"), Name: "disk"})
	require.NoError(t, err)
	env := testenv.ProcessEnviron(t, exp.PID)
	assert.NotEmpty(t, env)
	for _, kv := range env {
		assert.False(t, strings.HasPrefix(kv, "DISKFERRY_"), "qemu-nbd's environment holds %q", kv)
		assert.NotContains(t, kv, "not-for-children")
	}
}

// qemu-nbd's request buffers must come from its heap, not a fresh mmap per request (see
// MallocTunables): the daemon's environment carries the tunables.
func TestExportRunsWithMallocTunables(t *testing.T) {
	f := newExportFixture(t)
	exp, err := f.start(t, ExportOptions{Socket: filepath.Join(f.dir, "e.sock"), Name: "disk"})
	require.NoError(t, err)
	// glibc cuts the variable at its colons in place while parsing it, so /proc shows the
	// settings as separate entries once qemu-nbd runs.
	env := testenv.ProcessEnviron(t, exp.PID)
	for _, setting := range strings.Split(MallocTunables, ":") {
		assert.True(t, slices.ContainsFunc(env, func(kv string) bool { return strings.HasSuffix(kv, setting) }),
			"qemu-nbd's environment lacks %s: %q", setting, env)
	}
}

func TestExportUnixSocket(t *testing.T) {
	f := newExportFixture(t)
	sock := filepath.Join(f.dir, "e.sock")
	exp, err := f.start(t, ExportOptions{Socket: sock, Name: "verify", ReadOnly: true, PidFile: filepath.Join(f.dir, "s.pid")})
	require.NoError(t, err)
	assert.Equal(t, "nbd+unix:///verify?socket="+strings.ReplaceAll(sock, "/", "%2F"), exp.URI())
	greet(t, "unix", sock)

	found, err := Find(exp.PidFile)
	require.NoError(t, err)
	assert.Equal(t, sock, found.Socket)
	require.NoError(t, exp.Stop(testCtx(t), 5*time.Second))
	assert.NoFileExists(t, sock)
}

func TestExportPortInUse(t *testing.T) {
	f := newExportFixture(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port

	_, err = f.start(t, ExportOptions{Port: port, Name: "disk"})
	require.ErrorIs(t, err, ErrPortInUse)
	assert.NotErrorIs(t, err, ErrImageLocked)
	_, err = Find(filepath.Join(f.dir, "export-"+strconv.Itoa(port)+".pid"))
	assert.ErrorIs(t, err, ErrNotRunning, "a failed start leaves no export behind")
}

func TestExportImageLocked(t *testing.T) {
	f := newExportFixture(t)
	_, err := f.start(t, ExportOptions{Port: testenv.FreePort(t), Name: "disk"})
	require.NoError(t, err)

	_, err = f.start(t, ExportOptions{Port: testenv.FreePort(t), Name: "again"})
	require.ErrorIs(t, err, ErrImageLocked)
	assert.NotErrorIs(t, err, ErrPortInUse)
}

func TestExportStartIsIdempotentPerPidFile(t *testing.T) {
	f := newExportFixture(t)
	opts := ExportOptions{Port: testenv.FreePort(t), Name: "disk", Connections: 4}
	exp, err := f.start(t, opts)
	require.NoError(t, err)
	again, err := f.start(t, opts)
	require.NoError(t, err, "a retried start finds its export")
	assert.Equal(t, exp.PID, again.PID)

	other := filepath.Join(f.dir, "other.qcow2")
	require.NoError(t, CreateImage(testCtx(t), other, testSize))
	_, err = f.start(t, ExportOptions{Path: other, Port: testenv.FreePort(t), PidFile: exp.PidFile})
	assert.ErrorContains(t, err, "running qemu-nbd", "one pid file, one export")
	_, err = Find(exp.PidFile)
	assert.NoError(t, err, "the first export keeps running")
}

func TestExportSIGTERMLeavesPidFile(t *testing.T) {
	f := newExportFixture(t)
	exp, err := f.start(t, ExportOptions{Port: testenv.FreePort(t), Name: "disk"})
	require.NoError(t, err)

	// Someone else terminates the daemon: the pid file stays behind, and Find must not
	// mistake the dead (possibly zombie) pid for a running export.
	require.NoError(t, syscall.Kill(exp.PID, syscall.SIGTERM))
	require.Eventually(t, func() bool {
		_, err := Find(exp.PidFile)
		return err != nil
	}, 5*time.Second, 10*time.Millisecond)
	_, err = Find(exp.PidFile)
	assert.ErrorIs(t, err, ErrNotRunning)
	assert.FileExists(t, exp.PidFile, "qemu-nbd leaves its pid file behind")

	require.NoError(t, StopPidFile(testCtx(t), exp.PidFile, time.Second))
	assert.NoFileExists(t, exp.PidFile)
}

func TestFindRejectsForeignPid(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "x.pid")
	// This test process is alive but is not a qemu-nbd: a reused pid must not count.
	require.NoError(t, os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600))
	_, err := Find(pidFile)
	assert.ErrorIs(t, err, ErrNotRunning)
	require.NoError(t, os.WriteFile(pidFile, []byte("garbage"), 0o600))
	_, err = Find(pidFile)
	assert.ErrorIs(t, err, ErrNotRunning)
	_, err = Find(filepath.Join(dir, "none.pid"))
	assert.ErrorIs(t, err, ErrNotRunning)
	require.NoError(t, StopPidFile(testCtx(t), pidFile, time.Second), "nothing running counts as stopped")
	assert.NoFileExists(t, pidFile)
}
