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

// PortsExhaustedError is a hub without enough free ports for a lease; it matches
// ErrPortsExhausted.
type PortsExhaustedError struct {
	Hub    string
	Range  PortRange
	Needed int // ports the caller asked for beyond those it already held
	Free   int // ports of the range without a lease
}

func (e *PortsExhaustedError) Error() string {
	if e.Free == 0 {
		return fmt.Sprintf("%v: all %d ports %d-%d of hub %s are leased", ErrPortsExhausted, e.Range.Size(), e.Range.First, e.Range.Last, e.Hub)
	}
	return fmt.Sprintf("%v: %d ports needed, %d of the %d ports %d-%d of hub %s free", ErrPortsExhausted,
		e.Needed, e.Free, e.Range.Size(), e.Range.First, e.Range.Last, e.Hub)
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
// it, as AllocateAll does for one disk.
func (p *Ports) Allocate(ctx context.Context, hub, workflowID string, diskKey int32) (int, error) {
	ports, err := p.AllocateAll(ctx, hub, workflowID, []int32{diskKey})
	if err != nil {
		return 0, err
	}
	return ports[0], nil
}

// AllocateAll leases a port of hub's range to every (workflowID, disk) pair at once and
// returns them in diskKeys' order; a pair that holds a lease gets the same port back. All or
// nothing: a workflow never holds some of its ports while waiting for the rest, so jobs that
// each need several cannot deadlock on a small range. The range is the one hub recorded (any
// hub worker may lease another hub's ports), else the allocator's. Too few free ports is a
// *PortsExhaustedError, which clears once leases are released; more disks than the range
// has ports is ErrInvalid, which never clears.
func (p *Ports) AllocateAll(ctx context.Context, hub, workflowID string, diskKeys []int32) ([]int, error) {
	if err := checkWorkflowID(workflowID); err != nil {
		return nil, err
	}
	ports := make([]int, len(diskKeys))
	err := p.store.inTx(ctx, fmt.Sprintf("allocate ports on %s for %s disks %v", hub, workflowID, diskKeys), func(tx *sql.Tx) error {
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
		if len(diskKeys) > rng.Size() {
			return fmt.Errorf("%w: %d disks need a port each and hub %s has %d (%d-%d)", ErrInvalid, len(diskKeys), hub, rng.Size(), rng.First, rng.Last)
		}
		held, err := queryLeases(ctx, tx, "hub_id = ? AND workflow_id = ?", hub, workflowID)
		if err != nil {
			return err
		}
		byDisk := make(map[int32]int, len(held))
		for _, l := range held {
			byDisk[l.DiskKey] = l.Port
		}
		var missing []int
		for i, key := range diskKeys {
			if port, ok := byDisk[key]; ok {
				ports[i] = port
			} else {
				missing = append(missing, i)
			}
		}
		if len(missing) == 0 {
			return nil
		}
		free, err := lowestFree(ctx, tx, hub, rng, len(missing))
		if err != nil {
			return err
		}
		at := now()
		for j, i := range missing {
			ports[i] = free[j]
			if _, err := tx.ExecContext(ctx, "INSERT INTO port_leases (hub_id, port, workflow_id, disk_key, leased_at) VALUES (?, ?, ?, ?, ?)",
				hub, free[j], workflowID, diskKeys[i], at); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return ports, nil
}

// lowestFree finds the n lowest ports of rng without a lease on hub, or a
// *PortsExhaustedError when fewer are free.
func lowestFree(ctx context.Context, tx *sql.Tx, hub string, rng PortRange, n int) ([]int, error) {
	rows, err := tx.QueryContext(ctx, "SELECT port FROM port_leases WHERE hub_id = ? AND port BETWEEN ? AND ? ORDER BY port",
		hub, rng.First, rng.Last)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	leased := map[int]bool{}
	for rows.Next() {
		var port int
		if err := rows.Scan(&port); err != nil {
			return nil, err
		}
		leased[port] = true
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	free := make([]int, 0, n)
	for port := rng.First; port <= rng.Last && len(free) < n; port++ {
		if !leased[port] {
			free = append(free, port)
		}
	}
	if len(free) < n {
		return nil, &PortsExhaustedError{Hub: hub, Range: rng, Needed: n, Free: rng.Size() - len(leased)}
	}
	return free, nil
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
