package workflows

import (
	"fmt"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/text"
)

// RetentionWorkflowName is the registered name of RetentionWorkflow.
const RetentionWorkflowName = "RetentionWorkflow"

// RetentionWorkflowID is the ID of every retention run of a VM, whoever starts it (a backup,
// the CLI): one ID per VM, so the server itself refuses a second concurrent run. A VM named
// differently (name, moref) is covered by PlanRetention's catalog guard (ErrBusy).
func RetentionWorkflowID(vm string) string { return "retention-" + vm }

// MaxDeletePoints bounds RetentionInput.Delete: every ID travels in the run's input and its
// plan, which Temporal keeps below its payload limit.
const MaxDeletePoints = 5000

// MaxScheduleIDLength bounds RetentionInput.ScheduleID, in bytes.
const MaxScheduleIDLength = 255

// RetentionInput is the plain-JSON request of a retention run of one VM.
type RetentionInput struct {
	VM string `json:"vm"` // the VM's name or moref, as the catalog knows it
	// ScheduleID is the schedule whose default policy applies when the VM has none of its own
	// (set by a backup that ran from a schedule).
	ScheduleID string `json:"scheduleId,omitempty"`
	// Delete are points removed on top of the policy (diskferry points delete, vm forget).
	Delete []string `json:"delete,omitempty"`
	// DryRun only plans: nothing is removed, merged or marked.
	DryRun bool `json:"dryRun,omitempty"`

	unknown error
}

// UnmarshalJSON decodes the input leniently and remembers whether a strict decoding would
// have refused it (see BackupInput.UnmarshalJSON).
func (in *RetentionInput) UnmarshalJSON(data []byte) error {
	type plain RetentionInput
	var lenient plain
	unknown, err := decodeStrict(data, &lenient)
	if err != nil {
		return err
	}
	*in = RetentionInput(lenient)
	in.unknown = unknown
	return nil
}

func badRetentionInput(msg string) error {
	return temporal.NewNonRetryableApplicationError("invalid retention input: "+msg, activities.ErrBadInput, nil)
}

// Validate checks the input and returns a non-retryable ErrBadInput error naming the field.
func (in RetentionInput) Validate() error {
	if in.unknown != nil {
		return badRetentionInput(fmt.Sprintf("%v (known fields: vm, scheduleId, delete, dryRun)", in.unknown))
	}
	if err := validateVMRef(in.VM, badRetentionInput); err != nil {
		return err
	}
	switch id := in.ScheduleID; {
	case len(id) > MaxScheduleIDLength:
		return badRetentionInput(fmt.Sprintf("scheduleId: %d bytes long, at most %d", len(id), MaxScheduleIDLength))
	case !utf8.ValidString(id) || strings.ContainsFunc(id, unicode.IsControl):
		return badRetentionInput(fmt.Sprintf("scheduleId: %q is not valid UTF-8 or contains control characters", text.Shorten(id, 80)))
	}
	if len(in.Delete) > MaxDeletePoints {
		return badRetentionInput(fmt.Sprintf("delete: %d points, at most %d per run", len(in.Delete), MaxDeletePoints))
	}
	seen := make(map[string]bool, len(in.Delete))
	for _, p := range in.Delete {
		switch {
		case !pointIDShape.MatchString(p):
			return badRetentionInput(fmt.Sprintf("delete: %q is not a point ID (letters, digits, '.', '_', '-'; at most 64)", text.Shorten(p, 80)))
		case seen[p]:
			return badRetentionInput(fmt.Sprintf("delete: point %s listed twice", p))
		}
		seen[p] = true
	}
	return nil
}

// RetentionOutcome is RetentionWorkflow's result: what the plan decided for every point and
// what applying it did.
type RetentionOutcome struct {
	Plan   activities.RetentionPlan   `json:"plan"`
	DryRun bool                       `json:"dryRun,omitempty"`
	Result activities.RetentionResult `json:"result"` // empty on a dry run or when nothing was to do
	// Skipped says why the run changed nothing although it had to: the VM's chain was in use
	// (ErrBusy); the next run does it.
	Skipped  string        `json:"skipped,omitempty"`
	Duration time.Duration `json:"duration"`
}

// maxDecisionLines bounds the points a run's job log lists one by one.
const maxDecisionLines = 20

// Statuses of a retention run besides running, complete, failed and cancelled.
const (
	StatusApplying = "applying" // ApplyRetention removes and merges on the hub
	StatusSkipped  = "skipped"  // the chain was busy; nothing changed
)

// RetentionWorkflow keeps what a VM's policy (plus the operator's deletions) says and no
// more: PlanRetention decides every point's fate on the shared hub queue; unless the run is a
// dry run or nothing goes, ApplyRetention carries the plan out on the hub holding the chain.
// Nothing needs undoing on failure: every step of ApplyRetention is idempotent and the next
// run finishes it. A chain in use (ErrBusy) ends the run as skipped, not failed.
func RetentionWorkflow(ctx workflow.Context, in RetentionInput) (RetentionOutcome, error) {
	r := newRetention(ctx, in)
	if err := workflow.SetQueryHandler(ctx, ProgressQueryName, func() (Progress, error) {
		return r.progress.clone(), nil
	}); err != nil {
		return RetentionOutcome{}, fmt.Errorf("register progress query: %w", err)
	}
	if err := in.Validate(); err != nil {
		return RetentionOutcome{}, r.refuse(ctx, err)
	}
	r.setStatus(ctx, StatusRunning)
	r.journal.add(ctx, "retention of VM %s requested (%s)", in.VM, r.describeRequest())

	out, err := r.run(ctx)
	out.Duration = workflow.Now(ctx).Sub(r.started)
	switch {
	case err == nil:
		r.setStatus(ctx, StatusComplete)
		r.step(ctx, "%s", StatusComplete)
		return out, nil
	case hasErrorType(err, activities.ErrBusy) && !cancelled(ctx, err):
		out.Skipped = rootMessage(err)
		r.setStatus(ctx, StatusSkipped)
		r.journal.add(ctx, "skipped: %s", out.Skipped)
		r.step(ctx, "skipped: %s", out.Skipped)
		return out, nil
	}
	return RetentionOutcome{}, r.fail(ctx, err)
}

