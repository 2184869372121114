package testenv

import (
	"context"
	"database/sql"
	"net"
	"testing"
	"time"

	_ "github.com/go-sql-driver/mysql"
)

func TestStartMariaDBCreatesAndReadsTable(t *testing.T) {
	start := time.Now()
	mdb := StartMariaDB(t)
	t.Logf("mariadb ready in %s at %s", time.Since(start), mdb.Addr)

	db, err := sql.Open("mysql", mdb.DSN)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	if _, err := db.ExecContext(ctx, "CREATE TABLE smoke (id INT PRIMARY KEY, name VARCHAR(32), at DATETIME(6))"); err != nil {
		t.Fatalf("create table: %v", err)
	}
	now := time.Now().UTC().Truncate(time.Microsecond)
	if _, err := db.ExecContext(ctx, "INSERT INTO smoke VALUES (?, ?, ?)", 7, "seven", now); err != nil {
		t.Fatalf("insert: %v", err)
	}
	var name string
	var at time.Time
	if err := db.QueryRowContext(ctx, "SELECT name, at FROM smoke WHERE id = ?", 7).Scan(&name, &at); err != nil {
		t.Fatalf("select: %v", err)
	}
	if name != "seven" || !at.Equal(now) {
		t.Fatalf("read back (%q, %s), want (%q, %s)", name, at, "seven", now)
	}
}

func TestMariaDBDatabasesAreIsolated(t *testing.T) {
	Integration(t)
	// Subtests finish (and run their cleanups) before run returns, as tests do inside m.Run.
	var addrs []string
	run := func() int {
		t.Run("shared", func(t *testing.T) {
			first, second := MariaDB(t), MariaDB(t)
			addrs = append(addrs, first.Addr)
			if first.Addr != second.Addr {
				t.Errorf("shared server expected, got %s and %s", first.Addr, second.Addr)
			}
			db, err := sql.Open("mysql", first.DSN)
			if err != nil {
				t.Fatalf("open: %v", err)
			}
			defer db.Close()
			if _, err := db.Exec("CREATE TABLE own (id INT)"); err != nil {
				t.Errorf("create table in own database: %v", err)
			}
			// The first database's user must not reach the second database.
			if _, err := db.Exec("CREATE TABLE `" + second.Name + "`.intruder (id INT)"); err == nil {
				t.Errorf("user %s created a table in %s", first.User, second.Name)
			}
		})
		return 0
	}
	WithSharedMariaDB(run)
	if len(addrs) != 1 {
		t.Fatalf("subtest did not run")
	}
	// The shared server is gone once run returned.
	if conn, err := net.DialTimeout("tcp", addrs[0], time.Second); err == nil {
		conn.Close()
		t.Errorf("shared server at %s still listening after WithSharedMariaDB returned", addrs[0])
	}
}
