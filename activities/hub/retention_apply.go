package hub

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/heartbeat"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/chain"
	"github.com/diskferry/diskferry/internal/qemu"
)

// retentionBeat is how often ApplyRetention heartbeats between qemu-img's reports.
const retentionBeat = 5 * time.Second

// ApplyRetention carries out a plan on this hub (internal/chain): every point not kept is
// marked deleting, then removed or merged into its neighbours, and points marked Flatten are
// made full. It first checks the repository has room for what the merges may write
// (ErrNoSpace names free and needed) and refuses while a backup of the VM runs (ErrBusy).
// Heartbeats RetentionProgress. A retry, or a run after a crash, finishes what is left.
func (a *Activities) ApplyRetention(ctx context.Context, in activities.ApplyRetentionInput) (activities.RetentionResult, error) {
	plan := in.Plan
	if plan.HubID != a.settings.HubID {
		return activities.RetentionResult{}, badInput("apply retention: plan for hub %q reached hub %q", plan.HubID, a.settings.HubID)
	}
	if plan.VMID <= 0 {
		return activities.RetentionResult{}, badInput("apply retention: plan without a VM id")
	}
	var cplan chain.Plan
	for _, p := range plan.Points {
		switch {
		case !p.Keep:
			cplan.Delete = append(cplan.Delete, p.PointID)
		case p.Flatten:
			cplan.Flatten = append(cplan.Flatten, p.PointID)
		}
	}
	what := fmt.Sprintf("apply retention to VM %s (%d)", plan.VMName, plan.VMID)
	if running, err := a.store.RunningPointForVM(ctx, plan.VMID); err == nil {
		return activities.RetentionResult{}, busy("%s: point %s of workflow %s is running", what, running.ID, running.WorkflowID)
	} else if !errors.Is(err, catalog.ErrNotFound) {
		return activities.RetentionResult{}, classify(what, err)
	}
	cat := a.store.ChainCatalog(plan.VMID)
	points, err := cat.Points(ctx)
	if err != nil {
		return activities.RetentionResult{}, classify(what, err)
	}
	// qemu-img writes what the catalog names: never anything outside the repository.
	for _, p := range points {
		for _, d := range p.Disks {
			for _, path := range []string{d.Path, d.ParentPath} {
				if path != "" && !a.layout.Contains(path) {
					return activities.RetentionResult{}, badInput("%s: point %s names %q, outside the repository", what, p.ID, path)
				}
			}
		}
	}
	if err := a.checkMergeSpace(points, cplan); err != nil {
		return activities.RetentionResult{}, err
	}

	var last activities.RetentionProgress
	if activity.HasHeartbeatDetails(ctx) {
		_ = activity.GetHeartbeatDetails(ctx, &last)
	}
	beat := heartbeat.Start(ctx, retentionBeat, last)
	defer beat.Stop()
	res, err := chain.Run(ctx, cat, a.layout, cplan, chain.Options{
		OnProgress: func(p chain.Progress) {
			beat.Record(activities.RetentionProgress{Step: p.Step, Done: p.Done, Total: p.Total, Percent: p.Percent})
		},
	})
	if err != nil {
		return activities.RetentionResult{}, classifyRetention(what, err)
	}
	a.remeasure(ctx, cat)
	a.log.InfoContext(ctx, "retention applied", "vm", plan.VMName, "vmId", plan.VMID, "deleted", len(res.Deleted),
		"flattened", len(res.Flattened), "bytesFreed", res.BytesFreed)
	return activities.RetentionResult{Deleted: nonNil(res.Deleted), Flattened: nonNil(res.Flattened), BytesFreed: res.BytesFreed}, nil
}

// remeasure records the allocated size of every remaining file of the VM's points: merges
// and flattens grew some, and points list must not show the sizes of before. A file it
// cannot measure keeps its old size (logged): the merge itself succeeded.
func (a *Activities) remeasure(ctx context.Context, cat chain.Catalog) {
	points, err := cat.Points(ctx)
	if err != nil {
		a.log.WarnContext(ctx, "retention: cannot list the points to measure", "err", err)
		return
	}
	for _, p := range points {
		for _, d := range p.Disks {
			info, err := qemu.Info(ctx, d.Path)
			if err == nil {
				err = a.store.SetAllocatedBytes(ctx, p.ID, d.Key, info.ActualSize)
			}
			if err != nil {
				a.log.WarnContext(ctx, "retention: allocated size not updated", "point", p.ID, "disk", d.Key, "err", err)
			}
		}
	}
}

// checkMergeSpace refuses a plan whose merges may write more than the repository has free,
// the margin kept free as for a backup's target.
func (a *Activities) checkMergeSpace(points []chain.Point, plan chain.Plan) error {
	need, err := chain.Needed(points, plan, chain.Allocated)
	if err != nil {
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("apply retention: %v", err), activities.ErrBadInput, nil)
	}
	if need == 0 {
		return nil
	}
	return a.requireSpace("apply retention", "the merges", need, "what the commits, rebases and flattens may write")
}

// classifyRetention: a backup on the chain or an export holding a file is Busy (the next
// run does it); catalog and files disagreeing needs an operator; the rest as classify.
func classifyRetention(what string, err error) error {
	switch {
	case errors.Is(err, catalog.ErrBackupRunning), errors.Is(err, qemu.ErrImageLocked):
		return busy("%s: %v", what, err)
	case errors.Is(err, chain.ErrInconsistent):
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("%s: %v", what, err), activities.ErrBadInput, nil)
	}
	return classify(what, err)
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