// retention is one run of RetentionWorkflow.
type retention struct {
	job
	in RetentionInput
}

func newRetention(ctx workflow.Context, in RetentionInput) *retention {
	mode := "apply"
	if in.DryRun {
		mode = "dry-run"
	}
	progress := &Progress{VM: text.Shorten(in.VM, MaxVMRefLength), Mode: mode, Started: workflow.Now(ctx)}
	r := &retention{in: in}
	r.job = newJob(ctx, "retention", "Retention of VM "+progress.VM, 0, progress)
	r.attributes = r.statusAttributes
	return r
}

// statusAttributes carry the run's status in BackupStatus, so one query finds every run of a VM.
func (r *retention) statusAttributes(status string) []temporal.SearchAttributeUpdate {
	updates := []temporal.SearchAttributeUpdate{BackupStatusKey.ValueSet(status)}
	if r.progress.VM != "" {
		updates = append(updates, VMNameKey.ValueSet(r.progress.VM))
	}
	return updates
}

func (r *retention) describeRequest() string {
	parts := []string{r.progress.Mode}
	if r.in.ScheduleID != "" {
		parts = append(parts, "schedule "+text.Shorten(r.in.ScheduleID, 80))
	}
	if n := len(r.in.Delete); n > 0 {
		parts = append(parts, fmt.Sprintf("%d point(s) deleted by the operator", n))
	}
	return strings.Join(parts, ", ")
}

func (r *retention) run(ctx workflow.Context) (RetentionOutcome, error) {
	out := RetentionOutcome{DryRun: r.in.DryRun}
	r.step(ctx, "planning")
	in := activities.PlanRetentionInput{VM: r.in.VM, Delete: r.in.Delete, ScheduleID: r.in.ScheduleID}
	if err := r.execute(ctx, activities.PlanRetentionName, activities.HubQueue, "plan retention of VM "+r.in.VM, in, &out.Plan); err != nil {
		return out, err
	}
	plan := out.Plan
	r.progress.VM, r.progress.HubID = text.Shorten(plan.VMName, MaxVMRefLength), plan.HubID
	r.setStatus(ctx, StatusRunning)
	r.journal.add(ctx, "policy %s from %s on hub %s", DescribePolicy(plan.Policy), plan.PolicySource, plan.HubID)
	changes := 0
	for _, p := range plan.Points {
		if p.Keep && !p.Flatten {
			continue
		}
		changes++
		// The job log is the run's current details, sent with every workflow task: a VM
		// forgotten with thousands of points lists the first few, the result has them all.
		if changes <= maxDecisionLines {
			r.journal.add(ctx, "%s", describeDecision(p))
		}
	}
	if changes > maxDecisionLines {
		r.journal.add(ctx, "and %d more point(s) to delete or flatten", changes-maxDecisionLines)
	}
	r.journal.add(ctx, "%d point(s) kept as they are", len(plan.Points)-changes)
	if r.in.DryRun {
		r.journal.add(ctx, "dry run: %d of %d point(s) would change; nothing done", changes, len(plan.Points))
		return out, nil
	}
	if changes == 0 {
		r.journal.add(ctx, "nothing to remove or flatten")
		return out, nil
	}
	if plan.HubID == "" {
		return out, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("the retention plan of VM %s names no hub to apply it on", plan.VMName), activities.ErrRefused, nil)
	}

	r.setStatus(ctx, StatusApplying)
	r.step(ctx, "applying the plan on hub %s", plan.HubID)
	if err := r.execute(ctx, activities.ApplyRetentionName, activities.HubHostQueue(plan.HubID),
		fmt.Sprintf("remove or merge %d point(s) of VM %s", changes, plan.VMName),
		activities.ApplyRetentionInput{Plan: plan}, &out.Result); err != nil {
		return out, err
	}
	r.journal.add(ctx, "%d point(s) deleted, %d flattened, %s freed",
		len(out.Result.Deleted), len(out.Result.Flattened), humanBytes(out.Result.BytesFreed))
	return out, nil
}

// DescribePolicy is a policy as an operator reads it: "last 3, daily 7, max chain 2".
func DescribePolicy(p activities.RetentionPolicy) string {
	var parts []string
	for _, c := range []struct {
		name string
		n    int
	}{{"last", p.KeepLast}, {"daily", p.Daily}, {"weekly", p.Weekly}, {"monthly", p.Monthly}, {"yearly", p.Yearly}, {"max chain", p.MaxChain}} {
		if c.n > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", c.name, c.n))
		}
	}
	if len(parts) == 0 {
		return "keep everything"
	}
	return strings.Join(parts, ", ")
}

// describeDecision is the fate of a point that changes, as a job log line reads it.
func describeDecision(p activities.PointDecision) string {
	verb := "keep and flatten"
	if !p.Keep {
		verb = "drop"
	}
	return fmt.Sprintf("%s point %s (%s): %s", verb, p.PointID, humanBytes(p.Bytes), strings.Join(p.Reasons, "; "))
}
