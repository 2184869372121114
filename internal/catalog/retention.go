package catalog

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/diskferry/diskferry/internal/retention"
)

// Policy sources, as ResolvePolicy reports them.
const (
	PolicyFromVM       = "vm"
	PolicyFromSchedule = "schedule" // followed by the schedule ID
	PolicyNone         = "none"
)

// maxScheduleID is the size of schedule_retention.schedule_id.
const maxScheduleID = 255

// SetVMPolicy sets a VM's own retention policy, replacing the one it had; all zero counts
// keep everything whatever a schedule's default says.
func (s *Store) SetVMPolicy(ctx context.Context, vmID int64, p retention.Policy) error {
	if err := p.Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO vm_retention (vm_id, keep_last, daily, weekly, monthly, yearly, max_chain, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?)
		ON DUPLICATE KEY UPDATE keep_last = VALUES(keep_last), daily = VALUES(daily), weekly = VALUES(weekly),
			monthly = VALUES(monthly), yearly = VALUES(yearly), max_chain = VALUES(max_chain), updated_at = VALUES(updated_at)`,
		vmID, p.KeepLast, p.Daily, p.Weekly, p.Monthly, p.Yearly, p.MaxChain, now())
	if isMySQLError(err, errNoReferencedRow) {
		return fmt.Errorf("set retention policy of VM %d: %w", vmID, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("set retention policy of VM %d: %w", vmID, err)
	}
	return nil
}

// SetSchedulePolicy sets the default policy of a backup schedule's VMs.
func (s *Store) SetSchedulePolicy(ctx context.Context, scheduleID string, p retention.Policy) error {
	if scheduleID == "" || len(scheduleID) > maxScheduleID {
		return fmt.Errorf("%w: schedule id %q must be 1-%d bytes", ErrInvalid, scheduleID, maxScheduleID)
	}
	if err := p.Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO schedule_retention (schedule_id, keep_last, daily, weekly, monthly, yearly, max_chain, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?)
		ON DUPLICATE KEY UPDATE keep_last = VALUES(keep_last), daily = VALUES(daily), weekly = VALUES(weekly),
			monthly = VALUES(monthly), yearly = VALUES(yearly), max_chain = VALUES(max_chain), updated_at = VALUES(updated_at)`,
		scheduleID, p.KeepLast, p.Daily, p.Weekly, p.Monthly, p.Yearly, p.MaxChain, now())
	if err != nil {
		return fmt.Errorf("set retention policy of schedule %s: %w", scheduleID, err)
	}
	return nil
}

// VMPolicy returns a VM's own policy; ErrNotFound when it has none.
func (s *Store) VMPolicy(ctx context.Context, vmID int64) (retention.Policy, error) {
	p, _, err := scanPolicy(s.db.QueryRowContext(ctx, "SELECT "+policyColumns+" FROM vm_retention WHERE vm_id = ?", vmID).Scan)
	if err != nil {
		return retention.Policy{}, fmt.Errorf("retention policy of VM %d: %w", vmID, err)
	}
	return p, nil
}

// SchedulePolicy returns a schedule's default policy; ErrNotFound when it has none.
func (s *Store) SchedulePolicy(ctx context.Context, scheduleID string) (retention.Policy, error) {
	p, _, err := scanPolicy(s.db.QueryRowContext(ctx, "SELECT "+policyColumns+" FROM schedule_retention WHERE schedule_id = ?", scheduleID).Scan)
	if err != nil {
		return retention.Policy{}, fmt.Errorf("retention policy of schedule %s: %w", scheduleID, err)
	}
	return p, nil
}

