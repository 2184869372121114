// Package lab runs a whole diskferry installation on one machine from real parts: the
// Temporal dev server, a throwaway MariaDB catalog, a vcsim vCenter with VMs whose disks
// hold real content (CBT emulated), an OpenSSH sshd per hub as its tunnel endpoint, and the
// hub and SNA worker binaries (one per hub, one per site) as child processes configured
// through the environment exactly as in production. The end-to-end tests and `make demo`
// both run on it.
package lab

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
)

// Options shape the lab.
type Options struct {
	Disks    int   // disks of the demo VM; default 2
	DiskSize int64 // bytes per disk, a multiple of 1 KiB; default 64 MiB
	// DiskSizes, when set, sizes each VM's disks in order instead (Disks is then its length).
	DiskSizes []int64
	VMName    string
	// UIPort serves the Temporal Web UI on 127.0.0.1:UIPort; 0 runs the server headless.
	UIPort int
	// WithoutSearchAttributes leaves diskferry's search attributes unregistered on the
	// Temporal server, as on a fresh deployment before its init step.
	WithoutSearchAttributes bool
	// BinDir holds diskferry-hub and diskferry-sna; empty builds them into a temp dir.
	BinDir string

	// VMs is the number of VMs in vCenter, each with Disks disks of its own content;
	// default 1. The first is VMName (VC.VMName), the others VC.VMs[i].
	VMs int
	// Sites is the number of source sites, each an SNA worker polling its own site queue
	// (all reach the one vCenter); default 1. See Lab.Sites.
	Sites int
	// Hubs is the number of hubs, each a hub worker with its own ID, repository, run dir
	// and sshd; default 1. See Lab.Hubs.
	Hubs int
	// PortsPerHub is the size of each hub's export port range; default (and at most) the
	// sshd's SSHDExportPortMax-SSHDExportPortMin+1.
	PortsPerHub int
	// HubHeartbeat is how often the hub workers record themselves alive in the catalog
	// (DISKFERRY_HUB_HEARTBEAT); 0 keeps the workers' default.
	HubHeartbeat time.Duration
	// SNAEnv is added to every SNA worker's environment, e.g. DISKFERRY_MAX_COPIES=1.
	SNAEnv []string
}

// Hub is one hub of the lab.
type Hub struct {
	ID       string // "hub1", "hub2", ...
	Worker   string // its worker's name for StartWorker and friends: "hub", "hub2", ...
	RepoRoot string
	RunDir   string // its pid files and, in exports/, its export sockets
	SSHD     *testenv.SSHD
}

// Site is one source site of the lab.
type Site struct {
	Name   string // "lab", "lab2", ...
	Worker string // its SNA worker's name: "sna", "sna2", ...
}

// Lab is a running installation. Everything it started stops through t's cleanups.
type Lab struct {
	Temporal *testenv.TemporalServer
	DB       testenv.MariaDBDatabase
	VC       *vcsimtest.Lab
	SSHD     *testenv.SSHD

	// The first hub and site: HubID, RepoRoot, RunDir and SSHD are Hubs[0]'s, Site is
	// Sites[0]'s, and the workers "hub" and "sna" are theirs.
	HubID    string
	Site     string
	RepoRoot string // the hub's repository
	RunDir   string // the hub's pid files and, in exports/, its export sockets
	Hubs     []Hub
	Sites    []Site

	t       testenv.TB
	binDir  string
	dir     string
	envs    map[string][]string // by worker name
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
	opts.Hubs, opts.Sites = max(opts.Hubs, 1), max(opts.Sites, 1)
	maxPorts := testenv.SSHDExportPortMax - testenv.SSHDExportPortMin + 1
	if opts.PortsPerHub == 0 {
		opts.PortsPerHub = maxPorts
	}
	if opts.PortsPerHub < 1 || opts.PortsPerHub > maxPorts {
		t.Fatalf("lab: %d ports per hub, want 1 to %d", opts.PortsPerHub, maxPorts)
	}
	l := &Lab{t: t, workers: map[string]*worker{}, envs: map[string][]string{}}
	l.dir = t.TempDir()
	l.binDir = opts.BinDir
	if l.binDir == "" {
		l.binDir = BuildWorkers(t)
	}

	l.Temporal = testenv.StartTemporalWith(t, testenv.TemporalOptions{UIPort: opts.UIPort, WithoutSearchAttributes: opts.WithoutSearchAttributes})
	l.DB = testenv.StartMariaDB(t)
	vc, err := vcsimtest.Start(context.Background(), vcsimtest.Options{
		Disks: opts.Disks, DiskSize: opts.DiskSize, DiskSizes: opts.DiskSizes, VMName: opts.VMName, VMs: opts.VMs, CBT: true, Seed: 1, NIC: true,
	})
	if err != nil {
		t.Fatalf("lab: start vcsim: %v", err)
	}
	t.Cleanup(vc.Close)
	l.VC = vc
	for i := range opts.Hubs {
		l.Hubs = append(l.Hubs, l.newHub(i))
	}
	for i := range opts.Sites {
		site := Site{Name: "lab", Worker: "sna"}
		if i > 0 {
			site = Site{Name: fmt.Sprintf("lab%d", i+1), Worker: fmt.Sprintf("sna%d", i+1)}
		}
		l.Sites = append(l.Sites, site)
	}
	first := l.Hubs[0]
	l.HubID, l.RepoRoot, l.RunDir, l.SSHD, l.Site = first.ID, first.RepoRoot, first.RunDir, first.SSHD, l.Sites[0].Name

	dsn := l.secretFile("db-dsn", l.DB.DSN)
	for _, h := range l.Hubs {
		l.envs[h.Worker] = l.hubEnvironment(h, dsn, opts)
	}
	snaShared := l.snaShared()
	for _, s := range l.Sites {
		l.envs[s.Worker] = append(slices.Concat(snaShared, opts.SNAEnv), "DISKFERRY_SITE="+s.Name)
	}
	// Registered after the parts the workers use, so it runs before those stop.
	t.Cleanup(l.shutdown)
	for _, h := range l.Hubs {
		l.StartWorker(h.Worker)
	}
	for _, s := range l.Sites {
		l.StartWorker(s.Worker)
	}
	return l
}

