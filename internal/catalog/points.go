package catalog

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/diskferry/diskferry/internal/text"
)

// Restore point statuses. Only a complete point may be restored from or built upon.
const (
	StatusRunning  = "running"
	StatusComplete = "complete"
	StatusFailed   = "failed"
)

// Point modes.
const (
	ModeFull        = "full"
	ModeIncremental = "incremental"
)

// Point is a restore point: one backup of one VM, written by one workflow run.
type Point struct {
	ID           string
	VMID         int64
	WorkflowID   string
	RunID        string
	Site         string
	Hub          string
	Mode         string // full|incremental
	ParentID     string // the point an incremental builds on; empty for full
	Status       string
	Error        string // why it failed
	StartedAt    time.Time
	FinishedAt   time.Time // zero while running
	BytesRead    int64
	BytesWritten int64
	Disks        []PointDisk // by key
	VMConfig     *VMConfig   // the VM's shape at backup time; nil: not captured (older points)
}

// PointDisk is one disk of a restore point: its qcow2 on the hub and how it was copied.
type PointDisk struct {
	Key           int32
	Path          string // qcow2 target on the hub
	ParentPath    string // backing file of an incremental overlay
	Mode          string // full|incremental
	Reason        string // why full when an incremental was possible or asked for
	ChangeID      string // CBT changeId read from the snapshot, the next incremental's base
	CapacityBytes int64
	BytesRead     int64
	BytesWritten  int64
	BytesZeroed   int64
	// AllocatedBytes is what the file takes on the hub's file system, as measured when the
	// point was committed; 0 for points from before it was recorded.
	AllocatedBytes int64
	Duration       time.Duration
	Digest         string
}

// OpenPointRequest opens a restore point for a workflow run.
type OpenPointRequest struct {
	WorkflowID string
	RunID      string
	Site       string
	Hub        string // empty when Choose picks it
	VMID       int64
	Mode       string // full|incremental
	ParentID   string // required for incremental: a complete point of the same VM
	VMConfig   *VMConfig
	// RestoreClosed is the in-place restore workflow whose mark the plan followed, found
	// closed by the caller; a VM marked by any other gives a *RestoreRunningError.
	RestoreClosed string
	// Choose, when set, places a new chain: OpenPoint picks the hub with it from every hub,
	// read under a lock that serialises placements, so placements at the same moment each
	// see the points the others opened. PlaceWait bounds that wait and the whole step
	// (DefaultPlaceWait when zero); past it OpenPoint fails with ErrPlaceBusy.
	Choose    ChooseHub
	PlaceWait time.Duration
}

// BackupRunningError says the VM already has a running point of another workflow.
type BackupRunningError struct {
	VMID       int64
	PointID    string
	WorkflowID string
}

func (e *BackupRunningError) Error() string {
	return fmt.Sprintf("VM %d: point %s of workflow %s is running", e.VMID, e.PointID, e.WorkflowID)
}

// Is makes errors.Is(err, ErrBackupRunning) hold.
func (e *BackupRunningError) Is(target error) bool { return target == ErrBackupRunning }

// maxErrorText keeps an error message within a TEXT column.
const maxErrorText = 60000

// maxReasonText is the size of point_disks.reason.
const maxReasonText = 1024

