package config

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/diskferry/diskferry/internal/repo"
)

// Hub configures the hub worker (workers/hub).
type Hub struct {
	Temporal

	// DISKFERRY_HUB_ID names this hub; it polls diskferry-hub.<id> for host-bound work.
	// Required; letters, digits, '.', '_' and '-'.
	HubID string `envconfig:"DISKFERRY_HUB_ID"`
	// DISKFERRY_DB_DSN is the catalog's MySQL DSN (go-sql-driver/mysql format, e.g.
	// "diskferry:pw@tcp(127.0.0.1:3306)/diskferry"). Secret: or DISKFERRY_DB_DSN_FILE.
	// One of the two is required.
	DBDSN Secret `envconfig:"DISKFERRY_DB_DSN"`
	// DISKFERRY_DB_DSN_FILE is a file holding DISKFERRY_DB_DSN.
	DBDSNFile string `envconfig:"DISKFERRY_DB_DSN_FILE"`
	// DISKFERRY_REPOSITORY_ROOT is the absolute directory holding the restore points;
	// nothing outside it is ever written or removed. Required.
	RepositoryRoot string `envconfig:"DISKFERRY_REPOSITORY_ROOT"`
	// DISKFERRY_REPOSITORY_MARGIN is the free space a backup must leave in the repository's
	// file system: a disk whose worst case (its capacity) does not fit in the free space
	// minus the margin is refused before anything is written. A size ("2GiB", "512MiB",
	// bytes) or a percentage of the file system ("5%", at most 50%). Default: 5% of the file
	// system or 1GiB, whichever is smaller.
	RepositoryMargin string `envconfig:"DISKFERRY_REPOSITORY_MARGIN"`
	// DISKFERRY_RUN_DIR holds the exports' pid files and logs, so a restarted worker finds
	// its running exports again, and their unix sockets in exports/ (port-<P>.sock, the
	// paths the SNA's sshd account may reach). Default /run/diskferry.
	RunDir string `envconfig:"DISKFERRY_RUN_DIR" default:"/run/diskferry"`
	// DISKFERRY_PORT_MIN is the lowest port leased to exports. Default 10100.
	PortMin int `envconfig:"DISKFERRY_PORT_MIN" default:"10100"`
	// DISKFERRY_PORT_MAX is the highest port leased to exports (inclusive). Default 10200.
	PortMax int `envconfig:"DISKFERRY_PORT_MAX" default:"10200"`
	// DISKFERRY_EXPORT_CACHE is qemu-nbd's cache mode for the targets: none (default: O_DIRECT
	// with native AIO, no page-cache copy on the hub; needs a file system with O_DIRECT, such
	// as ext4 or XFS), writeback, writethrough or directsync.
	ExportCache string `envconfig:"DISKFERRY_EXPORT_CACHE" default:"none"`
	// DISKFERRY_METRICS_ADDR is where Prometheus metrics are served (host:port).
	// Default 127.0.0.1:9464; empty disables the endpoint.
	MetricsAddr string `envconfig:"DISKFERRY_METRICS_ADDR" default:"127.0.0.1:9464"`
	// DISKFERRY_LOG_LEVEL is debug, info, warn or error. Default info.
	LogLevel slog.Level `envconfig:"DISKFERRY_LOG_LEVEL" default:"info"`
	// DISKFERRY_HUB_HEARTBEAT is how often the worker records in the catalog that it is alive
	// and how much space its repository has; a hub not seen for 3 heartbeats is down for the
	// placement of new chains. Every hub of a catalog should use the same value. Default 10s.
	Heartbeat time.Duration `envconfig:"DISKFERRY_HUB_HEARTBEAT" default:"10s"`
}

// LoadHub reads the hub worker's configuration from the environment and validates it.
func LoadHub() (Hub, error) {
	var c Hub
	if err := process(&c); err != nil {
		return Hub{}, fmt.Errorf("hub configuration: %w", err)
	}
	if err := c.resolveAndValidate(); err != nil {
		return Hub{}, err
	}
	return c, nil
}

func (c *Hub) resolveAndValidate() error {
	var v validator
	v.secret("DISKFERRY_DB_DSN", &c.DBDSN, c.DBDSNFile)
	c.Temporal.validate(&v)
	if v.required("DISKFERRY_HUB_ID", c.HubID) {
		v.queueName("DISKFERRY_HUB_ID", c.HubID)
	}
	if c.DBDSN == "" && c.DBDSNFile == "" {
		v.fail("DISKFERRY_DB_DSN", errors.New("required but not set (or DISKFERRY_DB_DSN_FILE)"))
	}
	if v.required("DISKFERRY_REPOSITORY_ROOT", c.RepositoryRoot) {
		if !filepath.IsAbs(c.RepositoryRoot) {
			v.fail("DISKFERRY_REPOSITORY_ROOT", fmt.Errorf("want an absolute path, got %q", c.RepositoryRoot))
		} else {
			c.RepositoryRoot = filepath.Clean(c.RepositoryRoot)
		}
	}
	if _, err := repo.ParseMargin(c.RepositoryMargin); err != nil {
		v.fail("DISKFERRY_REPOSITORY_MARGIN", err)
	}
	v.portRange("DISKFERRY_PORT_MIN", c.PortMin, "DISKFERRY_PORT_MAX", c.PortMax)
	switch c.ExportCache {
	case "none", "writeback", "writethrough", "directsync":
	default:
		v.fail("DISKFERRY_EXPORT_CACHE", fmt.Errorf("want none, writeback, writethrough or directsync, got %q", c.ExportCache))
	}
	v.retired("DISKFERRY_EXPORT_BIND", "exports listen on unix sockets in DISKFERRY_RUN_DIR/exports, reached through SSH stream-local forwarding")
	v.hostPort("DISKFERRY_METRICS_ADDR", c.MetricsAddr, false)
	if c.Heartbeat < time.Second || c.Heartbeat > 10*time.Minute {
		v.fail("DISKFERRY_HUB_HEARTBEAT", fmt.Errorf("want 1s-10m, got %s", c.Heartbeat))
	}
	return v.err("hub")
}

// Margin is DISKFERRY_REPOSITORY_MARGIN, parsed (LoadHub checked it).
func (c Hub) Margin() repo.Margin {
	m, _ := repo.ParseMargin(c.RepositoryMargin)
	return m
}

// LogValue shows the configuration in logs with secrets redacted.
func (c Hub) LogValue() slog.Value { return logValue(c) }

// String shows the configuration as NAME=value pairs with secrets redacted.
func (c Hub) String() string { return render(c) }

func (v *validator) portRange(minName string, lo int, maxName string, hi int) {
	for _, p := range []struct {
		name string
		port int
	}{{minName, lo}, {maxName, hi}} {
		if p.port < 1 || p.port > 65535 {
			v.fail(p.name, fmt.Errorf("port %d is not 1-65535", p.port))
			return
		}
	}
	if lo > hi {
		v.fail(minName, fmt.Errorf("inverted port range: %s=%d is above %s=%d", minName, lo, maxName, hi))
	}
}

// queueName checks a name that becomes part of a Temporal task queue and of log fields.
func (v *validator) queueName(name, value string) {
	for _, r := range value {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-'
		if !ok {
			v.fail(name, fmt.Errorf("%q holds %q; use letters, digits, '.', '_' and '-'", value, r))
			return
		}
	}
}
