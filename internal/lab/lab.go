// Package lab runs a whole diskferry installation on one machine from real parts: the
// Temporal dev server, a throwaway MariaDB catalog, a vcsim vCenter with a VM whose disks
// hold real content (CBT emulated), an OpenSSH sshd as the hub's tunnel endpoint, and the
// hub and SNA worker binaries as child processes configured through the environment exactly
// as in production. The end-to-end tests and `make demo` both run on it.
package lab

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
)

// Options shape the lab.
type Options struct {
	Disks    int   // disks of the demo VM; default 2
	DiskSize int64 // bytes per disk, a multiple of 1 MiB; default 64 MiB
	VMName   string
	// UIPort serves the Temporal Web UI on 127.0.0.1:UIPort; 0 runs the server headless.
	UIPort int
	// WithoutSearchAttributes leaves diskferry's search attributes unregistered on the
	// Temporal server, as on a fresh deployment before its init step.
	WithoutSearchAttributes bool
	// BinDir holds diskferry-hub and diskferry-sna; empty builds them into a temp dir.
	BinDir string
}

// Lab is a running installation. Everything it started stops through t's cleanups.
type Lab struct {
	Temporal *testenv.TemporalServer
	DB       testenv.MariaDBDatabase
	VC       *vcsimtest.Lab
	SSHD     *testenv.SSHD

	HubID    string
	Site     string
	RepoRoot string // the hub's repository
	RunDir   string // the hub's pid files and, in exports/, its export sockets

	t       testenv.TB
	binDir  string
	dir     string
	hubEnv  []string
	snaEnv  []string
	mu      sync.Mutex
	workers map[string]*worker
}

type worker struct {
	cmd    *exec.Cmd
	log    *os.File
	exited chan struct{}
}

// Start brings the lab up: Temporal, MariaDB, vcsim, sshd, then both workers.
func Start(t testenv.TB, opts Options) *Lab {
	t.Helper()
	testenv.Integration(t)
	if opts.Disks == 0 {
		opts.Disks = 2
	}
	l := &Lab{t: t, HubID: "hub1", Site: "lab", workers: map[string]*worker{}}
	l.dir = t.TempDir()
	l.RepoRoot = filepath.Join(l.dir, "repository")
	if err := os.MkdirAll(l.RepoRoot, 0o750); err != nil {
		t.Fatalf("lab: %v", err)
	}
	l.binDir = opts.BinDir
	if l.binDir == "" {
		l.binDir = BuildWorkers(t)
	}

	l.Temporal = testenv.StartTemporalWith(t, testenv.TemporalOptions{UIPort: opts.UIPort, WithoutSearchAttributes: opts.WithoutSearchAttributes})
	l.DB = testenv.StartMariaDB(t)
	vc, err := vcsimtest.Start(context.Background(), vcsimtest.Options{
		Disks: opts.Disks, DiskSize: opts.DiskSize, VMName: opts.VMName, CBT: true, Seed: 1, NIC: true,
	})
	if err != nil {
		t.Fatalf("lab: start vcsim: %v", err)
	}
	t.Cleanup(vc.Close)
	l.VC = vc
	// The hub runs where the sshd's lockdown lets the SNA's key reach export sockets.
	l.SSHD = testenv.StartSSHD(t)
	l.RunDir = l.SSHD.HubRunDir

	l.hubEnv = l.hubEnvironment()
	l.snaEnv = l.snaEnvironment()
	// Registered after the parts the workers use, so it runs before those stop.
	t.Cleanup(l.shutdown)
	l.StartWorker("hub")
	l.StartWorker("sna")
	return l
}

// secretFile writes a secret into a 0600 file and returns its path: secrets reach the
// workers through *_FILE variables, never through their arguments.
func (l *Lab) secretFile(name, value string) string {
	path := filepath.Join(l.dir, name)
	if err := os.WriteFile(path, []byte(value), 0o600); err != nil {
		l.t.Fatalf("lab: write %s: %v", name, err)
	}
	return path
}

func (l *Lab) temporalEnv() []string {
	return []string{
		"DISKFERRY_TEMPORAL_ADDRESS=" + l.Temporal.HostPort,
		"DISKFERRY_TEMPORAL_NAMESPACE=" + l.Temporal.Namespace,
		"DISKFERRY_LOG_LEVEL=info",
	}
}

func (l *Lab) hubEnvironment() []string {
	return append(l.temporalEnv(),
		"DISKFERRY_HUB_ID="+l.HubID,
		"DISKFERRY_DB_DSN_FILE="+l.secretFile("db-dsn", l.DB.DSN),
		"DISKFERRY_REPOSITORY_ROOT="+l.RepoRoot,
		"DISKFERRY_RUN_DIR="+l.RunDir,
		// Ports are only the exports' identities now; nothing listens on them.
		"DISKFERRY_PORT_MIN="+strconv.Itoa(testenv.SSHDExportPortMin),
		"DISKFERRY_PORT_MAX="+strconv.Itoa(testenv.SSHDExportPortMax),
		"DISKFERRY_METRICS_ADDR=",
	)
}

