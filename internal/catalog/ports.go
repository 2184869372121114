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

// PortsExhaustedError is a hub without enough free ports for a lease, for this caller: too
// few are free, or the free ones are kept for jobs ahead of it in the hub's line. It matches
// ErrPortsExhausted; the caller now has a place in the line.
type PortsExhaustedError struct {
	Hub    string
	Range  PortRange
	Needed int // ports the caller asked for beyond those it already held
	Free   int // ports of the range without a lease
	Ahead  int // jobs ahead of the caller in the hub's line for ports
}

func (e *PortsExhaustedError) Error() string {
	var msg string
	if e.Free == 0 {
		msg = fmt.Sprintf("%v: all %d ports %d-%d of hub %s are leased", ErrPortsExhausted, e.Range.Size(), e.Range.First, e.Range.Last, e.Hub)
	} else {
		msg = fmt.Sprintf("%v: %d ports needed, %d of the %d ports %d-%d of hub %s free", ErrPortsExhausted,
			e.Needed, e.Free, e.Range.Size(), e.Range.First, e.Range.Last, e.Hub)
	}
	if e.Ahead > 0 {
		msg += fmt.Sprintf(", %d %s ahead in line", e.Ahead, plural(e.Ahead, "job", "jobs"))
	}
	return msg
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
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

// PortWaitStale is how long a job keeps its place in a hub's line for ports without asking
// again. The workflows ask at least every 30 s while they wait (and at once when woken), so
// a waiter silent for longer is gone or stuck: its ports are no longer kept for it, and it
// gets them back (its place is kept) when it asks again.
const PortWaitStale = 2 * time.Minute

// AllocateAll leases a port of hub's range to every (workflowID, disk) pair at once and
// returns them in diskKeys' order; a pair that holds a lease gets the same port back. All or
// nothing: a workflow never holds some of its ports while waiting for the rest, so jobs that
// each need several cannot deadlock on a small range. First come, first served: a caller
// that cannot have its ports joins the hub's line, and free ports go to the jobs in line
// in order, so a job needing four is not passed over forever by later jobs needing one
// (who wait behind it even while one port is free). The range is the one hub recorded (any
// hub worker may lease another hub's ports), else the allocator's. Too few free ports is a
// *PortsExhaustedError, which clears once leases are released (Ready says who to wake);
// more disks than the range has ports is ErrInvalid, which never clears.
func (p *Ports) AllocateAll(ctx context.Context, hub, workflowID string, diskKeys []int32) ([]int, error) {
	if err := checkWorkflowID(workflowID); err != nil {
		return nil, err
	}
	ports := make([]int, len(diskKeys))
	var exhausted *PortsExhaustedError
	err := p.store.inTx(ctx, fmt.Sprintf("allocate ports on %s for %s disks %v", hub, workflowID, diskKeys), func(tx *sql.Tx) error {
		exhausted = nil
		if err := ensureRow(ctx, tx, "hubs", hub); err != nil {
			return err
		}
		// The hub row lock serialises allocators of one hub: lowest-free is then exact and
		// no two callers ever pick the same port. The unique keys stay as the last guard.
		rng, err := p.lockHub(ctx, tx, hub)
		if err != nil {
			return err
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
		at := now()
		line, err := waitLine(ctx, tx, hub, workflowID, at)
		if err != nil {
			return err
		}
		var aheadJobs, aheadPorts int
		if len(held) == 0 {
			// A job already holding ports here (one leasing disk by disk, as runs from before
			// the all-at-once lease do) is served first: queueing it behind jobs that wait for
			// the ports it holds would deadlock.
			aheadJobs, aheadPorts = line.ahead(workflowID)
		}
		free, leased, err := lowestFree(ctx, tx, hub, rng, aheadPorts+len(missing))
		if err != nil {
			return err
		}
		if len(free) < aheadPorts+len(missing) {
			// Committed with the refusal: the caller's place in line must outlive this call.
			if _, err := tx.ExecContext(ctx, `INSERT INTO port_waits (hub_id, workflow_id, needed, since, seen_at) VALUES (?, ?, ?, ?, ?)
				ON DUPLICATE KEY UPDATE needed = VALUES(needed), seen_at = VALUES(seen_at)`, hub, workflowID, len(missing), at, at); err != nil {
				return err
			}
			exhausted = &PortsExhaustedError{Hub: hub, Range: rng, Needed: len(missing), Free: rng.Size() - leased, Ahead: aheadJobs}
			return nil
		}
		if _, err := tx.ExecContext(ctx, "DELETE FROM port_waits WHERE hub_id = ? AND workflow_id = ?", hub, workflowID); err != nil {
			return err
		}
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
	if exhausted != nil {
		return nil, exhausted
	}
	return ports, nil
}

// lockHub locks hub's row, which serialises every change to its leases and its line, and
// returns its port range: the one it recorded, else the allocator's. A hub without a row
// is sql.ErrNoRows.
func (p *Ports) lockHub(ctx context.Context, tx *sql.Tx, hub string) (PortRange, error) {
	var first, last sql.NullInt32
	if err := tx.QueryRowContext(ctx, "SELECT port_first, port_last FROM hubs WHERE id = ? FOR UPDATE", hub).Scan(&first, &last); err != nil {
		return PortRange{}, err
	}
	if first.Valid && last.Valid {
		return PortRange{First: int(first.Int32), Last: int(last.Int32)}, nil
	}
	return p.rng, nil
}

// waiter is a job in a hub's line for ports.
type waiter struct {
	workflowID string
	needed     int
}

// line is a hub's waiters that asked within PortWaitStale, oldest first.
type line []waiter

// waitLine reads hub's line as of at, locking its rows. asking, the workflow asking now (or
// ""), is in it at its place even if it was silent: asking again gives a waiter its place
// back. Rows of runs that ended without their release are Reap's to remove.
func waitLine(ctx context.Context, tx *sql.Tx, hub, asking string, at time.Time) (line, error) {
	rows, err := tx.QueryContext(ctx, `SELECT workflow_id, needed FROM port_waits WHERE hub_id = ? AND (seen_at >= ? OR workflow_id = ?)
		ORDER BY since, workflow_id FOR UPDATE`, hub, at.Add(-PortWaitStale), asking)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var l line
	for rows.Next() {
		var w waiter
		if err := rows.Scan(&w.workflowID, &w.needed); err != nil {
			return nil, err
		}
		l = append(l, w)
	}
	return l, rows.Err()
}

// ahead counts the jobs ahead of workflowID in the line and the ports they wait for: those
// before it, or everyone when it is not in line.
func (l line) ahead(workflowID string) (jobs, ports int) {
	for _, w := range l {
		if w.workflowID == workflowID {
			break
		}
		jobs++
		ports += w.needed
	}
	return jobs, ports
}

// lowestFree finds up to n lowest ports of rng without a lease on hub, and how many of the
// range's ports are leased.
func lowestFree(ctx context.Context, tx *sql.Tx, hub string, rng PortRange, n int) ([]int, int, error) {
	rows, err := tx.QueryContext(ctx, "SELECT port FROM port_leases WHERE hub_id = ? AND port BETWEEN ? AND ? ORDER BY port",
		hub, rng.First, rng.Last)
	if err != nil {
		return nil, 0, err
	}
	defer rows.Close()
	leased := map[int]bool{}
	for rows.Next() {
		var port int
		if err := rows.Scan(&port); err != nil {
			return nil, 0, err
		}
		leased[port] = true
	}
	if err := rows.Err(); err != nil {
		return nil, 0, err
	}
	free := make([]int, 0, min(n, rng.Size()))
	for port := rng.First; port <= rng.Last && len(free) < n; port++ {
		if !leased[port] {
			free = append(free, port)
		}
	}
	return free, len(leased), nil
}

// Ready returns the workflows waiting in hub's line that the hub's free ports now fit, in
// line order: the ones to wake after a release, who would each get their ports if they
// asked now.
func (p *Ports) Ready(ctx context.Context, hub string) ([]string, error) {
	var ready []string
	err := p.store.inTx(ctx, "list the line for ports on "+hub, func(tx *sql.Tx) error {
		ready = nil
		rng, err := p.lockHub(ctx, tx, hub)
		if errors.Is(err, sql.ErrNoRows) {
			return nil // a hub never seen has no line
		}
		if err != nil {
			return err
		}
		line, err := waitLine(ctx, tx, hub, "", now())
		if err != nil || len(line) == 0 {
			return err
		}
		_, leased, err := lowestFree(ctx, tx, hub, rng, 0)
		if err != nil {
			return err
		}
		free := rng.Size() - leased
		for _, w := range line {
			if w.needed > free {
				break
			}
			free -= w.needed
			ready = append(ready, w.workflowID)
		}
		return nil
	})
	return ready, err
}

// ReleaseWorkflow frees every lease the workflow holds on hub and returns them, and takes it
// out of the hub's line for ports; releasing again returns none.
func (p *Ports) ReleaseWorkflow(ctx context.Context, hub, workflowID string) ([]Lease, error) {
	var released []Lease
	err := p.store.inTx(ctx, fmt.Sprintf("release ports of %s on %s", workflowID, hub), func(tx *sql.Tx) error {
		// The hub row first, as AllocateAll and Ready take it: one lock order, no deadlock.
		_, err := p.lockHub(ctx, tx, hub)
		if errors.Is(err, sql.ErrNoRows) {
			released = nil
			return nil // a hub never seen holds no lease and no line
		}
		if err != nil {
			return err
		}
		released, err = queryLeases(ctx, tx, "hub_id = ? AND workflow_id = ? ORDER BY port FOR UPDATE", hub, workflowID)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "DELETE FROM port_leases WHERE hub_id = ? AND workflow_id = ?", hub, workflowID); err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, "DELETE FROM port_waits WHERE hub_id = ? AND workflow_id = ?", hub, workflowID)
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
// stop their exports, and takes closed workflows out of the hub's line for ports. A
// workflow whose state cannot be read keeps its leases and place; the errors are returned
// joined after every other workflow was handled.
func (p *Ports) Reap(ctx context.Context, hub string, isClosed WorkflowClosed) ([]Lease, error) {
	leases, err := p.ListLeases(ctx, hub)
	if err != nil {
		return nil, err
	}
	owners := make([]string, 0, len(leases))
	for _, l := range leases {
		owners = append(owners, l.WorkflowID)
	}
	waiting, err := p.Waiting(ctx, hub)
	if err != nil {
		return nil, err
	}
	checked := map[string]bool{}
	var reaped []Lease
	var errs []error
	for _, id := range append(owners, waiting...) {
		if checked[id] {
			continue
		}
		checked[id] = true
		closed, err := isClosed(ctx, id)
		if err != nil {
			errs = append(errs, fmt.Errorf("workflow %s: %w", id, err))
			continue
		}
		if !closed {
			continue
		}
		released, err := p.ReleaseWorkflow(ctx, hub, id)
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

// Waiter is a job in a hub's line for ports: it waits for Needed ports since Since and
// last asked at SeenAt (silent for over PortWaitStale, it is passed over until it asks again).
type Waiter struct {
	WorkflowID string
	Needed     int
	Since      time.Time
	SeenAt     time.Time
}

// Silent reports whether the waiter has not asked within PortWaitStale of at.
func (w Waiter) Silent(at time.Time) bool { return at.Sub(w.SeenAt) > PortWaitStale }

// Line lists hub's line for ports, oldest first, silent waiters included.
func (p *Ports) Line(ctx context.Context, hub string) ([]Waiter, error) {
	rows, err := p.store.db.QueryContext(ctx, "SELECT workflow_id, needed, since, seen_at FROM port_waits WHERE hub_id = ? ORDER BY since, workflow_id", hub)
	if err != nil {
		return nil, fmt.Errorf("list the line for ports on %s: %w", hub, err)
	}
	defer rows.Close()
	var line []Waiter
	for rows.Next() {
		var w Waiter
		if err := rows.Scan(&w.WorkflowID, &w.Needed, &w.Since, &w.SeenAt); err != nil {
			return nil, fmt.Errorf("list the line for ports on %s: %w", hub, err)
		}
		line = append(line, w)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list the line for ports on %s: %w", hub, err)
	}
	return line, nil
}

// Waiting lists the workflows in hub's line for ports, oldest first, silent ones included.
func (p *Ports) Waiting(ctx context.Context, hub string) ([]string, error) {
	line, err := p.Line(ctx, hub)
	if err != nil {
		return nil, err
	}
	ids := make([]string, len(line))
	for i, w := range line {
		ids[i] = w.WorkflowID
	}
	return ids, nil
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
