package catalog

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/diskferry/diskferry/internal/chain"
)

// StatusDeleting marks a point retention removes: never restorable again, its disk rows name
// the files still to be removed.
const StatusDeleting = "deleting"

// ChainPoints lists the VM's complete and deleting points with their disks, oldest first:
// the chain engine's view of the VM.
func (s *Store) ChainPoints(ctx context.Context, vmID int64) ([]Point, error) {
	points, err := s.pointsWithDisks(ctx, "vm_id = ? AND status IN ('complete', 'deleting') ORDER BY started_at, id", vmID)
	if err != nil {
		return nil, fmt.Errorf("chain points of VM %d: %w", vmID, err)
	}
	return points, nil
}

// MarkDeleting marks complete points of the VM deleting. Deleting and absent points are
// skipped (a retry); a running or failed point, or one of another VM, is refused, and so is
// a point a running backup builds on.
func (s *Store) MarkDeleting(ctx context.Context, vmID int64, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	return s.inTx(ctx, fmt.Sprintf("mark points of VM %d deleting", vmID), func(tx *sql.Tx) error {
		// The VM row lock orders this against OpenPoint of the same VM.
		var id int64
		if err := tx.QueryRowContext(ctx, "SELECT id FROM vms WHERE id = ? FOR UPDATE", vmID).Scan(&id); err != nil {
			if errors.Is(err, sql.ErrNoRows) {
				return fmt.Errorf("VM %d: %w", vmID, ErrNotFound)
			}
			return err
		}
		running, err := queryPoint(ctx, tx, "vm_id = ? AND status = 'running' ORDER BY started_at DESC LIMIT 1", vmID)
		switch {
		case err == nil && slices.Contains(ids, running.ParentID):
			return &BackupRunningError{VMID: vmID, PointID: running.ID, WorkflowID: running.WorkflowID}
		case err != nil && !errors.Is(err, ErrNotFound):
			return err
		}
		for _, pid := range ids {
			p, err := queryPoint(ctx, tx, "id = ? FOR UPDATE", pid)
			if errors.Is(err, ErrNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			if p.VMID != vmID {
				return fmt.Errorf("%w: point %s is of VM %d, not %d", ErrInvalid, pid, p.VMID, vmID)
			}
			switch p.Status {
			case StatusDeleting:
				continue
			case StatusComplete:
			default:
				return fmt.Errorf("%w: point %s is %s, only a complete point can be deleted", ErrInvalid, pid, p.Status)
			}
			if _, err := tx.ExecContext(ctx, "UPDATE restore_points SET status = 'deleting' WHERE id = ?", pid); err != nil {
				return err
			}
		}
		return nil
	})
}

// lockSurgery locks a point's row for a change of its disks: it must be of the VM and
// complete or deleting (a running point is never touched).
func lockSurgery(ctx context.Context, tx *sql.Tx, vmID int64, pointID string) (Point, error) {
	p, err := queryPoint(ctx, tx, "id = ? FOR UPDATE", pointID)
	if err != nil {
		return Point{}, fmt.Errorf("point %s: %w", pointID, err)
	}
	if p.VMID != vmID {
		return Point{}, fmt.Errorf("%w: point %s is of VM %d, not %d", ErrInvalid, pointID, p.VMID, vmID)
	}
	if p.Status != StatusComplete && p.Status != StatusDeleting {
		return Point{}, fmt.Errorf("%w: point %s is %s", ErrInvalid, pointID, p.Status)
	}
	return p, nil
}

// lockDeleting locks a deleting point of the VM for surgery; found is false, without an
// error, when the point is gone (a repeated removal), and any other status is ErrInvalid.
func lockDeleting(ctx context.Context, tx *sql.Tx, vmID int64, pointID string) (found bool, err error) {
	p, err := lockSurgery(ctx, tx, vmID, pointID)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if p.Status != StatusDeleting {
		return false, fmt.Errorf("%w: point %s is %s, not deleting", ErrInvalid, pointID, p.Status)
	}
	return true, nil
}

// RepointDisks sets the file and backing file of disks of the VM's complete or deleting
// points, all in one transaction, and then each touched point's mode and parent from its
// disks: full when every disk stands alone, else the point holding a disk's backing file.
func (s *Store) RepointDisks(ctx context.Context, vmID int64, changes []chain.DiskChange) error {
	if len(changes) == 0 {
		return nil
	}
	return s.inTx(ctx, fmt.Sprintf("repoint disks of VM %d", vmID), func(tx *sql.Tx) error {
		var touched []string
		for _, c := range changes {
			if !slices.Contains(touched, c.PointID) {
				touched = append(touched, c.PointID)
			}
		}
		// One lock order for every caller: by point id.
		slices.Sort(touched)
		for _, id := range touched {
			if _, err := lockSurgery(ctx, tx, vmID, id); err != nil {
				return err
			}
		}
		for _, c := range changes {
			if c.Path == "" {
				return fmt.Errorf("%w: disk %d of point %s: empty path", ErrInvalid, c.Key, c.PointID)
			}
			mode := ModeIncremental
			if c.ParentPath == "" {
				mode = ModeFull
			}
			res, err := tx.ExecContext(ctx, "UPDATE point_disks SET target_path = ?, parent_path = ?, mode = ? WHERE point_id = ? AND disk_key = ?",
				c.Path, c.ParentPath, mode, c.PointID, c.Key)
			if err != nil {
				return err
			}
			if err := requireMatched(ctx, tx, res, c.PointID, c.Key); err != nil {
				return err
			}
		}
		for _, id := range touched {
			if err := deriveParent(ctx, tx, vmID, id); err != nil {
				return err
			}
		}
		return nil
	})
}

// deriveParent sets a point's mode and parent from its disks' backing files.
func deriveParent(ctx context.Context, tx *sql.Tx, vmID int64, pointID string) error {
	var parentPath string
	err := tx.QueryRowContext(ctx, "SELECT parent_path FROM point_disks WHERE point_id = ? AND parent_path <> '' ORDER BY disk_key LIMIT 1",
		pointID).Scan(&parentPath)
	if errors.Is(err, sql.ErrNoRows) {
		_, err = tx.ExecContext(ctx, "UPDATE restore_points SET mode = 'full', parent_id = NULL WHERE id = ?", pointID)
		return err
	}
	if err != nil {
		return err
	}
	var parentID string
	err = tx.QueryRowContext(ctx, `SELECT d.point_id FROM point_disks d JOIN restore_points p ON p.id = d.point_id
		WHERE p.vm_id = ? AND d.target_path = ? AND d.point_id <> ? LIMIT 1`, vmID, parentPath, pointID).Scan(&parentID)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("%w: point %s backs onto %s, which no point of VM %d holds", ErrInvalid, pointID, parentPath, vmID)
	}
	if err != nil {
		return err
	}
	_, err = tx.ExecContext(ctx, "UPDATE restore_points SET mode = 'incremental', parent_id = ? WHERE id = ?", parentID, pointID)
	return err
}

