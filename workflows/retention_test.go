package workflows

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/mock"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/diskferry/diskferry/activities"
)

func (r *run) executeRetention(in RetentionInput) (RetentionOutcome, error) {
	r.env.SetStartWorkflowOptions(client.StartWorkflowOptions{ID: RetentionWorkflowID(in.VM), TaskQueue: activities.HubQueue})
	r.env.ExecuteWorkflow(RetentionWorkflowName, in)
	if !r.env.IsWorkflowCompleted() {
		return RetentionOutcome{}, errors.New("workflow did not complete")
	}
	if err := r.env.GetWorkflowError(); err != nil {
		return RetentionOutcome{}, err
	}
	var out RetentionOutcome
	err := r.env.GetWorkflowResult(&out)
	return out, err
}

// The plan goes to ApplyRetention unchanged, on the host queue of the hub that holds the
// chain; the result says what was deleted, flattened and freed.
func TestRetentionApplies(t *testing.T) {
	r := newUnmockedRun(t, activities.ModeFull)
	var applyQueue string
	r.env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, _ converter.EncodedValues) {
		if info.ActivityType.Name == activities.ApplyRetentionName {
			applyQueue = info.TaskQueue
		}
	})
	in := RetentionInput{VM: "web01", ScheduleID: "backup-schedule-web01", Delete: []string{"p0"}}
	out, err := r.executeRetention(in)
	require.NoError(t, err)

	assert.Equal(t, []string{activities.PlanRetentionName, activities.ApplyRetentionName}, r.fakes.recorded())
	assert.Equal(t, []activities.PlanRetentionInput{{VM: "web01", Delete: []string{"p0"}, ScheduleID: "backup-schedule-web01"}}, r.fakes.planRetentions)
	require.Len(t, r.fakes.applies, 1)
	assert.Equal(t, testRetentionPlan(), r.fakes.applies[0].Plan)
	assert.Equal(t, activities.HubHostQueue(testHubID), applyQueue)
	assert.Equal(t, testRetentionPlan(), out.Plan)
	assert.Equal(t, activities.RetentionResult{Deleted: []string{"p1"}, Flattened: []string{"p2"}, BytesFreed: 3 * gib}, out.Result)
	assert.False(t, out.DryRun)
	assert.Empty(t, out.Skipped)
	assert.Equal(t, []string{StatusRunning, StatusRunning, StatusApplying, StatusComplete}, r.statuses)
	assert.Equal(t, "web01", r.attrs[VMNameKey.GetName()])

	p := r.progress(t)
	assert.Equal(t, StatusComplete, p.Status)
	assert.Equal(t, testHubID, p.HubID)
	assert.Equal(t, "apply", p.Mode)
}

// A dry run only plans: ApplyRetention is never called, the plan is the result.
func TestRetentionDryRunOnlyPlans(t *testing.T) {
	r := newUnmockedRun(t, activities.ModeFull)
	out, err := r.executeRetention(RetentionInput{VM: "web01", DryRun: true})
	require.NoError(t, err)
	assert.Equal(t, []string{activities.PlanRetentionName}, r.fakes.recorded())
	assert.True(t, out.DryRun)
	assert.Equal(t, testRetentionPlan(), out.Plan)
	assert.Zero(t, out.Result)
	assert.Equal(t, StatusComplete, r.progress(t).Status)
}

// A plan that keeps every point as it is ends the run without touching the hub.
func TestRetentionNothingToDo(t *testing.T) {
	r := newUnmockedRun(t, activities.ModeFull)
	keepAll(&r.fakes.retentionPlan)
	out, err := r.executeRetention(RetentionInput{VM: "web01"})
	require.NoError(t, err)
	assert.Equal(t, []string{activities.PlanRetentionName}, r.fakes.recorded())
	assert.Len(t, out.Plan.Points, 3)
	assert.Zero(t, out.Result)
}

