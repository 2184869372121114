package catalog

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/diskferry/diskferry/internal/text"
)

// VM is a virtual machine, identified by its vCenter's instance UUID and its moref there.
type VM struct {
	ID           int64
	InstanceUUID string
	Moref        string
	Name         string
	UpdatedAt    time.Time
	// NextFullReason, when set, makes the VM's next backup full with this reason (its disks
	// were overwritten by an in-place restore); a full point opened after NextFullSince
	// clears it when it completes.
	NextFullReason string
	NextFullSince  time.Time
	// RestoreWorkflowID is the in-place restore that set the mark; while it is open no
	// backup of the VM starts.
	RestoreWorkflowID string
}

// Disk is one current virtual disk of a VM.
type Disk struct {
	Key           int32
	Label         string
	CapacityBytes int64
	BackingFile   string
}

// UpsertVM records a VM as just inspected, with its current disks: the name follows a rename,
// disks no longer attached are dropped (restore points keep their own disk rows).
func (s *Store) UpsertVM(ctx context.Context, vm VM, disks []Disk) (VM, error) {
	if vm.InstanceUUID == "" || vm.Moref == "" || len(vm.InstanceUUID) > 64 || len(vm.Moref) > 64 || len(vm.Name) > 255 {
		return VM{}, fmt.Errorf("%w: VM needs an instance UUID and moref (at most 64 characters) and a name of at most 255", ErrInvalid)
	}
	at := now()
	err := s.inTx(ctx, "upsert VM "+vm.Moref, func(tx *sql.Tx) error {
		// LAST_INSERT_ID(id) makes the existing row's id come back on update too.
		res, err := tx.ExecContext(ctx, `INSERT INTO vms (instance_uuid, moref, name, created_at, updated_at)
			VALUES (?, ?, ?, ?, ?)
			ON DUPLICATE KEY UPDATE id = LAST_INSERT_ID(id), name = VALUES(name), updated_at = VALUES(updated_at)`,
			vm.InstanceUUID, vm.Moref, vm.Name, at, at)
		if err != nil {
			return err
		}
		if vm.ID, err = res.LastInsertId(); err != nil {
			return err
		}
		keys := make([]any, 0, len(disks)+1)
		keys = append(keys, vm.ID)
		for _, d := range disks {
			if d.CapacityBytes < 0 {
				return fmt.Errorf("%w: disk %d capacity %d", ErrInvalid, d.Key, d.CapacityBytes)
			}
			if _, err := tx.ExecContext(ctx, `INSERT INTO disks (vm_id, disk_key, label, capacity_bytes, backing_file, updated_at)
				VALUES (?, ?, ?, ?, ?, ?)
				ON DUPLICATE KEY UPDATE label = VALUES(label), capacity_bytes = VALUES(capacity_bytes),
					backing_file = VALUES(backing_file), updated_at = VALUES(updated_at)`,
				vm.ID, d.Key, d.Label, d.CapacityBytes, d.BackingFile, at); err != nil {
				return fmt.Errorf("disk %d: %w", d.Key, err)
			}
			keys = append(keys, d.Key)
		}
		query := "DELETE FROM disks WHERE vm_id = ?"
		if len(disks) > 0 {
			query += " AND disk_key NOT IN (?" + strings.Repeat(",?", len(disks)-1) + ")"
		}
		_, err = tx.ExecContext(ctx, query, keys...)
		return err
	})
	if err != nil {
		return VM{}, err
	}
	vm.UpdatedAt = at
	return vm, nil
}

// GetVM returns a VM by its catalog id.
func (s *Store) GetVM(ctx context.Context, id int64) (VM, error) {
	return s.scanVM(ctx, "id = ?", id)
}

// FindVM returns a VM by vCenter instance UUID and moref.
func (s *Store) FindVM(ctx context.Context, instanceUUID, moref string) (VM, error) {
	return s.scanVM(ctx, "instance_uuid = ? AND moref = ?", instanceUUID, moref)
}

const vmColumns = "id, instance_uuid, moref, name, updated_at, COALESCE(next_full_reason, ''), next_full_since, COALESCE(restore_workflow_id, '')"

func scanVMRow(scan func(dest ...any) error) (VM, error) {
	var vm VM
	var since sql.NullTime
	if err := scan(&vm.ID, &vm.InstanceUUID, &vm.Moref, &vm.Name, &vm.UpdatedAt, &vm.NextFullReason, &since, &vm.RestoreWorkflowID); err != nil {
		return VM{}, err
	}
	vm.NextFullSince = since.Time
	return vm, nil
}