// OpenPoint opens a running restore point and returns it. It is idempotent per workflow run:
// a retry gets the same point back. A new run of the same workflow id (reset, retry policy)
// takes over that workflow's running point. A running point of another workflow on the VM
// gives a *BackupRunningError; a VM marked by an in-place restore other than
// req.RestoreClosed gives a *RestoreRunningError. A retry of a placed point gets the hub it
// was placed on, without choosing again.
func (s *Store) OpenPoint(ctx context.Context, req OpenPointRequest) (Point, error) {
	if err := checkWorkflowID(req.WorkflowID); err != nil {
		return Point{}, err
	}
	if req.Choose != nil && req.Hub != "" {
		return Point{}, fmt.Errorf("%w: a point is opened on hub %s or on the hub its placement chooses, not both", ErrInvalid, req.Hub)
	}
	if req.RunID == "" || len(req.RunID) > 64 {
		return Point{}, fmt.Errorf("%w: run id %q must be 1-64 characters", ErrInvalid, req.RunID)
	}
	switch {
	case req.Mode == ModeFull && req.ParentID == "":
	case req.Mode == ModeIncremental && req.ParentID != "":
	default:
		return Point{}, fmt.Errorf("%w: mode %q with parent %q (full has none, incremental needs one)", ErrInvalid, req.Mode, req.ParentID)
	}
	vmConfig, err := encodeVMConfig(req.VMConfig)
	if err != nil {
		return Point{}, err
	}
	outer := ctx
	wait := cmp.Or(req.PlaceWait, DefaultPlaceWait)
	if req.Choose != nil {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, wait)
		defer cancel()
	}
	var point Point
	err = s.inTx(ctx, "open point for workflow "+req.WorkflowID, func(tx *sql.Tx) error {
		// Rows are locked in one order, sites, hubs, vms, whichever way the hub is named.
		if err := ensureRow(ctx, tx, "sites", req.Site); err != nil {
			return err
		}
		if req.Choose != nil {
			if err := lockHubs(ctx, tx); err != nil {
				return err
			}
		} else if err := ensureRow(ctx, tx, "hubs", req.Hub); err != nil {
			return err
		}
		// The VM row lock serialises openers of the same VM, so two workflows cannot both
		// see "nothing running" and both insert.
		var vmID int64
		var restoreWorkflow sql.NullString
		err := tx.QueryRowContext(ctx, "SELECT id, restore_workflow_id FROM vms WHERE id = ? FOR UPDATE", req.VMID).Scan(&vmID, &restoreWorkflow)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("VM %d: %w", req.VMID, ErrNotFound)
		}
		if err != nil {
			return err
		}

		point, err = queryPoint(ctx, tx, "workflow_id = ? AND run_id = ?", req.WorkflowID, req.RunID)
		if err == nil {
			return nil
		}
		if !errors.Is(err, ErrNotFound) {
			return err
		}

		// An in-place restore may still be writing the VM's disks unless the caller found its
		// workflow closed.
		if restoreWorkflow.Valid && restoreWorkflow.String != req.RestoreClosed {
			return &RestoreRunningError{VMID: req.VMID, WorkflowID: restoreWorkflow.String}
		}

		if req.ParentID != "" {
			parent, err := queryPoint(ctx, tx, "id = ?", req.ParentID)
			if err != nil {
				return fmt.Errorf("parent: %w", err)
			}
			if parent.VMID != req.VMID || parent.Status != StatusComplete {
				return fmt.Errorf("%w: parent %s is %s and of VM %d, want complete and of VM %d",
					ErrInvalid, parent.ID, parent.Status, parent.VMID, req.VMID)
			}
		}

		hub := req.Hub
		if req.Choose != nil {
			hubs, err := listHubs(ctx, tx)
			if err != nil {
				return err
			}
			if hub, err = req.Choose(hubs); err != nil {
				return err
			}
		}

		running, err := queryPoint(ctx, tx, "vm_id = ? AND status = 'running' ORDER BY started_at DESC LIMIT 1", req.VMID)
		switch {
		case err == nil && running.WorkflowID == req.WorkflowID:
			// Temporal allows one open run per workflow id, so the earlier run is closed:
			// its point is abandoned and this run continues it.
			if _, err := tx.ExecContext(ctx, `UPDATE restore_points SET run_id = ?, site_id = ?, hub_id = ?, mode = ?, parent_id = ?,
				vm_config = ? WHERE id = ?`, req.RunID, req.Site, hub, req.Mode, nullString(req.ParentID), vmConfig, running.ID); err != nil {
				return err
			}
			point, err = queryPoint(ctx, tx, "id = ?", running.ID)
			return err
		case err == nil:
			return &BackupRunningError{VMID: req.VMID, PointID: running.ID, WorkflowID: running.WorkflowID}
		case !errors.Is(err, ErrNotFound):
			return err
		}

		at := now()
		id, err := newPointID(at)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO restore_points
			(id, vm_id, workflow_id, run_id, site_id, hub_id, mode, parent_id, status, started_at, vm_config)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)`,
			id, req.VMID, req.WorkflowID, req.RunID, req.Site, hub, req.Mode, nullString(req.ParentID), at, vmConfig); err != nil {
			return err
		}
		point, err = queryPoint(ctx, tx, "id = ?", id)
		return err
	})
	if err != nil && req.Choose != nil && ctx.Err() != nil && outer.Err() == nil {
		return Point{}, fmt.Errorf("%w: placing the point of workflow %s did not finish within %s: other placements held the hubs' lock or the catalog is slow (%v)",
			ErrPlaceBusy, req.WorkflowID, wait, err)
	}
	if err != nil {
		return Point{}, err
	}
	s.log.InfoContext(outer, "restore point open", "point", point.ID, "vm", point.VMID, "workflow", point.WorkflowID, "mode", point.Mode, "hub", point.Hub)
	return point, nil
}

// GetPoint returns a point with its disks.
func (s *Store) GetPoint(ctx context.Context, id string) (Point, error) {
	p, err := queryPoint(ctx, s.db, "id = ?", id)
	if err != nil {
		return Point{}, fmt.Errorf("get point %s: %w", id, err)
	}
	if err := s.loadDisks(ctx, []*Point{&p}); err != nil {
		return Point{}, err
	}
	return p, nil
}

// RunningPointForVM returns the VM's running point, or ErrNotFound when none runs.
func (s *Store) RunningPointForVM(ctx context.Context, vmID int64) (Point, error) {
	return s.onePoint(ctx, "running point of VM", "vm_id = ? AND status = 'running' ORDER BY started_at DESC LIMIT 1", vmID)
}

// LastCompletePoint returns the VM's newest complete point with its disks (paths, changeIds,
// capacities): the base of the next incremental. ErrNotFound when there is none.
func (s *Store) LastCompletePoint(ctx context.Context, vmID int64) (Point, error) {
	return s.onePoint(ctx, "last complete point of VM", "vm_id = ? AND status = 'complete' ORDER BY started_at DESC, id DESC LIMIT 1", vmID)
}

func (s *Store) onePoint(ctx context.Context, what string, where string, vmID int64) (Point, error) {
	p, err := queryPoint(ctx, s.db, where, vmID)
	if err != nil {
		return Point{}, fmt.Errorf("%s %d: %w", what, vmID, err)
	}
	if err := s.loadDisks(ctx, []*Point{&p}); err != nil {
		return Point{}, err
	}
	return p, nil
}

// ListPoints returns the VM's points with their disks, newest first; status "" lists all.
func (s *Store) ListPoints(ctx context.Context, vmID int64, status string) ([]Point, error) {
	where := "vm_id = ?"
	args := []any{vmID}
	if status != "" {
		where += " AND status = ?"
		args = append(args, status)
	}
	points, err := s.pointsWithDisks(ctx, where+" ORDER BY started_at DESC, id DESC", args...)
	if err != nil {
		return nil, fmt.Errorf("list points of VM %d: %w", vmID, err)
	}
	return points, nil
}

// HubPoints returns every point of a hub by id, without disks: what the hub's reconcile
// needs to tell the point directories in its repository apart.
func (s *Store) HubPoints(ctx context.Context, hub string) (map[string]Point, error) {
	points, err := queryPoints(ctx, s.db, "hub_id = ?", hub)
	if err != nil {
		return nil, fmt.Errorf("list points of hub %s: %w", hub, err)
	}
	out := make(map[string]Point, len(points))
	for _, p := range points {
		out[p.ID] = p
	}
	return out, nil
}

// ChainOf returns the chain a point belongs to, from its full base to the point itself:
// restoring the point needs every qcow2 of the chain.
func (s *Store) ChainOf(ctx context.Context, pointID string) ([]Point, error) {
	var chain []Point
	seen := map[string]bool{}
	for id := pointID; id != ""; {
		if seen[id] {
			return nil, fmt.Errorf("chain of %s: loop at %s", pointID, id)
		}
		seen[id] = true
		p, err := s.GetPoint(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("chain of %s: %w", pointID, err)
		}
		chain = append(chain, p)
		id = p.ParentID
	}
	for i, j := 0, len(chain)-1; i < j; i, j = i+1, j-1 {
		chain[i], chain[j] = chain[j], chain[i]
	}
	return chain, nil
}

// AddPointDisk records a disk target of a running point (path, parent, mode, capacity); a
// retry overwrites the same row.
func (s *Store) AddPointDisk(ctx context.Context, pointID string, d PointDisk) error {
	if d.Path == "" || (d.Mode != ModeFull && d.Mode != ModeIncremental) {
		return fmt.Errorf("%w: point disk %d needs a path and mode full|incremental", ErrInvalid, d.Key)
	}
	return s.inTx(ctx, fmt.Sprintf("add disk %d to point %s", d.Key, pointID), func(tx *sql.Tx) error {
		if err := requireRunning(ctx, tx, pointID); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO point_disks (point_id, disk_key, target_path, parent_path, mode, reason, capacity_bytes)
			VALUES (?, ?, ?, ?, ?, ?, ?)
			ON DUPLICATE KEY UPDATE target_path = VALUES(target_path), parent_path = VALUES(parent_path),
				mode = VALUES(mode), reason = VALUES(reason), capacity_bytes = VALUES(capacity_bytes)`,
			pointID, d.Key, d.Path, d.ParentPath, d.Mode, text.Cut(d.Reason, maxReasonText), d.CapacityBytes)
		return err
	})
}

