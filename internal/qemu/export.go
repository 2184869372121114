package qemu

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/diskferry/diskferry/internal/childenv"
	"github.com/diskferry/diskferry/internal/nbdprobe"
)

const (
	qemuNBD = "qemu-nbd"

	// DefaultAddr is where a TCP export listens unless told otherwise. The hub serves its
	// exports on unix sockets; only the tests and the export path benchmark (the former TCP
	// transport as its baseline) serve on TCP.
	DefaultAddr = "127.0.0.1"
	// MallocTunables keep qemu-nbd's request buffers in its heap. glibc serves a buffer
	// above its mmap threshold (128 KiB at start, raised only as far as freed sizes and
	// lowered again by trimming) with a fresh mmap, so each 2 MiB write request faulted in
	// and cleared 512 new pages before the socket read filled them: in perf, 23 % of
	// qemu-nbd's CPU went to those faults and the rest mostly to the socket copy. With the
	// threshold at glibc's 32 MiB maximum and trimming above 256 MiB (the most the requests
	// of all clients can hold at once is far below), scripts/bench.sh's s2g-holes copy
	// cost qemu-nbd 0.35 CPU-s instead of 2.7 and took 5.8 s instead of 15 s on a loaded
	// machine (docs/architecture.md, Data-plane performance).
	MallocTunables = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"
	// DefaultReadyTimeout bounds the wait for the first NBD handshake after start.
	DefaultReadyTimeout = 10 * time.Second
	// DefaultStopTimeout is how long Stop waits after SIGTERM before it sends SIGKILL.
	DefaultStopTimeout = 10 * time.Second
)

var (
	// ErrPortInUse means the export's TCP port is taken.
	ErrPortInUse = errors.New("port in use")
	// ErrNotRunning means no qemu-nbd export runs for a pid file.
	ErrNotRunning = errors.New("export not running")
)

// ExportOptions describes one qemu-nbd export.
type ExportOptions struct {
	Path   string // image to serve
	Format string // image format; default qcow2

	// TCP listener: Addr (default 127.0.0.1, always passed explicitly) and Port.
	Addr string
	Port int
	// Socket serves on a unix socket instead of TCP: how the hub serves backup targets
	// (reached through SSH stream-local forwarding) and verification reads.
	Socket string

	Name string // NBD export name

	// Connections is how many connections the client opens at once. qemu-nbd gets
	// --shared=Connections+1: at the default of 1 a second client connects but never
	// receives the greeting and hangs, and multi-conn is not advertised.
	Connections int

	PidFile string // required; qemu-nbd writes it, Find reads it
	LogFile string // qemu-nbd's stderr; default PidFile+".log"

	Cache    string // --cache: none, writeback, writethrough, directsync, unsafe; empty keeps qemu's default
	AIO      string // --aio: threads, native, io_uring; native needs cache none or directsync
	ReadOnly bool

	ReadyTimeout time.Duration // default DefaultReadyTimeout
	Logger       *slog.Logger  // default discards
}

// SharedClients is the --shared value for these options.
func (o ExportOptions) SharedClients() int {
	return max(o.Connections, 1) + 1
}

// Args returns qemu-nbd's argument list. Paths must already be absolute (Start makes them so).
func (o ExportOptions) Args() ([]string, error) {
	if o.Path == "" {
		return nil, errors.New("export options: empty image path")
	}
	if o.PidFile == "" {
		return nil, errors.New("export options: empty pid file")
	}
	if o.Connections < 0 {
		return nil, fmt.Errorf("export options: negative connections %d", o.Connections)
	}
	args := []string{
		"--fork",
		"--pid-file=" + o.PidFile,
		"-t", // persistent: without it qemu-nbd exits when its first client disconnects
		"--shared=" + strconv.Itoa(o.SharedClients()),
	}
	switch {
	case o.Socket != "" && (o.Port != 0 || o.Addr != ""):
		return nil, errors.New("export options: socket and TCP address are exclusive")
	case o.Socket != "":
		args = append(args, "--socket="+o.Socket)
	case o.Port <= 0 || o.Port > 65535:
		return nil, fmt.Errorf("export options: port %d out of range", o.Port)
	default:
		args = append(args, "--bind="+cmp.Or(o.Addr, DefaultAddr), "--port="+strconv.Itoa(o.Port))
	}
	args = append(args, "--export-name="+o.Name, "--format="+cmp.Or(o.Format, FormatQCOW2))
	if o.Cache != "" {
		if !slices.Contains([]string{"none", "writeback", "writethrough", "directsync", "unsafe"}, o.Cache) {
			return nil, fmt.Errorf("export options: unknown cache mode %q", o.Cache)
		}
		args = append(args, "--cache="+o.Cache)
	}
	if o.AIO != "" {
		if !slices.Contains([]string{"threads", "native", "io_uring"}, o.AIO) {
			return nil, fmt.Errorf("export options: unknown aio mode %q", o.AIO)
		}
		if o.AIO == "native" && o.Cache != "none" && o.Cache != "directsync" {
			return nil, errors.New("export options: aio native needs cache none or directsync")
		}
		args = append(args, "--aio="+o.AIO)
	}
	if o.ReadOnly {
		args = append(args, "--read-only")
	} else {
		// This order: qemu-nbd rejects --detect-zeroes=unmap unless discard=unmap came first.
		args = append(args, "--discard=unmap", "--detect-zeroes=unmap")
	}
	return append(args, o.Path), nil
}

