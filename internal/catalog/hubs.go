package catalog

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Hub is a hub's row: when its worker was last seen, the space of its repository's file
// system then, and its export port range. A hub only ever named by a point, lease or export
// (its worker never ran this version) has a zero LastSeen and Ports.
type Hub struct {
	ID        string
	LastSeen  time.Time
	FreeBytes int64
	UsedBytes int64
	Ports     PortRange
	// PendingBytes is what the backups running on the hub may still write at most: the
	// capacity of their VMs' disks (ListHubs; not recorded).
	PendingBytes int64
}

// Room is the hub's free bytes less what its running backups may still write.
func (h Hub) Room() int64 { return h.FreeBytes - h.PendingBytes }

// Alive reports whether the hub's worker was seen within within of at.
func (h Hub) Alive(at time.Time, within time.Duration) bool {
	return !h.LastSeen.IsZero() && at.Sub(h.LastSeen) <= within
}

// RecordHub writes the hub worker's heartbeat: h's hub seen now, with its repository's free
// and used bytes and its port range (h.LastSeen is not read). The row is created when missing.
func (s *Store) RecordHub(ctx context.Context, h Hub) error {
	if h.ID == "" || len(h.ID) > 128 {
		return fmt.Errorf("%w: hub id %q must be 1-128 characters", ErrInvalid, h.ID)
	}
	if err := h.Ports.check(); err != nil {
		return fmt.Errorf("record hub %s: %w", h.ID, err)
	}
	at := now()
	_, err := s.db.ExecContext(ctx, `INSERT INTO hubs (id, created_at, last_seen, free_bytes, used_bytes, port_first, port_last)
		VALUES (?, ?, ?, ?, ?, ?, ?)
		ON DUPLICATE KEY UPDATE last_seen = VALUES(last_seen), free_bytes = VALUES(free_bytes), used_bytes = VALUES(used_bytes),
			port_first = VALUES(port_first), port_last = VALUES(port_last)`,
		h.ID, at, at, h.FreeBytes, h.UsedBytes, h.Ports.First, h.Ports.Last)
	if err != nil {
		return fmt.Errorf("record hub %s: %w", h.ID, err)
	}
	return nil
}

// ListHubs returns every hub by id, with the bytes its running backups may still write.
func (s *Store) ListHubs(ctx context.Context) ([]Hub, error) { return listHubs(ctx, s.db) }

func listHubs(ctx context.Context, q querier) ([]Hub, error) {
	rows, err := q.QueryContext(ctx, `SELECT h.id, h.last_seen, h.free_bytes, h.used_bytes, h.port_first, h.port_last, COALESCE(r.pending, 0)
		FROM hubs h LEFT JOIN (
			SELECT p.hub_id, SUM(d.capacity_bytes) AS pending FROM restore_points p JOIN disks d ON d.vm_id = p.vm_id
			WHERE p.status = 'running' GROUP BY p.hub_id
		) r ON r.hub_id = h.id
		ORDER BY h.id`)
	if err != nil {
		return nil, fmt.Errorf("list hubs: %w", err)
	}
	defer rows.Close()
	var hubs []Hub
	for rows.Next() {
		var (
			h           Hub
			seen        sql.NullTime
			free, used  sql.NullInt64
			first, last sql.NullInt32
		)
		if err := rows.Scan(&h.ID, &seen, &free, &used, &first, &last, &h.PendingBytes); err != nil {
			return nil, fmt.Errorf("list hubs: %w", err)
		}
		h.LastSeen, h.FreeBytes, h.UsedBytes = seen.Time, free.Int64, used.Int64
		h.Ports = PortRange{First: int(first.Int32), Last: int(last.Int32)}
		hubs = append(hubs, h)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list hubs: %w", err)
	}
	return hubs, nil
}

// DefaultPlaceWait bounds how long OpenPoint waits for the other placements when the request
// names none.
const DefaultPlaceWait = 30 * time.Second

// ErrPlaceBusy says a placement did not get the hubs' lock, or did not finish, within its
// wait: other placements held it or the catalog is slow. It clears on a later attempt.
var ErrPlaceBusy = errors.New("placement busy")

// ChooseHub picks the hub of a new chain from every hub (ListHubs), read while no other
// placement can open a point; its error ends OpenPoint unchanged.
type ChooseHub func(hubs []Hub) (string, error)

// lockHubs takes every hubs row's lock, which serialises the placements: a placement's
// reading of the hubs and its opening of the point are then one step for the others. It must
// come before the transaction's first plain read: under REPEATABLE READ a transaction reads
// the snapshot of its first plain read, which then comes after the previous placement
// committed.
func lockHubs(ctx context.Context, tx *sql.Tx) error {
	var n int
	if err := tx.QueryRowContext(ctx, "SELECT COUNT(*) FROM hubs FOR UPDATE").Scan(&n); err != nil {
		return fmt.Errorf("lock the hubs: %w", err)
	}
	return nil
}