// UpdatePointDisk records the copy results of a running point's disk (changeId, bytes,
// duration, digest). The disk must have been added.
func (s *Store) UpdatePointDisk(ctx context.Context, pointID string, d PointDisk) error {
	return s.inTx(ctx, fmt.Sprintf("update disk %d of point %s", d.Key, pointID), func(tx *sql.Tx) error {
		if err := requireRunning(ctx, tx, pointID); err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, `UPDATE point_disks SET change_id = ?, bytes_read = ?, bytes_written = ?, bytes_zeroed = ?,
				duration_ns = ?, digest = ?
			WHERE point_id = ? AND disk_key = ?`,
			d.ChangeID, d.BytesRead, d.BytesWritten, d.BytesZeroed, int64(d.Duration), d.Digest, pointID, d.Key)
		if err != nil {
			return err
		}
		return requireMatched(ctx, tx, res, pointID, d.Key)
	})
}

// requireMatched turns "no row updated" into ErrNotFound, telling it apart from an update
// that changed nothing because the values were already there.
func requireMatched(ctx context.Context, tx *sql.Tx, res sql.Result, pointID string, key int32) error {
	if n, err := res.RowsAffected(); err != nil || n > 0 {
		return err
	}
	var one int
	err := tx.QueryRowContext(ctx, "SELECT 1 FROM point_disks WHERE point_id = ? AND disk_key = ?", pointID, key).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("disk %d of point %s: %w", key, pointID, ErrNotFound)
	}
	return err
}

