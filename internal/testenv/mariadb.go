package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-sql-driver/mysql"
)

// MariaDBDatabase is a fresh database on a throwaway MariaDB server, owned by a user with a
// generated password. DSN is ready for github.com/go-sql-driver/mysql (TCP, parseTime=true).
type MariaDBDatabase struct {
	DSN      string
	Addr     string // 127.0.0.1:port
	Name     string
	User     string
	Password string
}

// mariaDBServer is one running mariadbd this test binary started.
type mariaDBServer struct {
	dir    string // holds the datadir, the socket and the error log
	socket string
	addr   string
	port   int
	// how it was launched, for a restart on the same data and port
	serverBin, datadir string
	userArgs           []string
	cmd                *exec.Cmd
	exited             chan struct{} // closed once cmd.Wait returned
	admin              *sql.DB       // root over the unix socket

	mu    sync.Mutex
	dbSeq int
}

// mariaDBStartupTimeout bounds install + start; a healthy start takes ~3 s on the rig.
const mariaDBStartupTimeout = 60 * time.Second

// StartMariaDB starts a MariaDB server for this test alone and returns a fresh database on it.
// The server is killed and its datadir removed on t.Cleanup. Prefer MariaDB, which shares one
// server per test binary when the package's TestMain uses WithSharedMariaDB.
func StartMariaDB(t TB) MariaDBDatabase {
	t.Helper()
	bins := requireMariaDBBinaries(t)
	ctx, cancel := context.WithTimeout(context.Background(), mariaDBStartupTimeout)
	defer cancel()
	srv, err := startMariaDBServer(ctx, bins)
	if err != nil {
		t.Fatalf("start mariadb: %v", err)
	}
	t.Cleanup(srv.stop)
	return srv.newDatabase(t)
}

// sharedMariaDB is the one server a test binary shares between its tests. Package-level
// state is deliberate here: a server per test costs ~3 s, and a test binary is the natural
// owner of a throwaway server. WithSharedMariaDB bounds its life to m.Run.
var sharedMariaDB struct {
	mu      sync.Mutex
	enabled bool
	srv     *mariaDBServer
	err     error // a failed start is not retried by every test
}

// WithSharedMariaDB runs the tests (usually m.Run) with one MariaDB server shared by every
// MariaDB call, started lazily on first use and killed when run returns. Use it from TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(testenv.WithSharedMariaDB(m.Run)) }
func WithSharedMariaDB(run func() int) int {
	sharedMariaDB.mu.Lock()
	sharedMariaDB.enabled = true
	sharedMariaDB.mu.Unlock()
	defer func() {
		sharedMariaDB.mu.Lock()
		defer sharedMariaDB.mu.Unlock()
		if sharedMariaDB.srv != nil {
			sharedMariaDB.srv.stop()
		}
		sharedMariaDB.srv, sharedMariaDB.err, sharedMariaDB.enabled = nil, nil, false
	}()
	return run()
}

// MariaDB returns a fresh database (own name, own user) for this test. Inside
// WithSharedMariaDB the server is shared by the test binary; otherwise it is StartMariaDB.
// The database is dropped on t.Cleanup.
func MariaDB(t TB) MariaDBDatabase {
	t.Helper()
	sharedMariaDB.mu.Lock()
	enabled := sharedMariaDB.enabled
	sharedMariaDB.mu.Unlock()
	if !enabled {
		return StartMariaDB(t)
	}
	bins := requireMariaDBBinaries(t)

	sharedMariaDB.mu.Lock()
	if sharedMariaDB.srv == nil && sharedMariaDB.err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), mariaDBStartupTimeout)
		sharedMariaDB.srv, sharedMariaDB.err = startMariaDBServer(ctx, bins)
		cancel()
	}
	srv, err := sharedMariaDB.srv, sharedMariaDB.err
	sharedMariaDB.mu.Unlock()
	if err != nil {
		t.Fatalf("start shared mariadb: %v", err)
	}
	db := srv.newDatabase(t)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := srv.admin.ExecContext(ctx, "DROP DATABASE IF EXISTS `"+db.Name+"`"); err != nil {
			t.Errorf("drop database %s: %v", db.Name, err)
		}
		if _, err := srv.admin.ExecContext(ctx, "DROP USER IF EXISTS '"+db.User+"'@'127.0.0.1'"); err != nil {
			t.Errorf("drop user %s: %v", db.User, err)
		}
	})
	return db
}

// MariaDBServer is a MariaDB server one test owns, for catalog outages: it can be shut down
// (as a restart or a failover does) and started again on the same data and port.
type MariaDBServer struct {
	mu  sync.Mutex
	srv *mariaDBServer
}