// Export is a running qemu-nbd export, found by its pid file.
type Export struct {
	PID     int
	PidFile string
	LogFile string // as started; Find assumes the default PidFile+".log"
	Path    string
	Addr    string // TCP bind address; empty for a unix socket
	Port    int
	Socket  string
	Name    string
	// ReadOnly is an export started with --read-only: clients cannot write.
	ReadOnly bool

	log *slog.Logger
}

// URI is the export's NBD URI.
func (e *Export) URI() string {
	if e.Socket != "" {
		return (&url.URL{Scheme: "nbd+unix", Path: "/" + e.Name, RawQuery: "socket=" + url.QueryEscape(e.Socket)}).String()
	}
	return (&url.URL{Scheme: "nbd", Host: net.JoinHostPort(e.Addr, strconv.Itoa(e.Port)), Path: "/" + e.Name}).String()
}

func (e *Export) network() (string, string) {
	if e.Socket != "" {
		return "unix", e.Socket
	}
	return "tcp", net.JoinHostPort(e.Addr, strconv.Itoa(e.Port))
}

// Start starts a detached qemu-nbd (it outlives this process, so an export survives a
// worker restart and is found again with Find) and returns once a client completes the
// NBD handshake. When the pid file already names a running export of the same image,
// address and name, Start returns that export, so a retried start is idempotent.
// A taken port wraps ErrPortInUse; an image another process holds wraps ErrImageLocked.
func Start(ctx context.Context, opts ExportOptions) (*Export, error) {
	var err error
	for _, p := range []*string{&opts.Path, &opts.PidFile, &opts.Socket, &opts.LogFile} {
		if *p != "" {
			if *p, err = filepath.Abs(*p); err != nil {
				return nil, fmt.Errorf("start export: %w", err)
			}
		}
	}
	if opts.Socket == "" {
		opts.Addr = cmp.Or(opts.Addr, DefaultAddr)
	}
	args, err := opts.Args()
	if err != nil {
		return nil, fmt.Errorf("start export %s: %w", opts.Path, err)
	}
	opts.LogFile = cmp.Or(opts.LogFile, opts.PidFile+".log")
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("image", opts.Path, "pidFile", opts.PidFile)

	if running, err := Find(opts.PidFile); err == nil {
		// A retried start (the worker died after starting it) finds its export running.
		if running.Path != opts.Path || running.Addr != opts.Addr || running.Port != opts.Port ||
			running.Socket != opts.Socket || running.Name != opts.Name || running.ReadOnly != opts.ReadOnly {
			return nil, fmt.Errorf("start export %s: pid file %s names a running qemu-nbd serving %s (read-only %t)",
				opts.Path, opts.PidFile, running.URI(), running.ReadOnly)
		}
		running.log, running.LogFile = log, opts.LogFile
		network, addr := running.network()
		readyCtx, cancel := context.WithTimeout(ctx, cmp.Or(opts.ReadyTimeout, DefaultReadyTimeout))
		defer cancel()
		if err := waitHandshake(readyCtx, network, addr); err != nil {
			return nil, fmt.Errorf("start export %s: running export not answering: %w", opts.Path, err)
		}
		log.Info("qemu-nbd export already running", "pid", running.PID, "uri", running.URI())
		return running, nil
	}
	logFile, err := os.OpenFile(opts.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("start export %s: open log: %w", opts.Path, err)
	}
	defer logFile.Close()
	logStart, err := logFile.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, fmt.Errorf("start export %s: log offset: %w", opts.Path, err)
	}

	began := time.Now()
	cmd := exec.CommandContext(ctx, qemuNBD, args...)
	cmd.Env = append(childenv.Environ(), "GLIBC_TUNABLES="+MallocTunables)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// A session of its own: a signal to the worker's process group must not reach the export.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// With --fork the parent exits once the server listens (or failed to).
	runErr := cmd.Run()

	exp := &Export{
		PidFile: opts.PidFile, LogFile: opts.LogFile, Path: opts.Path,
		Addr: opts.Addr, Port: opts.Port, Socket: opts.Socket, Name: opts.Name, ReadOnly: opts.ReadOnly, log: log,
	}
	if runErr != nil {
		// A cancel may hit after the daemon forked; never leave it behind.
		if found, err := Find(opts.PidFile); err == nil {
			_ = found.Stop(context.WithoutCancel(ctx), DefaultStopTimeout)
		}
		return nil, fmt.Errorf("start export %s: %w", opts.Path, classifyStartError(runErr, readFrom(opts.LogFile, logStart)))
	}
	found, err := Find(opts.PidFile)
	if err != nil {
		return nil, fmt.Errorf("start export %s: %w; log: %s", opts.Path, err, readFrom(opts.LogFile, logStart))
	}
	exp.PID = found.PID

	readyCtx, cancel := context.WithTimeout(ctx, cmp.Or(opts.ReadyTimeout, DefaultReadyTimeout))
	defer cancel()
	network, addr := exp.network()
	if err := waitHandshake(readyCtx, network, addr); err != nil {
		stopErr := exp.Stop(context.WithoutCancel(ctx), DefaultStopTimeout)
		return nil, fmt.Errorf("start export %s: not ready: %w", opts.Path, errors.Join(err, stopErr))
	}
	log.Info("qemu-nbd export started", "pid", exp.PID, "uri", exp.URI(),
		"shared", opts.SharedClients(), "took", time.Since(began))
	return exp, nil
}

