// Package catalog is the hub's MySQL/MariaDB store: VMs and their disks, restore points and
// their chains, port leases and running exports. It is what survives a workflow's history
// being archived and what operators query. Every write is idempotent on the workflow (and
// disk) it belongs to, so a retried activity never duplicates rows. No secret is stored.
package catalog

import (
	"context"
	"crypto/rand"
	"database/sql"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
)

//go:embed migrations/*.sql
var migrations embed.FS

// Errors callers branch on; match them with errors.Is.
var (
	ErrNotFound       = errors.New("not found")
	ErrBackupRunning  = errors.New("another backup of the VM is running")
	ErrRestoreRunning = errors.New("an in-place restore of the VM is running")
	ErrPointComplete  = errors.New("restore point is complete")
	ErrPointFailed    = errors.New("restore point has failed")
	ErrPortsExhausted = errors.New("no free port on the hub")
	ErrInvalid        = errors.New("invalid argument")
)

// Store is the catalog on one database. It is safe for concurrent use.
type Store struct {
	db  *sql.DB
	log *slog.Logger
}

// Open connects to the database named by dsn (go-sql-driver/mysql format) and checks it is
// reachable. Times are always parsed and kept in UTC whatever the DSN says.
func Open(ctx context.Context, dsn string, log *slog.Logger) (*Store, error) {
	cfg, err := mysql.ParseDSN(dsn)
	if err != nil {
		return nil, fmt.Errorf("parse catalog DSN: %w", err)
	}
	cfg.ParseTime = true
	cfg.Loc = time.UTC
	connector, err := mysql.NewConnector(cfg)
	if err != nil {
		return nil, fmt.Errorf("catalog connector: %w", err)
	}
	db := sql.OpenDB(connector)
	db.SetMaxOpenConns(20)
	db.SetMaxIdleConns(10)
	db.SetConnMaxLifetime(5 * time.Minute)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("connect to catalog %s/%s: %w", cfg.Addr, cfg.DBName, err)
	}
	if log == nil {
		log = slog.Default()
	}
	return &Store{db: db, log: log}, nil
}

// Close closes the connection pool.
func (s *Store) Close() error { return s.db.Close() }

// DB is the underlying pool, for health checks and metrics.
func (s *Store) DB() *sql.DB { return s.db }

// Migrate applies the embedded schema migrations that are not applied yet. Hub workers
// starting together are serialised by a lock table, so each migration runs once.
func (s *Store) Migrate(ctx context.Context) error {
	fsys, err := fs.Sub(migrations, "migrations")
	if err != nil {
		return fmt.Errorf("migrations: %w", err)
	}
	locker, err := lock.NewMySQLTableLocker(
		lock.WithTableLockTimeout(250*time.Millisecond, 480),
		lock.WithTableLogger(s.log),
	)
	if err != nil {
		return fmt.Errorf("migration locker: %w", err)
	}
	provider, err := goose.NewProvider(goose.DialectMySQL, s.db, fsys,
		goose.WithLocker(locker),
		goose.WithDisableGlobalRegistry(true),
	)
	if err != nil {
		return fmt.Errorf("migration provider: %w", err)
	}
	results, err := provider.Up(ctx)
	if err != nil {
		return fmt.Errorf("apply catalog migrations: %w", err)
	}
	for _, r := range results {
		s.log.InfoContext(ctx, "catalog migration applied", "version", r.Source.Version, "file", r.Source.Path, "duration", r.Duration)
	}
	return nil
}

// SchemaVersion is the highest applied migration version.
func (s *Store) SchemaVersion(ctx context.Context) (int64, error) {
	var v sql.NullInt64
	err := s.db.QueryRowContext(ctx, "SELECT MAX(version_id) FROM goose_db_version WHERE is_applied").Scan(&v)
	if err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	return v.Int64, nil
}

// now is the timestamp written to the catalog: UTC, microseconds like DATETIME(6).
func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }

// newPointID returns a sortable, path-safe id: UTC time to the millisecond plus randomness,
// e.g. 20261126T184912.123Z-9f2c41d7. Operators read it in paths and listings.
func newPointID(at time.Time) (string, error) {
	var r [4]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", fmt.Errorf("point id: %w", err)
	}
	return at.UTC().Format("20060102T150405.000Z") + "-" + hex.EncodeToString(r[:]), nil
}

// inTx runs fn in a transaction, retrying it when MySQL picked it as a deadlock victim or a
// lock wait timed out; both leave nothing half-written.
func (s *Store) inTx(ctx context.Context, what string, fn func(tx *sql.Tx) error) error {
	const attempts = 5
	var err error
	for attempt := 1; attempt <= attempts; attempt++ {
		err = s.tryTx(ctx, fn)
		if err == nil || !isRetryable(err) {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-time.After(time.Duration(attempt) * 10 * time.Millisecond):
		}
	}
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

func (s *Store) tryTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

// MySQL error numbers the store reacts to.
const (
	errDuplicateKey    = 1062
	errNoReferencedRow = 1452
	errLockWaitTimeout = 1205
	errDeadlock        = 1213
)

func isMySQLError(err error, number uint16) bool {
	var me *mysql.MySQLError
	return errors.As(err, &me) && me.Number == number
}

func isRetryable(err error) bool {
	return isMySQLError(err, errDeadlock) || isMySQLError(err, errLockWaitTimeout)
}

// ensureRow inserts an id into sites or hubs unless it is there; table is a constant.
func ensureRow(ctx context.Context, tx *sql.Tx, table, id string) error {
	if id == "" || len(id) > 128 {
		return fmt.Errorf("%w: %s id %q must be 1-128 characters", ErrInvalid, table, id)
	}
	_, err := tx.ExecContext(ctx, "INSERT INTO "+table+" (id, created_at) VALUES (?, ?) ON DUPLICATE KEY UPDATE id = id", id, now())
	if err != nil {
		return fmt.Errorf("register %s %q: %w", table, id, err)
	}
	return nil
}

func checkWorkflowID(id string) error {
	if id == "" || len(id) > 255 {
		return fmt.Errorf("%w: workflow id %q must be 1-255 bytes", ErrInvalid, id)
	}
	return nil
}