// StartMariaDBServer starts a MariaDB server for this test alone and returns it with a fresh
// database on it; it is killed and its datadir removed on t.Cleanup.
func StartMariaDBServer(t TB) (*MariaDBServer, MariaDBDatabase) {
	t.Helper()
	bins := requireMariaDBBinaries(t)
	ctx, cancel := context.WithTimeout(context.Background(), mariaDBStartupTimeout)
	defer cancel()
	srv, err := startMariaDBServer(ctx, bins)
	if err != nil {
		t.Fatalf("start mariadb: %v", err)
	}
	s := &MariaDBServer{srv: srv}
	t.Cleanup(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.srv.stop()
	})
	return s, srv.newDatabase(t)
}

// Shutdown stops the server with SIGTERM (it writes everything committed to disk; the tuning
// above would lose the last second on SIGKILL) and waits for it: clients get connection
// refused until Restart.
func (s *MariaDBServer) Shutdown() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.srv.admin.Close()
	_ = s.srv.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.srv.exited:
	case <-time.After(mariaDBStartupTimeout):
		s.srv.kill()
	}
}

// Restart starts a shut down server again on the same data and port and waits until it serves.
func (s *MariaDBServer) Restart() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.srv
	ctx, cancel := context.WithTimeout(context.Background(), mariaDBStartupTimeout)
	defer cancel()
	srv, err := launchMariaDB(ctx, old.serverBin, old.dir, old.datadir, old.userArgs, old.port)
	if err != nil {
		return fmt.Errorf("restart mariadb on port %d: %w", old.port, err)
	}
	s.srv = srv
	return nil
}

type mariaDBBinaries struct {
	installDB string
	server    string
}

func requireMariaDBBinaries(t TB) mariaDBBinaries {
	t.Helper()
	Integration(t)
	installDB, err1 := lookSbin("mariadb-install-db", "mysql_install_db")
	server, err2 := lookSbin("mariadbd", "mysqld")
	if err := errors.Join(err1, err2); err != nil {
		Missing(t, "MariaDB server binaries (apt-get install mariadb-server; run scripts/setup.sh): %v", err)
	}
	return mariaDBBinaries{installDB: installDB, server: server}
}

// lookSbin finds the first of names in PATH or the sbin directories, which a non-root PATH lacks.
func lookSbin(names ...string) (string, error) {
	for _, name := range names {
		if p, err := exec.LookPath(name); err == nil {
			return p, nil
		}
		for _, dir := range []string{"/usr/sbin", "/usr/local/sbin", "/sbin"} {
			p := filepath.Join(dir, name)
			if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
				return p, nil
			}
		}
	}
	return "", fmt.Errorf("none of %v found", names)
}

// mariaDBTuning keeps a throwaway server small and quick; durability does not matter here.
var mariaDBTuning = []string{
	"--skip-log-bin",
	"--skip-name-resolve",
	"--innodb-buffer-pool-size=16M",
	"--innodb-log-file-size=4M",
	"--innodb-flush-log-at-trx-commit=0",
	"--skip-innodb-doublewrite",
}

func startMariaDBServer(ctx context.Context, bins mariaDBBinaries) (*mariaDBServer, error) {
	dir, err := os.MkdirTemp("", "dfm")
	if err != nil {
		return nil, fmt.Errorf("temp dir: %w", err)
	}
	datadir := filepath.Join(dir, "data")
	// A private tmpdir: servers of test binaries running side by side otherwise share /tmp
	// and collide on their temporary table files.
	tmpdir := filepath.Join(dir, "tmp")
	if err := os.Mkdir(tmpdir, 0o700); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("temp dir: %w", err)
	}
	userArgs := []string{"--tmpdir=" + tmpdir}
	if os.Geteuid() == 0 {
		// mariadbd refuses to run as root unless told to.
		userArgs = append(userArgs, "--user=root")
	}
	install := exec.CommandContext(ctx, bins.installDB, append(append([]string{
		"--no-defaults",
		"--datadir=" + datadir,
		"--auth-root-authentication-method=normal",
		"--skip-test-db",
	}, userArgs...), mariaDBTuning...)...)
	if out, err := install.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("%s: %w: %s", filepath.Base(bins.installDB), err, outputTail(out, 2000))
	}

	// A free port can be taken between probing and binding; retry a few times.
	var lastErr error
	for range 3 {
		srv, err := launchMariaDB(ctx, bins.server, dir, datadir, userArgs, 0)
		if err == nil {
			return srv, nil
		}
		lastErr = err
		if !strings.Contains(err.Error(), "Address already in use") || ctx.Err() != nil {
			break
		}
	}
	os.RemoveAll(dir)
	return nil, lastErr
}