// ResolvePolicy returns the policy that applies to a VM backed up by the schedule (empty:
// none) and where it comes from: the VM's own wins, else the schedule's default, else none
// (a zero policy: keep everything). Source is PolicyFromVM, "schedule <id>" or PolicyNone.
func (s *Store) ResolvePolicy(ctx context.Context, vmID int64, scheduleID string) (retention.Policy, string, error) {
	p, err := s.VMPolicy(ctx, vmID)
	if err == nil {
		return p, PolicyFromVM, nil
	}
	if !errors.Is(err, ErrNotFound) {
		return retention.Policy{}, "", err
	}
	if scheduleID != "" {
		p, err := s.SchedulePolicy(ctx, scheduleID)
		if err == nil {
			return p, PolicyFromSchedule + " " + scheduleID, nil
		}
		if !errors.Is(err, ErrNotFound) {
			return retention.Policy{}, "", err
		}
	}
	return retention.Policy{}, PolicyNone, nil
}

// PolicyEntry is a stored policy with what it applies to, for listings.
type PolicyEntry struct {
	VM         *VM    // the VM of a VM's own policy
	ScheduleID string // the schedule of a default policy
	Policy     retention.Policy
	UpdatedAt  time.Time
}

// ListPolicies returns the stored policies: VMs' own (by VM name, those of the VMs named or
// with moref vm when vm is set) and, when vm is empty, the schedules' defaults by ID.
func (s *Store) ListPolicies(ctx context.Context, vm string) ([]PolicyEntry, error) {
	where, args := "TRUE", []any{}
	if vm != "" {
		where, args = "v.name = ? OR v.moref = ?", []any{vm, vm}
	}
	rows, err := s.db.QueryContext(ctx, `SELECT r.keep_last, r.daily, r.weekly, r.monthly, r.yearly, r.max_chain, r.updated_at,
			v.id, v.instance_uuid, v.moref, v.name, v.updated_at, COALESCE(v.next_full_reason, ''), v.next_full_since
		FROM vm_retention r JOIN vms v ON v.id = r.vm_id WHERE `+where+" ORDER BY v.name, v.id", args...)
	if err != nil {
		return nil, fmt.Errorf("list retention policies: %w", err)
	}
	defer rows.Close()
	var out []PolicyEntry
	for rows.Next() {
		var e PolicyEntry
		var vmRow VM
		var since sql.NullTime
		if err := rows.Scan(&e.Policy.KeepLast, &e.Policy.Daily, &e.Policy.Weekly, &e.Policy.Monthly, &e.Policy.Yearly,
			&e.Policy.MaxChain, &e.UpdatedAt, &vmRow.ID, &vmRow.InstanceUUID, &vmRow.Moref, &vmRow.Name, &vmRow.UpdatedAt,
			&vmRow.NextFullReason, &since); err != nil {
			return nil, fmt.Errorf("list retention policies: %w", err)
		}
		vmRow.NextFullSince = since.Time
		e.VM = &vmRow
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list retention policies: %w", err)
	}
	if vm != "" {
		return out, nil
	}
	srows, err := s.db.QueryContext(ctx, "SELECT "+policyColumns+", schedule_id FROM schedule_retention ORDER BY schedule_id")
	if err != nil {
		return nil, fmt.Errorf("list retention policies: %w", err)
	}
	defer srows.Close()
	for srows.Next() {
		var e PolicyEntry
		if err := srows.Scan(&e.Policy.KeepLast, &e.Policy.Daily, &e.Policy.Weekly, &e.Policy.Monthly, &e.Policy.Yearly,
			&e.Policy.MaxChain, &e.UpdatedAt, &e.ScheduleID); err != nil {
			return nil, fmt.Errorf("list retention policies: %w", err)
		}
		out = append(out, e)
	}
	if err := srows.Err(); err != nil {
		return nil, fmt.Errorf("list retention policies: %w", err)
	}
	return out, nil
}

const policyColumns = "keep_last, daily, weekly, monthly, yearly, max_chain, updated_at"

func scanPolicy(scan func(dest ...any) error) (retention.Policy, time.Time, error) {
	var p retention.Policy
	var at time.Time
	err := scan(&p.KeepLast, &p.Daily, &p.Weekly, &p.Monthly, &p.Yearly, &p.MaxChain, &at)
	if errors.Is(err, sql.ErrNoRows) {
		return retention.Policy{}, time.Time{}, ErrNotFound
	}
	return p, at, err
}
