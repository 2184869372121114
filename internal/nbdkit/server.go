// Package nbdkit serves a source disk on the SNA through nbdkit on a private unix socket:
// the file plugin (lab), curl (the datastore HTTPS file of a snapshotted flat disk) and
// vddk (production, VMware's VDDK).
package nbdkit

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/diskferry/diskferry/internal/childenv"
	"github.com/diskferry/diskferry/internal/nbdprobe"
)

const (
	// DefaultReadyTimeout bounds the wait for the first NBD handshake; curl and vddk connect
	// to vSphere before they serve, so it is generous.
	DefaultReadyTimeout = 30 * time.Second
	// DefaultStopTimeout is how long Stop waits after SIGTERM before it sends SIGKILL.
	DefaultStopTimeout = 10 * time.Second

	socketName = "nbdkit.sock"
	stderrTail = 8 << 10
)

// Source is an nbdkit plugin and its parameters.
type Source interface {
	// Plugin is the nbdkit plugin name.
	Plugin() string
	// Params returns the plugin's key=value parameters. Secrets are written as 0600 files
	// under files.SecretDir and passed as key=+FILE, so they never appear in the process
	// arguments; other files nbdkit reads while it serves go under files.Dir.
	Params(ctx context.Context, files Files) ([]string, error)
}

// Files are the private directories a source writes the files nbdkit reads into.
type Files struct {
	Dir       string // lives as long as the server
	SecretDir string // removed once nbdkit is ready: nbdkit reads +FILE secrets at start
}

// Filter is an nbdkit filter (e.g. retry, cacheextents, rate) with its parameters.
type Filter struct {
	Name   string
	Params map[string]string
}

// DefaultThreads is nbdkit's --threads when Options leaves it 0. A copy (internal/blockcopy)
// keeps at most two requests in flight per connection, and nbdkit's default of 16 worker
// threads per connection each grows its own request buffer, cleared on growth: at 2 MiB
// requests over five connections that is up to 160 MiB of fresh pages faulted in and
// cleared per copy. In perf, memset and its page faults were 40 % of nbdkit's CPU; with
// two threads scripts/bench.sh's s2g-holes copy cost nbdkit 0.44 CPU-s instead of 1.8
// and took 3.6 s instead of 6.7 s (docs/architecture.md, Data-plane performance).
const DefaultThreads = 2

// Options controls how nbdkit runs.
type Options struct {
	// Dir is a private directory for the socket and secret files. Empty: a new 0700
	// temporary directory, removed by Stop.
	Dir          string
	Writable     bool // sources are read-only unless this is set
	Threads      int  // nbdkit --threads; 0 means DefaultThreads
	Filters      []Filter
	ReadyTimeout time.Duration // default DefaultReadyTimeout
	StopTimeout  time.Duration // default DefaultStopTimeout
	Binary       string        // default "nbdkit" from PATH
	Logger       *slog.Logger  // receives nbdkit's stderr; default discards
}

// Args returns nbdkit's argument list for a source served on socket.
func Args(ctx context.Context, src Source, opts Options, socket string, files Files) ([]string, error) {
	params, err := src.Params(ctx, files)
	if err != nil {
		return nil, fmt.Errorf("%s plugin: %w", src.Plugin(), err)
	}
	args := []string{
		"--foreground",
		// nbdkit dies with the worker instead of serving a snapshot nobody reads.
		"--exit-with-parent",
		"--unix", socket,
	}
	if !opts.Writable {
		args = append(args, "--readonly")
	}
	if opts.Threads > 0 {
		args = append(args, "--threads", strconv.Itoa(opts.Threads))
	}
	var filterParams []string
	for _, f := range opts.Filters {
		if f.Name == "" {
			return nil, errors.New("filter without a name")
		}
		args = append(args, "--filter="+f.Name)
		for _, k := range slices.Sorted(maps.Keys(f.Params)) {
			filterParams = append(filterParams, k+"="+f.Params[k])
		}
	}
	args = append(args, src.Plugin())
	args = append(args, params...)
	return append(args, filterParams...), nil
}

// Server is a running nbdkit, a child of this process.
type Server struct {
	Socket string

	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
	stderr  *tailWriter
	dir     string
	ownDir  bool
	secrets []string
	timeout time.Duration
	log     *slog.Logger
	stopMu  sync.Mutex
}