// CompletePoint records every disk's final state and marks the point complete; only now is
// it usable. Every disk added to the point must be among disks. Completing a complete point
// again is a no-op apart from rewriting the same values; a failed point stays failed.
func (s *Store) CompletePoint(ctx context.Context, pointID string, disks []PointDisk) (Point, error) {
	if len(disks) == 0 {
		return Point{}, fmt.Errorf("%w: complete point %s without disks", ErrInvalid, pointID)
	}
	given := map[int32]bool{}
	var read, written int64
	incremental := false
	for _, d := range disks {
		incremental = incremental || d.Mode == ModeIncremental
		if d.Path == "" || (d.Mode != ModeFull && d.Mode != ModeIncremental) || given[d.Key] {
			return Point{}, fmt.Errorf("%w: disk %d needs a path, mode full|incremental, and appears once", ErrInvalid, d.Key)
		}
		given[d.Key] = true
		read += d.BytesRead
		written += d.BytesWritten
	}
	err := s.inTx(ctx, "complete point "+pointID, func(tx *sql.Tx) error {
		status, err := lockPoint(ctx, tx, pointID)
		if err != nil {
			return err
		}
		if status == StatusFailed {
			return fmt.Errorf("point %s: %w", pointID, ErrPointFailed)
		}
		rows, err := tx.QueryContext(ctx, "SELECT disk_key FROM point_disks WHERE point_id = ?", pointID)
		if err != nil {
			return err
		}
		var missing []int32
		for rows.Next() {
			var key int32
			if err := rows.Scan(&key); err != nil {
				rows.Close()
				return err
			}
			if !given[key] {
				missing = append(missing, key)
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return err
		}
		if len(missing) > 0 {
			return fmt.Errorf("%w: point %s has disks %v without a result", ErrInvalid, pointID, missing)
		}
		for _, d := range disks {
			if _, err := tx.ExecContext(ctx, `INSERT INTO point_disks (point_id, disk_key, target_path, parent_path, mode, reason, change_id,
					capacity_bytes, bytes_read, bytes_written, bytes_zeroed, allocated_bytes, duration_ns, digest)
				VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
				ON DUPLICATE KEY UPDATE target_path = VALUES(target_path), parent_path = VALUES(parent_path), mode = VALUES(mode),
					reason = VALUES(reason), change_id = VALUES(change_id), capacity_bytes = VALUES(capacity_bytes),
					bytes_read = VALUES(bytes_read), bytes_written = VALUES(bytes_written), bytes_zeroed = VALUES(bytes_zeroed),
					allocated_bytes = VALUES(allocated_bytes), duration_ns = VALUES(duration_ns), digest = VALUES(digest)`,
				pointID, d.Key, d.Path, d.ParentPath, d.Mode, text.Cut(d.Reason, maxReasonText), d.ChangeID, d.CapacityBytes,
				d.BytesRead, d.BytesWritten, d.BytesZeroed, d.AllocatedBytes, int64(d.Duration), d.Digest); err != nil {
				return fmt.Errorf("disk %d: %w", d.Key, err)
			}
		}
		if !incremental {
			// Every disk was copied in full after all (vCenter refused a changeId): the point
			// depends on no other.
			if _, err := tx.ExecContext(ctx, "UPDATE restore_points SET mode = 'full', parent_id = NULL WHERE id = ?", pointID); err != nil {
				return err
			}
		}
		// A retry keeps the first finish time.
		if _, err = tx.ExecContext(ctx, `UPDATE restore_points SET status = 'complete', error = NULL,
				finished_at = COALESCE(finished_at, ?), bytes_read = ?, bytes_written = ?
			WHERE id = ?`, now(), read, written, pointID); err != nil {
			return err
		}
		if incremental {
			return nil
		}
		// A full point opened after the VM was marked for a full backup is that backup; one
		// opened before the mark was planned without it.
		_, err = tx.ExecContext(ctx, `UPDATE vms v JOIN restore_points p ON p.vm_id = v.id
			SET v.next_full_reason = NULL, v.next_full_since = NULL, v.restore_workflow_id = NULL
			WHERE p.id = ? AND v.next_full_since IS NOT NULL AND v.next_full_since < p.started_at`, pointID)
		return err
	})
	if err != nil {
		return Point{}, err
	}
	s.log.InfoContext(ctx, "restore point complete", "point", pointID, "disks", len(disks), "bytesWritten", written)
	return s.GetPoint(ctx, pointID)
}

// FailPoint marks a running point failed with the error. Failing a failed point keeps its
// first error; a complete point is never turned failed (ErrPointComplete).
func (s *Store) FailPoint(ctx context.Context, pointID, errText string) error {
	errText = text.Cut(errText, maxErrorText)
	err := s.inTx(ctx, "fail point "+pointID, func(tx *sql.Tx) error {
		status, err := lockPoint(ctx, tx, pointID)
		if err != nil {
			return err
		}
		switch status {
		case StatusComplete:
			return fmt.Errorf("point %s: %w", pointID, ErrPointComplete)
		case StatusFailed:
			return nil
		}
		_, err = tx.ExecContext(ctx, "UPDATE restore_points SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
			errText, now(), pointID)
		return err
	})
	if err != nil {
		return err
	}
	s.log.InfoContext(ctx, "restore point failed", "point", pointID, "error", errText)
	return nil
}

// lockPoint locks a point's row for the transaction and returns its status.
func lockPoint(ctx context.Context, tx *sql.Tx, pointID string) (string, error) {
	var status string
	err := tx.QueryRowContext(ctx, "SELECT status FROM restore_points WHERE id = ? FOR UPDATE", pointID).Scan(&status)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("point %s: %w", pointID, ErrNotFound)
	}
	return status, err
}

