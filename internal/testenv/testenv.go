// Package testenv starts real, throwaway instances of the parts diskferry works with
// (Temporal dev server, MariaDB, vcsim, qemu-nbd, nbdkit, sshd) for tests, and always
// tears them down through t.Cleanup.
//
// A helper whose part is missing skips the test on a developer machine but fails it
// when CI=true: CI must never report green for a test that did not run.
package testenv

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TB is the part of testing.TB the helpers use. *testing.T satisfies it; so does the lab's
// runner (internal/lab), which lets `make demo` start the same real parts outside a test.
type TB interface {
	Helper()
	Cleanup(func())
	Errorf(format string, args ...any)
	Fatalf(format string, args ...any)
	Skipf(format string, args ...any)
	Skip(args ...any)
	Logf(format string, args ...any)
	TempDir() string
	Failed() bool
	Name() string
}

// InCI reports whether the tests run under CI, where missing parts are failures: CI set to
// a true value as CI services and people write it (1, true, yes, on; any case).
func InCI() bool { return truthy(os.Getenv("CI")) }

func truthy(s string) bool {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "1", "t", "true", "y", "yes", "on":
		return true
	}
	return false
}

// Integration marks a test that needs real parts: `go test -short` (make test-unit) skips it.
// Every helper below calls it, so tests using them need not.
func Integration(t TB) {
	t.Helper()
	if testing.Testing() && testing.Short() {
		t.Skip("integration test on real parts; skipped by -short")
	}
}

// RequireCommand returns the path of an executable the test needs. When it is missing the
// test fails under CI and is skipped elsewhere, with a message naming the part and how to get it.
func RequireCommand(t TB, name string) string {
	t.Helper()
	Integration(t)
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	Missing(t, "%s not found in PATH (run scripts/setup.sh): %v", name, err)
	return ""
}

// Missing reports a missing real part: fatal under CI, a skip elsewhere.
func Missing(t TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("required test part missing under CI=true: "+format, args...)
	}
	t.Skipf("required test part missing: "+format, args...)
}

// RepoRoot returns the repository root (the directory holding go.mod).
func RepoRoot(t TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatalf("getwd: %v", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// ToolPath returns a binary installed by scripts/setup.sh into the git-ignored .tools/bin.
func ToolPath(t TB, name string) string {
	t.Helper()
	Integration(t)
	path := filepath.Join(RepoRoot(t), ".tools", "bin", name)
	if _, err := os.Stat(path); err != nil {
		Missing(t, "%s not installed at %s (run scripts/setup.sh)", name, path)
	}
	return path
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// ShortTempDir returns a temp dir with a short path, for unix sockets (108-byte limit).
func ShortTempDir(t TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "df")
	if err != nil {
		t.Fatalf("temp dir: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// ProcessEnviron returns the environment a running process was started with, from
// /proc/<pid>/environ.
func ProcessEnviron(t TB, pid int) []string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "environ"))
	if err != nil {
		t.Fatalf("read environment of pid %d: %v", pid, err)
	}
	return strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
}