func classifyStartError(runErr error, stderr string) error {
	switch {
	case strings.Contains(stderr, "Address already in use"):
		return fmt.Errorf("%w: %s", ErrPortInUse, stderr)
	case isLockError(stderr):
		return fmt.Errorf("%w: %s", ErrImageLocked, stderr)
	default:
		return fmt.Errorf("qemu-nbd: %w: %s", runErr, stderr)
	}
}

// readFrom returns what a log file holds after offset, for error messages.
func readFrom(path string, offset int64) string {
	data, err := os.ReadFile(path)
	if err != nil || offset > int64(len(data)) {
		return ""
	}
	return strings.TrimSpace(string(data[offset:]))
}

// Find returns the export whose qemu-nbd wrote pidFile, or an error wrapping ErrNotRunning
// when the pid file is missing, names a dead process, or names a process that is not the
// qemu-nbd started with this pid file (a reused pid).
func Find(pidFile string) (*Export, error) {
	abs, err := filepath.Abs(pidFile)
	if err != nil {
		return nil, fmt.Errorf("find export %s: %w", pidFile, err)
	}
	pid, err := readPid(abs)
	if err != nil {
		return nil, fmt.Errorf("find export %s: %w", abs, err)
	}
	args, err := exportArgs(pid, abs)
	if err != nil {
		return nil, fmt.Errorf("find export %s: %w", abs, err)
	}
	exp := &Export{PID: pid, PidFile: abs, LogFile: abs + ".log", log: slog.New(slog.DiscardHandler)}
	for _, a := range args {
		name, value, _ := strings.Cut(a, "=")
		switch name {
		case "--bind":
			exp.Addr = value
		case "--port":
			exp.Port, _ = strconv.Atoi(value)
		case "--socket":
			exp.Socket = value
		case "--export-name":
			exp.Name = value
		case "--read-only":
			exp.ReadOnly = true
		}
	}
	if len(args) > 0 {
		exp.Path = args[len(args)-1]
	}
	return exp, nil
}

func readPid(pidFile string) (int, error) {
	data, err := os.ReadFile(pidFile)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, fmt.Errorf("%w: no pid file", ErrNotRunning)
	}
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("%w: malformed pid file %q", ErrNotRunning, data)
	}
	return pid, nil
}

