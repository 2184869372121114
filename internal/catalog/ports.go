package catalog

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// PortRange is an inclusive range of TCP ports exports may listen on.
type PortRange struct {
	First int
	Last  int
}

// DefaultPortRange is the hub's export port range unless configured otherwise.
var DefaultPortRange = PortRange{First: 10100, Last: 10200}

// Size is the number of ports in the range.
func (r PortRange) Size() int { return r.Last - r.First + 1 }

func (r PortRange) check() error {
	if r.First < 1 || r.Last > 65535 || r.First > r.Last {
		return fmt.Errorf("%w: port range %d-%d", ErrInvalid, r.First, r.Last)
	}
	return nil
}

// PortsExhaustedError is a hub with every port of its range leased; it matches
// ErrPortsExhausted.
type PortsExhaustedError struct {
	Hub   string
	Range PortRange
}

func (e *PortsExhaustedError) Error() string {
	return fmt.Sprintf("%v: all %d ports %d-%d of hub %s are leased", ErrPortsExhausted, e.Range.Size(), e.Range.First, e.Range.Last, e.Hub)
}

func (e *PortsExhaustedError) Unwrap() error { return ErrPortsExhausted }

// Lease is a port on a hub leased to one disk of one workflow.
type Lease struct {
	Hub        string
	Port       int
	WorkflowID string
	DiskKey    int32
	LeasedAt   time.Time
}

// Ports leases export ports on hubs from the catalog, so that every hub worker (and every
// restart of one) agrees on who holds which port.
type Ports struct {
	store *Store
	rng   PortRange
}

// NewPorts returns the allocator for a port range.
func NewPorts(store *Store, rng PortRange) (*Ports, error) {
	if err := rng.check(); err != nil {
		return nil, err
	}
	return &Ports{store: store, rng: rng}, nil
}

// Range is the allocator's port range: this hub's, and the one used for a hub that has not
// recorded its own (RecordHub).
func (p *Ports) Range() PortRange { return p.rng }

// Allocate leases the lowest free port of hub's range to (workflowID, diskKey) and returns
// it; the same pair gets the same port back. The range is the one hub recorded (any hub
// worker may lease another hub's ports), else the allocator's. When every port is leased it
// returns a *PortsExhaustedError, which clears once leases are released.
func (p *Ports) Allocate(ctx context.Context, hub, workflowID string, diskKey int32) (int, error) {
	if err := checkWorkflowID(workflowID); err != nil {
		return 0, err
	}
	var port int
	err := p.store.inTx(ctx, fmt.Sprintf("allocate port on %s for %s disk %d", hub, workflowID, diskKey), func(tx *sql.Tx) error {
		if err := ensureRow(ctx, tx, "hubs", hub); err != nil {
			return err
		}
		// The hub row lock serialises allocators of one hub: lowest-free is then exact and
		// no two callers ever pick the same port. The unique keys stay as the last guard.
		var first, last sql.NullInt32
		if err := tx.QueryRowContext(ctx, "SELECT port_first, port_last FROM hubs WHERE id = ? FOR UPDATE", hub).Scan(&first, &last); err != nil {
			return err
		}
		rng := p.rng
		if first.Valid && last.Valid {
			rng = PortRange{First: int(first.Int32), Last: int(last.Int32)}
		}
		err := tx.QueryRowContext(ctx, "SELECT port FROM port_leases WHERE hub_id = ? AND workflow_id = ? AND disk_key = ?",
			hub, workflowID, diskKey).Scan(&port)
		if err == nil {
			return nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		port, err = lowestFree(ctx, tx, hub, rng)
		if err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, "INSERT INTO port_leases (hub_id, port, workflow_id, disk_key, leased_at) VALUES (?, ?, ?, ?, ?)",
			hub, port, workflowID, diskKey, now())
		return err
	})
	if err != nil {
		return 0, err
	}
	return port, nil
}