// A chain in use (ErrBusy, from the plan's guard or the apply's) ends the run as skipped with
// the reason: not a failure, and not retried.
func TestRetentionBusyIsSkipped(t *testing.T) {
	for _, at := range []string{activities.PlanRetentionName, activities.ApplyRetentionName} {
		t.Run(at, func(t *testing.T) {
			r := newUnmockedRun(t, activities.ModeFull)
			r.fakes.fail[at] = temporal.NewApplicationError("backup backup-web01 of VM web01 is running", activities.ErrBusy)
			out, err := r.executeRetention(RetentionInput{VM: "web01"})
			require.NoError(t, err)
			assert.Equal(t, "backup backup-web01 of VM web01 is running", out.Skipped)
			assert.Zero(t, out.Result)
			assert.Equal(t, 1, r.fakes.attempts[at], "ErrBusy is not retried")
			assert.Equal(t, StatusSkipped, r.statuses[len(r.statuses)-1])
			p := r.progress(t)
			assert.Equal(t, StatusSkipped, p.Status)
			assert.Equal(t, "skipped: backup backup-web01 of VM web01 is running", p.Step)
		})
	}
}

// An apply that fails fails the run with its cause, everywhere an operator looks.
func TestRetentionApplyFailureFails(t *testing.T) {
	r := newUnmockedRun(t, activities.ModeFull)
	r.fakes.fail[activities.ApplyRetentionName] = injected(activities.ApplyRetentionName)
	_, err := r.executeRetention(RetentionInput{VM: "web01"})
	require.Error(t, err)
	assert.ErrorContains(t, err, "injected failure at ApplyRetention")
	assert.Equal(t, StatusFailed, r.statuses[len(r.statuses)-1])
	p := r.progress(t)
	assert.Equal(t, StatusFailed, p.Status)
	assert.Contains(t, p.Error, "injected failure at ApplyRetention")
}

// A bad input is refused before any step, naming the field.
func TestRetentionInputRefused(t *testing.T) {
	for _, c := range []struct {
		json string
		want string
	}{
		{`{"vm":""}`, "invalid retention input: vm: required"},
		{`{"vm":"web01","dry_run":true}`, `invalid retention input: json: unknown field "dry_run" (known fields: vm, scheduleId, delete, dryRun)`},
		{`{"vm":"web01","delete":["p1","p1"]}`, "invalid retention input: delete: point p1 listed twice"},
		{`{"vm":"web01","delete":["../p1"]}`, `invalid retention input: delete: "../p1" is not a point ID (letters, digits, '.', '_', '-'; at most 64)`},
		{`{"vm":"web01","scheduleId":"a\nb"}`, `invalid retention input: scheduleId: "a\nb" is not valid UTF-8 or contains control characters`},
	} {
		t.Run(c.json, func(t *testing.T) {
			r := newUnmockedRun(t, activities.ModeFull)
			r.env.SetStartWorkflowOptions(client.StartWorkflowOptions{ID: RetentionWorkflowID("x"), TaskQueue: activities.HubQueue})
			r.env.ExecuteWorkflow(RetentionWorkflowName, json.RawMessage(c.json))
			require.True(t, r.env.IsWorkflowCompleted())
			err := r.env.GetWorkflowError()
			require.Error(t, err)
			assert.Contains(t, err.Error(), c.want)
			assert.True(t, hasErrorType(err, activities.ErrBadInput))
			assert.Empty(t, r.fakes.recorded())
			assert.Equal(t, StatusFailed, r.progress(t).Status)
		})
	}
	many := make([]string, MaxDeletePoints+1)
	for i := range many {
		many[i] = "p" + strconv.Itoa(i)
	}
	assert.ErrorContains(t, RetentionInput{VM: "web01", Delete: many}.Validate(), "invalid retention input: delete: 5001 points, at most 5000 per run")
}

// PlanRetention waits out a catalog outage; ApplyRetention is a long heartbeating step with
// retries (it is idempotent) that waits a bounded time for the hub's worker. Neither retries
// ErrBusy.
func TestRetentionStepOptions(t *testing.T) {
	var j job
	plan := j.options(activities.PlanRetentionName, activities.HubQueue, "")
	assert.Equal(t, int32(catalogAttempts), plan.RetryPolicy.MaximumAttempts)
	apply := j.options(activities.ApplyRetentionName, activities.HubHostQueue(testHubID), "")
	assert.Equal(t, time.Minute, apply.HeartbeatTimeout)
	assert.GreaterOrEqual(t, apply.StartToCloseTimeout, 12*time.Hour)
	assert.Greater(t, apply.RetryPolicy.MaximumAttempts, int32(1))
	assert.Equal(t, DefaultWorkerWait, apply.ScheduleToStartTimeout)
	assert.Contains(t, apply.RetryPolicy.NonRetryableErrorTypes, activities.ErrBusy)
	assert.Contains(t, plan.RetryPolicy.NonRetryableErrorTypes, activities.ErrBusy)
	// A backup, restore or mount waits for a running retention: their ErrBusy is retried.
	for _, name := range []string{activities.PlanBackupName, activities.ResolvePointName} {
		assert.NotContains(t, j.options(name, activities.HubQueue, "").RetryPolicy.NonRetryableErrorTypes, activities.ErrBusy, name)
	}
	assert.NotContains(t, nonRetryable, activities.ErrBusy)
}