func (l *Lab) snaEnvironment() []string {
	return append(l.temporalEnv(),
		"DISKFERRY_SITE="+l.Site,
		"DISKFERRY_VCENTER_URL="+l.VC.URL,
		"DISKFERRY_VCENTER_USER="+l.VC.User,
		"DISKFERRY_VCENTER_PASSWORD_FILE="+l.secretFile("vcenter-password", l.VC.Password),
		"DISKFERRY_VCENTER_THUMBPRINT="+l.VC.Thumbprint,
		"DISKFERRY_HUB_SSH_ADDR="+l.SSHD.Addr,
		"DISKFERRY_HUB_SSH_USER="+l.SSHD.User,
		"DISKFERRY_SSH_KEY_FILE="+l.SSHD.ClientKeyPath,
		"DISKFERRY_SSH_KNOWN_HOSTS_FILE="+l.SSHD.KnownHostsPath,
		// Frequent checkpoints: a copy interrupted in a test has one to resume from.
		"DISKFERRY_COPY_CHECKPOINT_INTERVAL=1s",
	)
}

// StartWorker starts the "hub" or "sna" worker binary; its output goes to a log file in the
// lab directory (WorkerLog).
func (l *Lab) StartWorker(name string) {
	l.t.Helper()
	env := l.hubEnv
	if name == "sna" {
		env = l.snaEnv
	}
	logFile, err := os.OpenFile(l.WorkerLogPath(name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		l.t.Fatalf("lab: %v", err)
	}
	cmd := exec.Command(filepath.Join(l.binDir, "diskferry-"+name))
	// Only the lab's settings and PATH: nothing of the caller's environment leaks in.
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + l.dir}, env...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		l.t.Fatalf("lab: start %s worker: %v", name, err)
	}
	w := &worker{cmd: cmd, log: logFile, exited: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(w.exited) }()
	l.mu.Lock()
	l.workers[name] = w
	l.mu.Unlock()
}

// take removes a worker from the running set; nil when it is not running.
func (l *Lab) take(name string) *worker {
	l.mu.Lock()
	defer l.mu.Unlock()
	w := l.workers[name]
	delete(l.workers, name)
	return w
}

// StopWorker stops a worker gracefully (SIGTERM), killing it after 15 s; idempotent.
func (l *Lab) StopWorker(name string) {
	w := l.take(name)
	if w == nil {
		return
	}
	_ = w.cmd.Process.Signal(syscall.SIGTERM)
	_ = w.cmd.Process.Signal(syscall.SIGCONT) // a paused worker must run to handle it
	select {
	case <-w.exited:
	case <-time.After(15 * time.Second):
		_ = w.cmd.Process.Kill()
		<-w.exited
	}
	w.log.Close()
}

// KillWorker kills a worker at once (SIGKILL), as a crash would.
func (l *Lab) KillWorker(name string) {
	w := l.take(name)
	if w == nil {
		return
	}
	_ = w.cmd.Process.Kill()
	<-w.exited
	w.log.Close()
}

// PauseWorker freezes a running worker (SIGSTOP) until ResumeWorker: it neither works nor
// heartbeats meanwhile, but keeps its connections and children.
func (l *Lab) PauseWorker(name string) { l.signalWorker(name, syscall.SIGSTOP) }

// ResumeWorker continues a paused worker (SIGCONT).
func (l *Lab) ResumeWorker(name string) { l.signalWorker(name, syscall.SIGCONT) }

func (l *Lab) signalWorker(name string, sig syscall.Signal) {
	l.t.Helper()
	l.mu.Lock()
	w := l.workers[name]
	l.mu.Unlock()
	if w == nil {
		l.t.Fatalf("lab: %s worker is not running", name)
		return
	}
	if err := w.cmd.Process.Signal(sig); err != nil {
		l.t.Fatalf("lab: signal %v to %s worker: %v", sig, name, err)
	}
}

// WorkerLogPath is where a worker's output goes.
func (l *Lab) WorkerLogPath(name string) string { return filepath.Join(l.dir, name+".log") }

// WorkerLog returns a worker's output so far.
func (l *Lab) WorkerLog(name string) string {
	data, _ := os.ReadFile(l.WorkerLogPath(name))
	return string(data)
}

// BuildWorkers builds the worker binaries into a temp dir and returns the dir.
func BuildWorkers(t testenv.TB) string {
	t.Helper()
	dir := t.TempDir()
	Build(t, dir, "./workers/hub", "diskferry-hub")
	Build(t, dir, "./workers/sna", "diskferry-sna")
	return dir
}

// Build builds the package at pkg (relative to the repository root) into dir/name and
// returns its path; Go's build cache makes a rebuild take seconds.
func Build(t testenv.TB, dir, pkg, name string) string {
	t.Helper()
	var out bytes.Buffer
	path := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-o", path, pkg)
	cmd.Dir = testenv.RepoRoot(t)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("lab: build %s: %v\n%s", pkg, err, out.String())
	}
	return path
}

// String summarises where things are, for the demo's output.
func (l *Lab) String() string {
	return fmt.Sprintf("temporal %s, catalog %s, vcenter %s (VM %s), sshd %s, repository %s",
		l.Temporal.HostPort, l.DB.Addr, l.VC.URL, l.VC.VMName, l.SSHD.Addr, l.RepoRoot)
}