func requireRunning(ctx context.Context, tx *sql.Tx, pointID string) error {
	status, err := lockPoint(ctx, tx, pointID)
	if err != nil {
		return err
	}
	switch status {
	case StatusComplete:
		return fmt.Errorf("point %s: %w", pointID, ErrPointComplete)
	case StatusFailed:
		return fmt.Errorf("point %s: %w", pointID, ErrPointFailed)
	}
	return nil
}

// querier is what *sql.DB and *sql.Tx share.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

const pointColumns = `id, vm_id, workflow_id, run_id, site_id, hub_id, mode, COALESCE(parent_id, ''), status,
	COALESCE(error, ''), started_at, finished_at, bytes_read, bytes_written, vm_config`

func scanPoint(scan func(dest ...any) error) (Point, error) {
	var p Point
	var finished sql.NullTime
	var vmConfig sql.NullString
	if err := scan(&p.ID, &p.VMID, &p.WorkflowID, &p.RunID, &p.Site, &p.Hub, &p.Mode, &p.ParentID, &p.Status,
		&p.Error, &p.StartedAt, &finished, &p.BytesRead, &p.BytesWritten, &vmConfig); err != nil {
		return Point{}, err
	}
	p.FinishedAt = finished.Time
	var err error
	if p.VMConfig, err = decodeVMConfig(vmConfig); err != nil {
		return Point{}, fmt.Errorf("point %s: %w", p.ID, err)
	}
	return p, nil
}