// lowestFree finds the lowest port of rng without a lease on hub.
func lowestFree(ctx context.Context, tx *sql.Tx, hub string, rng PortRange) (int, error) {
	rows, err := tx.QueryContext(ctx, "SELECT port FROM port_leases WHERE hub_id = ? AND port BETWEEN ? AND ? ORDER BY port",
		hub, rng.First, rng.Last)
	if err != nil {
		return 0, err
	}
	defer rows.Close()
	candidate := rng.First
	for rows.Next() {
		var leased int
		if err := rows.Scan(&leased); err != nil {
			return 0, err
		}
		if leased != candidate {
			break
		}
		candidate++
	}
	if err := rows.Err(); err != nil {
		return 0, err
	}
	if candidate > rng.Last {
		return 0, &PortsExhaustedError{Hub: hub, Range: rng}
	}
	return candidate, nil
}

// ReleaseWorkflow frees every lease the workflow holds on hub and returns them; releasing
// again returns none.
func (p *Ports) ReleaseWorkflow(ctx context.Context, hub, workflowID string) ([]Lease, error) {
	var released []Lease
	err := p.store.inTx(ctx, fmt.Sprintf("release ports of %s on %s", workflowID, hub), func(tx *sql.Tx) error {
		var err error
		released, err = queryLeases(ctx, tx, "hub_id = ? AND workflow_id = ? ORDER BY port FOR UPDATE", hub, workflowID)
		if err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, "DELETE FROM port_leases WHERE hub_id = ? AND workflow_id = ?", hub, workflowID)
		return err
	})
	if err != nil {
		return nil, err
	}
	return released, nil
}

// ListLeases returns the hub's leases by port.
func (p *Ports) ListLeases(ctx context.Context, hub string) ([]Lease, error) {
	leases, err := queryLeases(ctx, p.store.db, "hub_id = ? ORDER BY port", hub)
	if err != nil {
		return nil, fmt.Errorf("list leases of %s: %w", hub, err)
	}
	return leases, nil
}

// WorkflowClosed reports whether a workflow has closed; the hub asks Temporal.
type WorkflowClosed func(ctx context.Context, workflowID string) (bool, error)

// Reap frees the hub's leases whose workflow has closed and returns them, so the caller can
// stop their exports. A workflow whose state cannot be read keeps its leases; the errors are
// returned joined after every other workflow was handled.
func (p *Ports) Reap(ctx context.Context, hub string, isClosed WorkflowClosed) ([]Lease, error) {
	leases, err := p.ListLeases(ctx, hub)
	if err != nil {
		return nil, err
	}
	checked := map[string]bool{}
	var reaped []Lease
	var errs []error
	for _, l := range leases {
		if checked[l.WorkflowID] {
			continue
		}
		checked[l.WorkflowID] = true
		closed, err := isClosed(ctx, l.WorkflowID)
		if err != nil {
			errs = append(errs, fmt.Errorf("workflow %s: %w", l.WorkflowID, err))
			continue
		}
		if !closed {
			continue
		}
		released, err := p.ReleaseWorkflow(ctx, hub, l.WorkflowID)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, r := range released {
			p.store.log.InfoContext(ctx, "port lease reaped", "hub", hub, "port", r.Port, "workflow", r.WorkflowID, "disk", r.DiskKey)
		}
		reaped = append(reaped, released...)
	}
	if len(errs) > 0 {
		return reaped, fmt.Errorf("reap leases of %s: %w", hub, errors.Join(errs...))
	}
	return reaped, nil
}

func queryLeases(ctx context.Context, q querier, where string, args ...any) ([]Lease, error) {
	query := "SELECT hub_id, port, workflow_id, disk_key, leased_at FROM port_leases WHERE " + where
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var leases []Lease
	for rows.Next() {
		var l Lease
		if err := rows.Scan(&l.Hub, &l.Port, &l.WorkflowID, &l.DiskKey, &l.LeasedAt); err != nil {
			return nil, err
		}
		leases = append(leases, l)
	}
	return leases, rows.Err()
}