// Start runs nbdkit for src and returns once a client completes the NBD handshake on its
// socket. Secret files are removed as soon as nbdkit is ready: it reads them at start.
func Start(ctx context.Context, src Source, opts Options) (*Server, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("plugin", src.Plugin())
	opts.Threads = cmp.Or(opts.Threads, DefaultThreads)
	s := &Server{done: make(chan struct{}), stderr: &tailWriter{log: log}, log: log,
		timeout: cmp.Or(opts.StopTimeout, DefaultStopTimeout)}
	if opts.Dir == "" {
		dir, err := os.MkdirTemp("", "nbdkit-")
		if err != nil {
			return nil, fmt.Errorf("start nbdkit %s: %w", src.Plugin(), err)
		}
		s.dir, s.ownDir = dir, true
	} else {
		if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
			return nil, fmt.Errorf("start nbdkit %s: %w", src.Plugin(), err)
		}
		s.dir = opts.Dir
	}
	s.Socket = filepath.Join(s.dir, socketName)
	secretDir, err := os.MkdirTemp(s.dir, "secrets-")
	if err != nil {
		s.cleanup()
		return nil, fmt.Errorf("start nbdkit %s: %w", src.Plugin(), err)
	}
	s.secrets = append(s.secrets, secretDir)

	args, err := Args(ctx, src, opts, s.Socket, Files{Dir: s.dir, SecretDir: secretDir})
	if err != nil {
		s.cleanup()
		return nil, fmt.Errorf("start nbdkit: %w", err)
	}
	if err := os.Remove(s.Socket); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.cleanup()
		return nil, fmt.Errorf("start nbdkit %s: stale socket: %w", src.Plugin(), err)
	}
	began := time.Now()
	s.cmd = exec.Command(cmp.Or(opts.Binary, "nbdkit"), args...)
	s.cmd.Env = childenv.Environ()
	s.cmd.Stdout, s.cmd.Stderr = s.stderr, s.stderr
	// Its own process group: a terminal's ^C goes to the worker, which stops nbdkit in order.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		s.cleanup()
		return nil, fmt.Errorf("start nbdkit %s: %w", src.Plugin(), err)
	}
	go func() {
		s.waitErr = s.cmd.Wait()
		close(s.done)
	}()

	readyCtx, cancel := context.WithTimeout(ctx, cmp.Or(opts.ReadyTimeout, DefaultReadyTimeout))
	defer cancel()
	if err := s.waitReady(readyCtx); err != nil {
		stopErr := s.Stop(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("start nbdkit %s: %w", src.Plugin(), errors.Join(err, stopErr))
	}
	s.removeSecrets()
	log.Info("nbdkit ready", "pid", s.cmd.Process.Pid, "uri", s.URI(), "took", time.Since(began))
	return s, nil
}

func (s *Server) waitReady(ctx context.Context) error {
	var last error
	for {
		select {
		case <-s.done:
			return fmt.Errorf("nbdkit exited before serving: %v: %s", s.waitErr, s.stderr.String())
		default:
		}
		if _, err := os.Stat(s.Socket); err == nil {
			last = openExport(ctx, s.Socket)
			if last == nil {
				return nil
			}
			if errors.Is(last, nbdprobe.ErrExportRefused) {
				return fmt.Errorf("%w: %s", last, s.stderr.String())
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not ready: %w (last: %v): %s", ctx.Err(), last, s.stderr.String())
		case <-s.done:
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// openExport proves the source opens: nbdkit opens its plugin (curl's first request,
// vddk's login) only at NBD_OPT_GO, so a greeting alone is not enough.
func openExport(ctx context.Context, socket string) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return err
	}
	defer conn.Close()
	return nbdprobe.Open(ctx, conn, "")
}

// URI is the source's NBD URI.
func (s *Server) URI() string {
	return (&url.URL{Scheme: "nbd+unix", Path: "/", RawQuery: "socket=" + url.QueryEscape(s.Socket)}).String()
}

// PID is nbdkit's process id.
func (s *Server) PID() int { return s.cmd.Process.Pid }

// Done is closed when nbdkit has exited.
func (s *Server) Done() <-chan struct{} { return s.done }

// Stop sends SIGTERM, then SIGKILL after the stop timeout, waits for the exit and removes
// the socket and secrets. Stopping a server that already exited succeeds.
func (s *Server) Stop(ctx context.Context) error {
	s.stopMu.Lock()
	defer s.stopMu.Unlock()
	select {
	case <-s.done:
	default:
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		timer := time.NewTimer(s.timeout)
		defer timer.Stop()
		select {
		case <-s.done:
		case <-timer.C:
			s.log.Warn("nbdkit ignored SIGTERM; killing", "pid", s.cmd.Process.Pid, "after", s.timeout)
			_ = s.cmd.Process.Kill()
			<-s.done
		case <-ctx.Done():
			_ = s.cmd.Process.Kill()
			<-s.done
		}
	}
	s.cleanup()
	return nil
}

func (s *Server) removeSecrets() {
	for _, p := range s.secrets {
		if err := os.RemoveAll(p); err != nil {
			s.log.Warn("remove nbdkit secrets", "error", err)
		}
	}
	s.secrets = nil
}

func (s *Server) cleanup() {
	s.removeSecrets()
	if s.ownDir {
		_ = os.RemoveAll(s.dir)
		return
	}
	if s.Socket != "" {
		_ = os.Remove(s.Socket)
	}
}

// writeSecret stores a secret in a 0600 file for a key=+FILE parameter.
func writeSecret(dir, name, value string) (string, error) {
	if dir == "" {
		return "", errors.New("no directory for secret files")
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(value), 0o600); err != nil {
		return "", fmt.Errorf("write %s: %w", name, err)
	}
	return path, nil
}

// tailWriter logs nbdkit's output line by line and keeps its tail for error messages.
type tailWriter struct {
	mu      sync.Mutex
	log     *slog.Logger
	partial []byte
	tail    []byte
}

func (w *tailWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.tail = append(w.tail, p...)
	if len(w.tail) > stderrTail {
		w.tail = w.tail[len(w.tail)-stderrTail:]
	}
	w.partial = append(w.partial, p...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			break
		}
		w.log.Info("nbdkit", "line", string(w.partial[:i]))
		w.partial = w.partial[i+1:]
	}
	if len(w.partial) > stderrTail {
		w.partial = w.partial[:0]
	}
	return len(p), nil
}

func (w *tailWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(bytes.TrimSpace(w.tail))
}