// newHub creates the i-th hub's repository and starts its sshd; every sshd authorizes the
// first one's client key, the one key the SNAs hold.
func (l *Lab) newHub(i int) Hub {
	h := Hub{ID: fmt.Sprintf("hub%d", i+1), Worker: "hub", RepoRoot: filepath.Join(l.dir, "repository")}
	var sshdOpts testenv.SSHDOptions
	if i > 0 {
		h.Worker = fmt.Sprintf("hub%d", i+1)
		h.RepoRoot = filepath.Join(l.dir, "repository-"+h.ID)
		sshdOpts.ClientKeyPath = l.Hubs[0].SSHD.ClientKeyPath
	}
	if err := os.MkdirAll(h.RepoRoot, 0o750); err != nil {
		l.t.Fatalf("lab: %v", err)
	}
	// The hub runs where the sshd's lockdown lets the SNA's key reach export sockets.
	h.SSHD = testenv.StartSSHDWith(l.t, sshdOpts)
	h.RunDir = h.SSHD.HubRunDir
	return h
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

func (l *Lab) hubEnvironment(h Hub, dsnFile string, opts Options) []string {
	env := append(l.temporalEnv(),
		"DISKFERRY_HUB_ID="+h.ID,
		"DISKFERRY_DB_DSN_FILE="+dsnFile,
		"DISKFERRY_REPOSITORY_ROOT="+h.RepoRoot,
		"DISKFERRY_RUN_DIR="+h.RunDir,
		// Ports are only the exports' identities now; nothing listens on them.
		"DISKFERRY_PORT_MIN="+strconv.Itoa(testenv.SSHDExportPortMin),
		"DISKFERRY_PORT_MAX="+strconv.Itoa(testenv.SSHDExportPortMin+opts.PortsPerHub-1),
		"DISKFERRY_METRICS_ADDR=",
	)
	if opts.HubHeartbeat > 0 {
		env = append(env, "DISKFERRY_HUB_HEARTBEAT="+opts.HubHeartbeat.String())
	}
	return env
}

// snaShared is every SNA's environment but its site: the vCenter, and every hub's sshd.
func (l *Lab) snaShared() []string {
	env := append(l.temporalEnv(),
		"DISKFERRY_VCENTER_URL="+l.VC.URL,
		"DISKFERRY_VCENTER_USER="+l.VC.User,
		"DISKFERRY_VCENTER_PASSWORD_FILE="+l.secretFile("vcenter-password", l.VC.Password),
		"DISKFERRY_VCENTER_THUMBPRINT="+l.VC.Thumbprint,
		"DISKFERRY_HUB_SSH_ADDR="+l.SSHD.Addr,
		"DISKFERRY_HUB_SSH_USER="+l.SSHD.User,
		"DISKFERRY_SSH_KEY_FILE="+l.SSHD.ClientKeyPath,
		// Frequent checkpoints: a copy interrupted in a test has one to resume from.
		"DISKFERRY_COPY_CHECKPOINT_INTERVAL=1s",
	)
	if len(l.Hubs) == 1 {
		return append(env, "DISKFERRY_SSH_KNOWN_HOSTS_FILE="+l.SSHD.KnownHostsPath)
	}
	var addrs []string
	var knownHosts []byte
	for _, h := range l.Hubs {
		addrs = append(addrs, h.ID+"="+h.SSHD.Addr)
		line, err := os.ReadFile(h.SSHD.KnownHostsPath)
		if err != nil {
			l.t.Fatalf("lab: %v", err)
		}
		knownHosts = append(knownHosts, line...)
	}
	knownHostsPath := filepath.Join(l.dir, "known_hosts")
	if err := os.WriteFile(knownHostsPath, knownHosts, 0o600); err != nil {
		l.t.Fatalf("lab: %v", err)
	}
	return append(env,
		"DISKFERRY_HUB_SSH_ADDRS="+strings.Join(addrs, ","),
		"DISKFERRY_SSH_KNOWN_HOSTS_FILE="+knownHostsPath, // every hub's host key, pinned
	)
}

// StartWorker starts a worker binary by name ("hub", "sna", or a Hub's or Site's Worker);
// its output goes to a log file in the lab directory (WorkerLog).
func (l *Lab) StartWorker(name string) {
	l.t.Helper()
	env, ok := l.envs[name]
	if !ok {
		l.t.Fatalf("lab: no worker %q", name)
		return
	}
	binary := "diskferry-sna"
	if strings.HasPrefix(name, "hub") {
		binary = "diskferry-hub"
	}
	logFile, err := os.OpenFile(l.WorkerLogPath(name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		l.t.Fatalf("lab: %v", err)
	}
	cmd := exec.Command(filepath.Join(l.binDir, binary))
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
