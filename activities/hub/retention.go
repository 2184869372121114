package hub

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/retention"
)

// busy is the non-retryable ErrBusy: retention leaves the VM's chain alone this time.
func busy(format string, args ...any) error {
	return temporal.NewNonRetryableApplicationError(fmt.Sprintf(format, args...), activities.ErrBusy, nil)
}

// PlanRetention decides, from the catalog, which complete points of a VM its policy keeps
// (the VM's own, else the default of input.ScheduleID, else none: keep everything), which
// kept points are flattened to bound their chain, and which go because the operator deletes
// them. It changes nothing. ErrBusy (non-retryable) while a backup of the VM runs or an
// export serves one of its points; an unknown VM is ErrNotFound; a point to delete that is
// unknown, of another VM or not complete is ErrBadInput.
func (a *Activities) PlanRetention(ctx context.Context, in activities.PlanRetentionInput) (activities.RetentionPlan, error) {
	vm, err := a.findVM(ctx, in.VM, "the moref")
	if err != nil {
		return activities.RetentionPlan{}, err
	}
	if err := a.checkIdle(ctx, vm); err != nil {
		return activities.RetentionPlan{}, err
	}
	points, err := a.store.ListPoints(ctx, vm.ID, catalog.StatusComplete)
	if err != nil {
		return activities.RetentionPlan{}, fmt.Errorf("plan retention of %s: %w", vm.Name, err)
	}
	// Oldest first by finish time: a point finishes after the parent it was planned on.
	slices.SortStableFunc(points, func(x, y catalog.Point) int {
		if c := x.FinishedAt.Compare(y.FinishedAt); c != 0 {
			return c
		}
		return strings.Compare(x.ID, y.ID)
	})
	deleted, err := a.checkDeletes(ctx, vm, points, in.Delete)
	if err != nil {
		return activities.RetentionPlan{}, err
	}
	policy, source, err := a.store.ResolvePolicy(ctx, vm.ID, in.ScheduleID)
	if err != nil {
		return activities.RetentionPlan{}, fmt.Errorf("plan retention of %s: %w", vm.Name, err)
	}
	candidates := make([]retention.Point, len(points))
	for i, p := range points {
		candidates[i] = retention.Point{ID: p.ID, FinishedAt: p.FinishedAt, Parent: p.ParentID, Delete: deleted[p.ID]}
	}
	decisions, err := retention.Select(candidates, policy)
	if err != nil {
		return activities.RetentionPlan{}, badInput("plan retention of %s: %v", vm.Name, err)
	}
	// The plan is applied on the hub of the VM's chain, not on the worker that planned it: a
	// VM's complete points live on one hub (PlanBackup keeps a VM on the hub of its newest
	// one). None: nothing to apply, and no hub.
	plan := activities.RetentionPlan{
		VMID: vm.ID, VMName: vm.Name, Policy: toActivityPolicy(policy), PolicySource: source,
		Points: make([]activities.PointDecision, len(points)),
	}
	if len(points) > 0 {
		plan.HubID = points[len(points)-1].Hub
	}
	for i, p := range points {
		if p.Hub != plan.HubID {
			return activities.RetentionPlan{}, badInput("plan retention of %s: its points are on more than one hub (%s on %s, %s on %s); "+
				"retention works on one hub's chain", vm.Name, p.ID, p.Hub, points[len(points)-1].ID, plan.HubID)
		}
		d := decisions[i]
		var bytes int64
		for _, disk := range p.Disks {
			bytes += disk.AllocatedBytes
		}
		plan.Points[i] = activities.PointDecision{PointID: p.ID, Keep: d.Keep, Reasons: d.Reasons, Bytes: bytes, Flatten: d.Flatten}
	}
	return plan, nil
}

// findVM resolves a catalog VM by name or moref; none is ErrNotFound, several ErrBadInput
// listing them and asking for instead (what else the caller accepts).
func (a *Activities) findVM(ctx context.Context, name, instead string) (catalog.VM, error) {
	if name == "" {
		return catalog.VM{}, badInput("vm: empty")
	}
	vms, err := a.store.FindVMs(ctx, name)
	if err != nil {
		return catalog.VM{}, fmt.Errorf("find VM %s: %w", name, err)
	}
	switch len(vms) {
	case 0:
		return catalog.VM{}, notFound("vm: no VM %s in the catalog", name)
	case 1:
		return vms[0], nil
	}
	named := make([]string, len(vms))
	for i, v := range vms {
		named[i] = fmt.Sprintf("%s %s of vCenter %s", v.Name, v.Moref, v.InstanceUUID)
	}
	return catalog.VM{}, badInput("vm: %s names %d VMs (%s); give %s", name, len(vms), strings.Join(named, ", "), instead)
}

// checkIdle refuses (ErrBusy) while anything uses the VM's chain: a backup whose workflow
// is open (the running point of a closed one is failed, as PlanBackup does) or an export
// of one of its points (a backup's target, a restore or a mount).
func (a *Activities) checkIdle(ctx context.Context, vm catalog.VM) error {
	running, err := a.store.RunningPointForVM(ctx, vm.ID)
	switch {
	case err == nil:
		abandoned, err := a.failAbandoned(ctx, running.ID, running.WorkflowID)
		if err != nil {
			return fmt.Errorf("plan retention of %s: %w", vm.Name, err)
		}
		if !abandoned {
			return busy("VM %s is busy: backup workflow %s is writing point %s", vm.Name, running.WorkflowID, running.ID)
		}
	case !errors.Is(err, catalog.ErrNotFound):
		return fmt.Errorf("plan retention of %s: %w", vm.Name, err)
	}
	exports, err := a.store.VMExports(ctx, vm.ID)
	if err != nil {
		return fmt.Errorf("plan retention of %s: %w", vm.Name, err)
	}
	if len(exports) > 0 {
		e := exports[0]
		return busy("VM %s is busy: workflow %s serves %s on hub %s (port %d)", vm.Name, e.WorkflowID, e.Path, e.Hub, e.Port)
	}
	return nil
}

// checkDeletes resolves the points the operator deletes: each must be a complete point of
// the VM. A point already on its way out (a status past complete, set by a retention run that
// did not finish) is passed over: a retried deletion is not an error, and the plan lists
// complete points only.
func (a *Activities) checkDeletes(ctx context.Context, vm catalog.VM, points []catalog.Point, ids []string) (map[string]bool, error) {
	deleted := map[string]bool{}
	for _, id := range ids {
		if slices.ContainsFunc(points, func(p catalog.Point) bool { return p.ID == id }) {
			deleted[id] = true
			continue
		}
		p, err := a.store.GetPoint(ctx, id)
		switch {
		case errors.Is(err, catalog.ErrNotFound):
			return nil, badInput("delete: no restore point %s", id)
		case err != nil:
			return nil, fmt.Errorf("plan retention of %s: point %s: %w", vm.Name, id, err)
		case p.VMID != vm.ID:
			return nil, badInput("delete: point %s is not a point of VM %s", id, vm.Name)
		case p.Status == catalog.StatusRunning, p.Status == catalog.StatusFailed:
			return nil, badInput("delete: point %s is %s; only complete points are deleted", id, p.Status)
		}
	}
	return deleted, nil
}

func toActivityPolicy(p retention.Policy) activities.RetentionPolicy {
	return activities.RetentionPolicy{KeepLast: p.KeepLast, Daily: p.Daily, Weekly: p.Weekly, Monthly: p.Monthly,
		Yearly: p.Yearly, MaxChain: p.MaxChain}
}
