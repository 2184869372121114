package catalog

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// Export is a running qemu-nbd export on a hub, recorded so a restarted hub worker can
// reconcile processes, leases and rows.
type Export struct {
	Hub        string
	Port       int
	PID        int
	Path       string
	WorkflowID string
	DiskKey    int32
	ReadOnly   bool // serves a complete point (restore, mount): restarted read-only
	StartedAt  time.Time
}

// RecordExport records (or re-records, after a restart) the export on a hub port.
func (s *Store) RecordExport(ctx context.Context, e Export) error {
	if err := checkWorkflowID(e.WorkflowID); err != nil {
		return err
	}
	if e.Port <= 0 || e.Port > 65535 || e.PID <= 0 || e.Path == "" {
		return fmt.Errorf("%w: export needs a port, a pid and a path (port %d pid %d path %q)", ErrInvalid, e.Port, e.PID, e.Path)
	}
	return s.inTx(ctx, fmt.Sprintf("record export %s:%d", e.Hub, e.Port), func(tx *sql.Tx) error {
		if err := ensureRow(ctx, tx, "hubs", e.Hub); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO exports (hub_id, port, pid, path, workflow_id, disk_key, read_only, started_at)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?)
			ON DUPLICATE KEY UPDATE pid = VALUES(pid), path = VALUES(path), workflow_id = VALUES(workflow_id),
				disk_key = VALUES(disk_key), read_only = VALUES(read_only), started_at = VALUES(started_at)`,
			e.Hub, e.Port, e.PID, e.Path, e.WorkflowID, e.DiskKey, e.ReadOnly, now())
		return err
	})
}

// RemoveExport forgets the export on a hub port; removing a missing one is not an error.
func (s *Store) RemoveExport(ctx context.Context, hub string, port int) error {
	if _, err := s.db.ExecContext(ctx, "DELETE FROM exports WHERE hub_id = ? AND port = ?", hub, port); err != nil {
		return fmt.Errorf("remove export %s:%d: %w", hub, port, err)
	}
	return nil
}

// ListExports returns a hub's recorded exports by port.
func (s *Store) ListExports(ctx context.Context, hub string) ([]Export, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT hub_id, port, pid, path, workflow_id, disk_key, read_only, started_at
		FROM exports WHERE hub_id = ? ORDER BY port`, hub)
	if err != nil {
		return nil, fmt.Errorf("list exports of %s: %w", hub, err)
	}
	defer rows.Close()
	var exports []Export
	for rows.Next() {
		var e Export
		if err := rows.Scan(&e.Hub, &e.Port, &e.PID, &e.Path, &e.WorkflowID, &e.DiskKey, &e.ReadOnly, &e.StartedAt); err != nil {
			return nil, fmt.Errorf("list exports of %s: %w", hub, err)
		}
		exports = append(exports, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list exports of %s: %w", hub, err)
	}
	return exports, nil
}

// VMExports returns the exports, on any hub, serving a file of one of the VM's points: a
// backup writing its target, a restore or mount reading a point (whose chain qemu-nbd holds
// open too).
func (s *Store) VMExports(ctx context.Context, vmID int64) ([]Export, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT DISTINCT e.hub_id, e.port, e.pid, e.path, e.workflow_id, e.disk_key, e.read_only, e.started_at
		FROM exports e
		JOIN point_disks d ON d.target_path = e.path
		JOIN restore_points p ON p.id = d.point_id AND p.hub_id = e.hub_id
		WHERE p.vm_id = ? ORDER BY e.hub_id, e.port`, vmID)
	if err != nil {
		return nil, fmt.Errorf("exports of VM %d: %w", vmID, err)
	}
	defer rows.Close()
	var exports []Export
	for rows.Next() {
		var e Export
		if err := rows.Scan(&e.Hub, &e.Port, &e.PID, &e.Path, &e.WorkflowID, &e.DiskKey, &e.ReadOnly, &e.StartedAt); err != nil {
			return nil, fmt.Errorf("exports of VM %d: %w", vmID, err)
		}
		exports = append(exports, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("exports of VM %d: %w", vmID, err)
	}
	return exports, nil
}
