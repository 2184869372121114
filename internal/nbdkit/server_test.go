package nbdkit

import (
	"bytes"
	"context"
	"crypto/rand"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/testenv"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

// readAll reads a whole NBD export with nbdcopy, the reference client.
func readAll(t *testing.T, uri string) []byte {
	t.Helper()
	nbdcopy := testenv.RequireCommand(t, "nbdcopy")
	var out, errOut bytes.Buffer
	cmd := exec.CommandContext(testCtx(t), nbdcopy, uri, "-")
	cmd.Stdout, cmd.Stderr = &out, &errOut
	require.NoError(t, cmd.Run(), "nbdcopy: %s", errOut.String())
	return out.Bytes()
}

func startServer(t *testing.T, src Source, opts Options) *Server {
	t.Helper()
	testenv.RequireCommand(t, "nbdkit")
	if opts.Dir == "" {
		opts.Dir = testenv.ShortTempDir(t)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	}
	s, err := Start(testCtx(t), src, opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Stop(context.Background()) })
	return s
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func cmdline(t *testing.T, pid int) string {
	t.Helper()
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	require.NoError(t, err)
	return string(bytes.ReplaceAll(raw, []byte{0}, []byte{' '}))
}

func TestFileSourceServes(t *testing.T) {
	testenv.RequireCommand(t, "nbdkit")
	dir := testenv.ShortTempDir(t)
	data := randomBytes(t, 3<<20)
	path := filepath.Join(dir, "disk.raw")
	require.NoError(t, os.WriteFile(path, data, 0o600))

	began := time.Now()
	s := startServer(t, FileSource{Path: path}, Options{Dir: filepath.Join(dir, "run")})
	t.Logf("nbdkit file ready in %v", time.Since(began))
	assert.Equal(t, "nbd+unix:///?socket="+strings.ReplaceAll(s.Socket, "/", "%2F"), s.URI())
	assert.Contains(t, cmdline(t, s.PID()), "--readonly", "sources are served read-only")
	assert.Contains(t, cmdline(t, s.PID()), "--threads 2 ", "few threads per connection (DefaultThreads)")

	assert.True(t, bytes.Equal(data, readAll(t, s.URI())), "nbd content equals the file")

	require.NoError(t, s.Stop(testCtx(t)))
	select {
	case <-s.Done():
	default:
		t.Fatal("nbdkit still running after Stop")
	}
	assert.NoFileExists(t, s.Socket)
	assert.ErrorIs(t, syscall.Kill(s.PID(), 0), syscall.ESRCH)
	require.NoError(t, s.Stop(testCtx(t)), "stopping twice succeeds")
}

// The vCenter password reaches nbdkit only as a file; the worker's environment, which may
// hold it too, does not.
func TestServerGetsNoWorkerSecrets(t *testing.T) {
	t.Setenv("DISKFERRY_VCENTER_PASSWORD", "not-for-children")
	path := filepath.Join(t.TempDir(), "disk.raw")
	require.NoError(t, os.WriteFile(path, randomBytes(t, 4096), 0o600))
	s := startServer(t, FileSource{Path: path}, Options{})
	env := testenv.ProcessEnviron(t, s.PID())
	assert.NotEmpty(t, env)
	for _, kv := range env {
		assert.False(t, strings.HasPrefix(kv, "DISKFERRY_"), "nbdkit's environment holds %q", kv)
		assert.NotContains(t, kv, "not-for-children")
	}
}

func TestStartFailureReportsStderr(t *testing.T) {
	testenv.RequireCommand(t, "nbdkit")
	path := filepath.Join(t.TempDir(), "disk.raw")
	require.NoError(t, os.WriteFile(path, []byte("x"), 0o600))
	dir := testenv.ShortTempDir(t)
	_, err := Start(testCtx(t), FileSource{Path: path}, Options{Dir: dir, Filters: []Filter{{Name: "no-such-filter"}}})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no-such-filter", "nbdkit's own message explains the failure")
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Empty(t, entries, "a failed start leaves neither socket nor secrets")
}

func TestStopRemovesOwnDir(t *testing.T) {
	testenv.RequireCommand(t, "nbdkit")
	path := filepath.Join(t.TempDir(), "disk.raw")
	require.NoError(t, os.WriteFile(path, randomBytes(t, 4096), 0o600))
	s, err := Start(testCtx(t), FileSource{Path: path}, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Stop(context.Background()) })
	dir := filepath.Dir(s.Socket)
	st, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), st.Mode().Perm(), "the socket directory is private")
	require.NoError(t, s.Stop(testCtx(t)))
	assert.NoDirExists(t, dir)
}