// exportArgs returns the arguments of pid when it is a live qemu-nbd started with pidFile.
// A zombie has an empty cmdline and so counts as gone: the detached daemon's parent is
// init, which in a container may never reap it.
func exportArgs(pid int, pidFile string) ([]string, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if errors.Is(err, fs.ErrNotExist) || (err == nil && len(raw) == 0) {
		return nil, fmt.Errorf("%w: pid %d is gone", ErrNotRunning, pid)
	}
	if err != nil {
		return nil, err
	}
	argv := strings.Split(strings.TrimSuffix(string(raw), "\x00"), "\x00")
	if filepath.Base(argv[0]) != qemuNBD || !slices.Contains(argv[1:], "--pid-file="+pidFile) {
		return nil, fmt.Errorf("%w: pid %d is not the qemu-nbd of this pid file", ErrNotRunning, pid)
	}
	return argv[1:], nil
}

// exited reports whether pid has finished exiting: no such process, or every thread a
// zombie. An empty cmdline is not enough (the kernel drops the memory map before it closes
// the files), nor is the leader's state alone: qemu-nbd is multi-threaded and its listening
// socket stays open until the last thread is done.
func exited(pid int) bool {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return errors.Is(err, fs.ErrNotExist)
	}
	for _, task := range tasks {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil || !zombieStat(stat) {
			return false
		}
	}
	return true
}

// zombieStat reads the state from a /proc stat line; it follows the parenthesised command
// name, which may itself hold ')'.
func zombieStat(stat []byte) bool {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 || i+2 >= len(stat) {
		return false
	}
	state := stat[i+2]
	return state == 'Z' || state == 'X'
}

// Stop sends SIGTERM (qemu-nbd flushes and closes the image), waits up to timeout, then
// sends SIGKILL. A process already gone counts as stopped. It removes the pid file, which
// qemu-nbd leaves behind, and a unix socket.
func (e *Export) Stop(ctx context.Context, timeout time.Duration) error {
	timeout = cmp.Or(timeout, DefaultStopTimeout)
	if err := e.signal(syscall.SIGTERM); err == nil {
		if !e.waitGone(ctx, timeout) {
			if ctx.Err() != nil {
				return fmt.Errorf("stop export %s: %w", e.Path, ctx.Err())
			}
			e.log.Warn("qemu-nbd ignored SIGTERM; killing", "pid", e.PID, "after", timeout)
			if err := e.signal(syscall.SIGKILL); err == nil && !e.waitGone(ctx, timeout) {
				return fmt.Errorf("stop export %s: pid %d survives SIGKILL", e.Path, e.PID)
			}
		}
	} else if !errors.Is(err, ErrNotRunning) {
		return fmt.Errorf("stop export %s: %w", e.Path, err)
	}
	for _, f := range []string{e.PidFile, e.Socket} {
		if f == "" {
			continue
		}
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("stop export %s: %w", e.Path, err)
		}
	}
	e.log.Info("qemu-nbd export stopped", "pid", e.PID)
	return nil
}

// StopPidFile stops the export of a pid file; no export running counts as stopped.
func StopPidFile(ctx context.Context, pidFile string, timeout time.Duration) error {
	exp, err := Find(pidFile)
	if errors.Is(err, ErrNotRunning) {
		if err := os.Remove(pidFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("stop export %s: %w", pidFile, err)
		}
		return nil
	}
	if err != nil {
		return err
	}
	return exp.Stop(ctx, timeout)
}

// signal signals the export after checking the pid still is this export's qemu-nbd.
func (e *Export) signal(sig syscall.Signal) error {
	if _, err := exportArgs(e.PID, e.PidFile); err != nil {
		return err
	}
	if err := syscall.Kill(e.PID, sig); errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("%w: pid %d is gone", ErrNotRunning, e.PID)
	} else if err != nil {
		return fmt.Errorf("signal %v to pid %d: %w", sig, e.PID, err)
	}
	return nil
}

// waitGone polls until the process is gone; false on timeout or cancel.
func (e *Export) waitGone(ctx context.Context, timeout time.Duration) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if exited(e.PID) {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-deadline.C:
			return false
		case <-tick.C:
		}
	}
}

// waitHandshake retries an NBD greeting until one completes or ctx ends.
func waitHandshake(ctx context.Context, network, addr string) error {
	for {
		err := greetExport(ctx, network, addr)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nbd handshake with %s: %w (last: %v)", addr, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// greetTimeout bounds one greeting attempt. The greeting, not the TCP connect, proves a
// client slot: a qemu-nbd whose --shared limit is reached accepts the connection but stays
// silent, so an attempt gives up and retries rather than wait out the whole ready timeout.
const greetTimeout = 2 * time.Second

// greetExport dials the export and completes an NBD greeting (ending with NBD_OPT_ABORT).
func greetExport(ctx context.Context, network, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, greetTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	return nbdprobe.Greet(ctx, conn)
}