// launchMariaDB runs mariadbd on datadir, on port or (0) a free one.
func launchMariaDB(ctx context.Context, serverBin, dir, datadir string, userArgs []string, port int) (*mariaDBServer, error) {
	if port == 0 {
		var err error
		if port, err = freeLoopbackPort(); err != nil {
			return nil, err
		}
	}
	socket := filepath.Join(dir, "s.sock")
	errLog := filepath.Join(dir, "error.log")
	os.Remove(errLog)
	args := append([]string{
		"--no-defaults",
		"--datadir=" + datadir,
		"--socket=" + socket,
		"--pid-file=" + filepath.Join(dir, "mariadbd.pid"),
		"--log-error=" + errLog,
		"--bind-address=127.0.0.1",
		fmt.Sprintf("--port=%d", port),
	}, userArgs...)
	args = append(args, mariaDBTuning...)
	// Not CommandContext: the server must outlive the startup context.
	cmd := exec.Command(serverBin, args...)
	// The kernel kills the server if the test binary dies without running its cleanups.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", serverBin, err)
	}
	srv := &mariaDBServer{
		dir:       dir,
		socket:    socket,
		addr:      fmt.Sprintf("127.0.0.1:%d", port),
		port:      port,
		serverBin: serverBin,
		datadir:   datadir,
		userArgs:  userArgs,
		cmd:       cmd,
		exited:    make(chan struct{}),
	}
	go func() {
		_ = cmd.Wait()
		close(srv.exited)
	}()

	cfg := mysql.NewConfig()
	cfg.User = "root"
	cfg.Net = "unix"
	cfg.Addr = socket
	connector, err := mysql.NewConnector(cfg)
	if err != nil {
		srv.kill()
		return nil, fmt.Errorf("admin connector: %w", err)
	}
	srv.admin = sql.OpenDB(connector)
	if err := srv.waitReady(ctx, errLog); err != nil {
		srv.kill()
		return nil, err
	}
	return srv, nil
}

func (s *mariaDBServer) waitReady(ctx context.Context, errLog string) error {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		pingCtx, cancel := context.WithTimeout(ctx, time.Second)
		err := s.admin.PingContext(pingCtx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-s.exited:
			log, _ := os.ReadFile(errLog)
			return fmt.Errorf("mariadbd exited during startup: %s", outputTail(log, 2000))
		case <-ctx.Done():
			log, _ := os.ReadFile(errLog)
			return fmt.Errorf("mariadbd not ready: %w (last ping: %v): %s", ctx.Err(), err, outputTail(log, 2000))
		case <-tick.C:
		}
	}
}

// kill stops the server by the PID this process started and waits for it to exit.
func (s *mariaDBServer) kill() {
	if s.admin != nil {
		s.admin.Close()
	}
	_ = s.cmd.Process.Kill()
	<-s.exited
}

func (s *mariaDBServer) stop() {
	s.kill()
	os.RemoveAll(s.dir)
}

// newDatabase creates a database and a user with a generated password that owns it.
func (s *mariaDBServer) newDatabase(t TB) MariaDBDatabase {
	t.Helper()
	s.mu.Lock()
	s.dbSeq++
	seq := s.dbSeq
	s.mu.Unlock()

	secret := make([]byte, 16)
	if _, err := rand.Read(secret); err != nil {
		t.Fatalf("generate password: %v", err)
	}
	db := MariaDBDatabase{
		Addr:     s.addr,
		Name:     fmt.Sprintf("t%d_%s", seq, identPart(t.Name(), 40)),
		User:     fmt.Sprintf("u%d", seq),
		Password: hex.EncodeToString(secret),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, stmt := range []string{
		"CREATE DATABASE `" + db.Name + "` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
		"CREATE USER '" + db.User + "'@'127.0.0.1' IDENTIFIED BY '" + db.Password + "'",
		"GRANT ALL PRIVILEGES ON `" + db.Name + "`.* TO '" + db.User + "'@'127.0.0.1'",
	} {
		if _, err := s.admin.ExecContext(ctx, stmt); err != nil {
			t.Fatalf("prepare database %s: %v", db.Name, err)
		}
	}
	cfg := mysql.NewConfig()
	cfg.User = db.User
	cfg.Passwd = db.Password
	cfg.Net = "tcp"
	cfg.Addr = db.Addr
	cfg.DBName = db.Name
	cfg.ParseTime = true
	db.DSN = cfg.FormatDSN()
	return db
}

// identPart keeps only characters safe in an unquoted-looking SQL identifier.
func identPart(s string, max int) string {
	var b strings.Builder
	for _, r := range s {
		if b.Len() >= max {
			break
		}
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	return b.String()
}

// freeLoopbackPort is a TCP port on 127.0.0.1 that was free a moment ago (FreePort without a test).
func freeLoopbackPort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// outputTail is the last n bytes of a child's output, for error messages.
func outputTail(b []byte, n int) string {
	b = bytes.TrimSpace(b)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