// A backup starts the VM's retention once its point is committed, under the VM's retention
// ID, without waiting for it.
func TestBackupStartsRetention(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	res, err := r.execute(validInput())
	require.NoError(t, err)
	assert.Equal(t, forward, r.fakes.recorded())
	assert.Equal(t, []RetentionInput{{VM: "web01"}}, r.retentions)
	assert.Equal(t, RetentionWorkflowID("web01"), res.Retention)
	assert.Empty(t, res.Warnings)
}

// A backup started by a schedule passes the schedule's ID, so its default policy applies.
func TestBackupFromScheduleStartsRetentionWithSchedule(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	require.NoError(t, r.env.SetTypedSearchAttributesOnStart(temporal.NewSearchAttributes(scheduledByKey.ValueSet("backup-schedule-web01"))))
	_, err := r.execute(validInput())
	require.NoError(t, err)
	assert.Equal(t, []RetentionInput{{VM: "web01", ScheduleID: "backup-schedule-web01"}}, r.retentions)
}

// A backup whose point is not committed starts no retention.
func TestFailedBackupStartsNoRetention(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.fail[activities.CommitPointName] = injected(activities.CommitPointName)
	_, err := r.execute(validInput())
	require.Error(t, err)
	assert.Empty(t, r.retentions)
}

// A retention that cannot be started is a warning: the backup completes with its point.
func TestBackupCompletesWhenRetentionCannotStart(t *testing.T) {
	r := newUnmockedRun(t, activities.ModeFull)
	r.env.OnWorkflow(RetentionWorkflowName, mock.Anything, mock.Anything).Return(RetentionOutcome{}, testsuite.ErrMockStartChildWorkflowFailed)
	res, err := r.execute(validInput())
	require.NoError(t, err)
	assert.Equal(t, "p1", res.PointID)
	assert.Empty(t, res.Retention)
	require.Len(t, res.Warnings, 1)
	assert.Contains(t, res.Warnings[0], "retention of VM web01 not started (the next backup starts it, or diskferry retention apply --vm web01)")
	assert.Equal(t, StatusComplete, r.statuses[len(r.statuses)-1])
}

// The job log lists the points that change, at most maxDecisionLines of them one by one:
// a VM forgotten with thousands of points does not grow the run's details without bound.
func TestRetentionJobLogIsBounded(t *testing.T) {
	r := newUnmockedRun(t, activities.ModeFull)
	plan := testRetentionPlan()
	newest := plan.Points[len(plan.Points)-1]
	plan.Points = nil
	for i := range maxDecisionLines + 5 {
		plan.Points = append(plan.Points, activities.PointDecision{PointID: "d" + strconv.Itoa(i), Reasons: []string{"deleted by operator"}, Bytes: gib})
	}
	r.fakes.retentionPlan = activities.RetentionPlan{VMName: plan.VMName, HubID: plan.HubID, PolicySource: "none", Points: append(plan.Points, newest)}
	_, err := r.executeRetention(RetentionInput{VM: "web01", DryRun: true})
	require.NoError(t, err)
	details := r.details(t)
	assert.Contains(t, details, "drop point d0 (1 GiB): deleted by operator")
	assert.Contains(t, details, "drop point d19 ")
	assert.NotContains(t, details, "drop point d20 ")
	assert.Contains(t, details, "and 5 more point(s) to delete or flatten")
	assert.Contains(t, details, "1 point(s) kept as they are")
	assert.Contains(t, details, "dry run: 25 of 26 point(s) would change; nothing done")
}

// A plan that changes points but names no hub fails at once, naming the cause.
func TestRetentionPlanWithoutHubFails(t *testing.T) {
	r := newUnmockedRun(t, activities.ModeFull)
	r.fakes.retentionPlan.HubID = ""
	_, err := r.executeRetention(RetentionInput{VM: "web01"})
	require.ErrorContains(t, err, "the retention plan of VM web01 names no hub to apply it on")
	assert.Equal(t, []string{activities.PlanRetentionName}, r.fakes.recorded())
}