// RemovePointDisk forgets a disk of a deleting point (its file is gone); an absent disk or
// point counts as removed.
func (s *Store) RemovePointDisk(ctx context.Context, vmID int64, pointID string, key int32) error {
	return s.inTx(ctx, fmt.Sprintf("remove disk %d of point %s", key, pointID), func(tx *sql.Tx) error {
		if found, err := lockDeleting(ctx, tx, vmID, pointID); !found || err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "DELETE FROM point_disks WHERE point_id = ? AND disk_key = ?", pointID, key)
		return err
	})
}

// RemoveDeletedPoint forgets a deleting point whose disks are all gone; the points built on
// it take its parent. An absent point counts as removed.
func (s *Store) RemoveDeletedPoint(ctx context.Context, vmID int64, pointID string) error {
	err := s.inTx(ctx, "remove point "+pointID, func(tx *sql.Tx) error {
		if found, err := lockDeleting(ctx, tx, vmID, pointID); !found || err != nil {
			return err
		}
		keys, err := queryStrings(ctx, tx, "SELECT disk_key FROM point_disks WHERE point_id = ?", pointID)
		if err != nil {
			return err
		}
		if len(keys) > 0 {
			return fmt.Errorf("%w: point %s still has disks %s", ErrInvalid, pointID, strings.Join(keys, ", "))
		}
		// Its children's disks no longer back onto its files (it has none), so each child's
		// parent follows from its own disks once the row is gone.
		// A failed child keeps no parent: its files are the reconcile's to remove.
		children, err := queryStrings(ctx, tx, "SELECT id FROM restore_points WHERE parent_id = ? AND status IN ('complete', 'deleting') FOR UPDATE", pointID)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "UPDATE restore_points SET parent_id = NULL WHERE parent_id = ?", pointID); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "DELETE FROM restore_points WHERE id = ?", pointID); err != nil {
			return err
		}
		for _, id := range children {
			if err := deriveParent(ctx, tx, vmID, id); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	s.log.InfoContext(ctx, "restore point removed", "point", pointID, "vm", vmID)
	return nil
}

// ChainCatalog is the chain engine's catalog for one VM.
func (s *Store) ChainCatalog(vmID int64) chain.Catalog { return chainCatalog{s: s, vmID: vmID} }

type chainCatalog struct {
	s    *Store
	vmID int64
}

func (c chainCatalog) Points(ctx context.Context) ([]chain.Point, error) {
	points, err := c.s.ChainPoints(ctx, c.vmID)
	if err != nil {
		return nil, err
	}
	out := make([]chain.Point, 0, len(points))
	for _, p := range points {
		cp := chain.Point{ID: p.ID, Deleting: p.Status == StatusDeleting}
		for _, d := range p.Disks {
			cp.Disks = append(cp.Disks, chain.Disk{Key: d.Key, Path: d.Path, ParentPath: d.ParentPath})
		}
		out = append(out, cp)
	}
	return out, nil
}

func (c chainCatalog) MarkDeleting(ctx context.Context, ids []string) error {
	return c.s.MarkDeleting(ctx, c.vmID, ids)
}

func (c chainCatalog) Repoint(ctx context.Context, changes []chain.DiskChange) error {
	return c.s.RepointDisks(ctx, c.vmID, changes)
}

func (c chainCatalog) RemoveDisk(ctx context.Context, pointID string, key int32) error {
	return c.s.RemovePointDisk(ctx, c.vmID, pointID, key)
}

func (c chainCatalog) RemovePoint(ctx context.Context, pointID string) error {
	return c.s.RemoveDeletedPoint(ctx, c.vmID, pointID)
}

// SetAllocatedBytes records what a point disk's file takes on the hub now: retention's
// merges and flattens change it after the backup measured it.
func (s *Store) SetAllocatedBytes(ctx context.Context, pointID string, key int32, bytes int64) error {
	return s.inTx(ctx, "set allocated bytes", func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "UPDATE point_disks SET allocated_bytes = ? WHERE point_id = ? AND disk_key = ?", bytes, pointID, key)
		return err
	})
}

// queryStrings returns the first column of every row of a query.
func queryStrings(ctx context.Context, tx *sql.Tx, query string, args ...any) ([]string, error) {
	rows, err := tx.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var v string
		if err := rows.Scan(&v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}