func (s *Store) scanVM(ctx context.Context, where string, args ...any) (VM, error) {
	vm, err := scanVMRow(s.db.QueryRowContext(ctx, "SELECT "+vmColumns+" FROM vms WHERE "+where, args...).Scan)
	if errors.Is(err, sql.ErrNoRows) {
		return VM{}, fmt.Errorf("VM %v: %w", args, ErrNotFound)
	}
	if err != nil {
		return VM{}, fmt.Errorf("read VM %v: %w", args, err)
	}
	return vm, nil
}

// FindVMs returns the VMs named name or with moref name, by id: a name may be shared by
// VMs of one vCenter, a moref by VMs of different vCenters.
func (s *Store) FindVMs(ctx context.Context, name string) ([]VM, error) {
	rows, err := s.db.QueryContext(ctx, "SELECT "+vmColumns+" FROM vms WHERE name = ? OR moref = ? ORDER BY id", name, name)
	if err != nil {
		return nil, fmt.Errorf("find VMs %q: %w", name, err)
	}
	defer rows.Close()
	var vms []VM
	for rows.Next() {
		vm, err := scanVMRow(rows.Scan)
		if err != nil {
			return nil, fmt.Errorf("find VMs %q: %w", name, err)
		}
		vms = append(vms, vm)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("find VMs %q: %w", name, err)
	}
	return vms, nil
}

// RestoreRunningError says the VM is marked by an in-place restore workflow other than the
// one the caller found closed.
type RestoreRunningError struct {
	VMID       int64
	WorkflowID string
}

func (e *RestoreRunningError) Error() string {
	return fmt.Sprintf("VM %d: in-place restore workflow %s marked it", e.VMID, e.WorkflowID)
}

// Is makes errors.Is(err, ErrRestoreRunning) hold.
func (e *RestoreRunningError) Is(target error) bool { return target == ErrRestoreRunning }

// MarkNextFull records, for the in-place restore workflowID, that the VM's next backup must
// be full, with the reason; marking again replaces the reason and the workflow and restarts
// the mark, so only a point opened after the latest mark clears it. A running point of the
// VM gives a *BackupRunningError and nothing is marked: under the VM's row lock, as in
// OpenPoint, so a backup and an in-place restore of one VM never both start.
func (s *Store) MarkNextFull(ctx context.Context, instanceUUID, moref, reason, workflowID string) error {
	if reason == "" {
		return fmt.Errorf("%w: empty reason for the next full backup of VM %s", ErrInvalid, moref)
	}
	if err := checkWorkflowID(workflowID); err != nil {
		return err
	}
	return s.inTx(ctx, "mark next backup of VM "+moref+" full", func(tx *sql.Tx) error {
		var vmID int64
		err := tx.QueryRowContext(ctx, "SELECT id FROM vms WHERE instance_uuid = ? AND moref = ? FOR UPDATE", instanceUUID, moref).Scan(&vmID)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("VM %s of vCenter %s: %w", moref, instanceUUID, ErrNotFound)
		}
		if err != nil {
			return err
		}
		running, err := queryPoint(ctx, tx, "vm_id = ? AND status = 'running' ORDER BY started_at DESC LIMIT 1", vmID)
		if err == nil {
			return &BackupRunningError{VMID: vmID, PointID: running.ID, WorkflowID: running.WorkflowID}
		}
		if !errors.Is(err, ErrNotFound) {
			return err
		}
		_, err = tx.ExecContext(ctx, "UPDATE vms SET next_full_reason = ?, next_full_since = ?, restore_workflow_id = ? WHERE id = ?",
			text.Cut(reason, maxReasonText), now(), workflowID, vmID)
		return err
	})
}

// Disks returns the VM's current disks by key.
func (s *Store) Disks(ctx context.Context, vmID int64) ([]Disk, error) {
	rows, err := s.db.QueryContext(ctx, "SELECT disk_key, label, capacity_bytes, backing_file FROM disks WHERE vm_id = ? ORDER BY disk_key", vmID)
	if err != nil {
		return nil, fmt.Errorf("read disks of VM %d: %w", vmID, err)
	}
	defer rows.Close()
	var disks []Disk
	for rows.Next() {
		var d Disk
		if err := rows.Scan(&d.Key, &d.Label, &d.CapacityBytes, &d.BackingFile); err != nil {
			return nil, fmt.Errorf("read disks of VM %d: %w", vmID, err)
		}
		disks = append(disks, d)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read disks of VM %d: %w", vmID, err)
	}
	return disks, nil
}
