package workflows

import (
	"context"
	"slices"

	"github.com/diskferry/diskferry/activities"
)

// The retention activities of fakeActivities; calls are recorded as "<Name>".

// testRetentionPlan keeps p3 (the newest) and p2 flattened, and drops p1.
func testRetentionPlan() activities.RetentionPlan {
	return activities.RetentionPlan{
		VMID: 7, VMName: "web01", HubID: testHubID,
		Policy:       activities.RetentionPolicy{KeepLast: 2, MaxChain: 1},
		PolicySource: "vm",
		Points: []activities.PointDecision{
			{PointID: "p1", Keep: false, Reasons: []string{"not kept by the policy"}, Bytes: 3 * gib},
			{PointID: "p2", Keep: true, Reasons: []string{"last 2"}, Bytes: gib, Flatten: true},
			{PointID: "p3", Keep: true, Reasons: []string{"last 2"}, Bytes: gib / 2},
		},
	}
}

// keepAll makes a plan keep every point as it is.
func keepAll(plan *activities.RetentionPlan) {
	for i := range plan.Points {
		plan.Points[i].Keep, plan.Points[i].Flatten = true, false
	}
}

func (f *fakeActivities) PlanRetention(ctx context.Context, in activities.PlanRetentionInput) (activities.RetentionPlan, error) {
	f.mu.Lock()
	f.planRetentions = append(f.planRetentions, in)
	plan := f.retentionPlan
	plan.Points = slices.Clone(plan.Points)
	f.mu.Unlock()
	if err := f.call(ctx, activities.PlanRetentionName); err != nil {
		return activities.RetentionPlan{}, err
	}
	return plan, nil
}

func (f *fakeActivities) ApplyRetention(ctx context.Context, in activities.ApplyRetentionInput) (activities.RetentionResult, error) {
	f.mu.Lock()
	f.applies = append(f.applies, in)
	f.mu.Unlock()
	if err := f.call(ctx, activities.ApplyRetentionName); err != nil {
		return activities.RetentionResult{}, err
	}
	var res activities.RetentionResult
	for _, p := range in.Plan.Points {
		switch {
		case !p.Keep:
			res.Deleted = append(res.Deleted, p.PointID)
			res.BytesFreed += p.Bytes
		case p.Flatten:
			res.Flattened = append(res.Flattened, p.PointID)
		}
	}
	return res, nil
}