// queryPoint returns the first point matching where, without disks.
func queryPoint(ctx context.Context, q querier, where string, args ...any) (Point, error) {
	p, err := scanPoint(q.QueryRowContext(ctx, "SELECT "+pointColumns+" FROM restore_points WHERE "+where, args...).Scan)
	if errors.Is(err, sql.ErrNoRows) {
		return Point{}, ErrNotFound
	}
	return p, err
}

// pointsWithDisks returns the points matching where, each with its disks.
func (s *Store) pointsWithDisks(ctx context.Context, where string, args ...any) ([]Point, error) {
	points, err := queryPoints(ctx, s.db, where, args...)
	if err != nil {
		return nil, err
	}
	ptrs := make([]*Point, len(points))
	for i := range points {
		ptrs[i] = &points[i]
	}
	if err := s.loadDisks(ctx, ptrs); err != nil {
		return nil, err
	}
	return points, nil
}

func queryPoints(ctx context.Context, q querier, where string, args ...any) ([]Point, error) {
	rows, err := q.QueryContext(ctx, "SELECT "+pointColumns+" FROM restore_points WHERE "+where, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var points []Point
	for rows.Next() {
		p, err := scanPoint(rows.Scan)
		if err != nil {
			return nil, err
		}
		points = append(points, p)
	}
	return points, rows.Err()
}

// loadDisksChunk is how many points' disks one query reads: a catalog holds more points
// than a statement takes placeholders (65535).
const loadDisksChunk = 1000

// loadDisks fills in the disks of points, one query per loadDisksChunk points.
func (s *Store) loadDisks(ctx context.Context, points []*Point) error {
	if len(points) == 0 {
		return nil
	}
	if len(points) > loadDisksChunk {
		for chunk := range slices.Chunk(points, loadDisksChunk) {
			if err := s.loadDisks(ctx, chunk); err != nil {
				return err
			}
		}
		return nil
	}
	byID := make(map[string]*Point, len(points))
	ids := make([]any, 0, len(points))
	for _, p := range points {
		byID[p.ID] = p
		ids = append(ids, p.ID)
	}
	rows, err := s.db.QueryContext(ctx, `SELECT point_id, disk_key, target_path, parent_path, mode, reason, change_id, capacity_bytes,
			bytes_read, bytes_written, bytes_zeroed, allocated_bytes, duration_ns, digest
		FROM point_disks WHERE point_id IN (?`+strings.Repeat(",?", len(ids)-1)+`) ORDER BY point_id, disk_key`, ids...)
	if err != nil {
		return fmt.Errorf("read point disks: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var pointID string
		var d PointDisk
		var durationNS int64
		if err := rows.Scan(&pointID, &d.Key, &d.Path, &d.ParentPath, &d.Mode, &d.Reason, &d.ChangeID, &d.CapacityBytes,
			&d.BytesRead, &d.BytesWritten, &d.BytesZeroed, &d.AllocatedBytes, &durationNS, &d.Digest); err != nil {
			return fmt.Errorf("read point disks: %w", err)
		}
		d.Duration = time.Duration(durationNS)
		p := byID[pointID]
		p.Disks = append(p.Disks, d)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read point disks: %w", err)
	}
	return nil
}

func nullString(s string) sql.NullString { return sql.NullString{String: s, Valid: s != ""} }
