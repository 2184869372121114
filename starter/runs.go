package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	commonpb "go.temporal.io/api/common/v1"
	enumspb "go.temporal.io/api/enums/v1"
	workflowpb "go.temporal.io/api/workflow/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/workflows"
)

// What backups, restores and mounts share: how they are started, followed, listed and cancelled.

// startOnce are the options of a job that must not run twice for the same object: while a run
// with the ID is open the start fails with *serviceerror.WorkflowExecutionAlreadyStarted
// (as workflows.StartBackupOptions); once it closed, a new run may reuse the ID.
func startOnce(id string) client.StartWorkflowOptions {
	return client.StartWorkflowOptions{
		ID:                                       id,
		TaskQueue:                                activities.HubQueue,
		WorkflowIDConflictPolicy:                 enumspb.WORKFLOW_ID_CONFLICT_POLICY_FAIL,
		WorkflowIDReusePolicy:                    enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		WorkflowExecutionErrorWhenAlreadyStarted: true,
	}
}

// followRun shows per-disk progress until the run ends, then its result: as JSON, or drawn
// by show. kind (backup, restore) names the job in messages.
func followRun[R any](ctx context.Context, c client.Client, run client.WorkflowRun, out io.Writer, asJSON bool,
	kind string, show func(io.Writer, string, R)) error {
	done := make(chan error, 1)
	var result R
	go func() { done <- run.Get(ctx, &result) }()

	view := newProgressView(out, !asJSON && isTerminal(out))
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			if ctx.Err() != nil {
				return fmt.Errorf("stopped following %s %s; it goes on (diskferry %s status %s): %w", kind, run.GetID(), kind, run.GetID(), ctx.Err())
			}
			// The last frame shows how the disks ended; a closed run still answers the query.
			if p, qerr := liveProgress(ctx, c, run.GetID(), run.GetRunID()); qerr == nil {
				view.update(p, time.Now())
			}
			if err != nil {
				return runFailure(kind, run.GetID(), err)
			}
			if asJSON {
				return writeJSON(out, result)
			}
			show(out, run.GetID(), result)
			return nil
		case <-tick.C:
			p, err := liveProgress(ctx, c, run.GetID(), run.GetRunID())
			if err == nil {
				view.update(p, time.Now())
			}
		}
	}
}

// runFailure says what failed in operator terms: the step and its own message, not the
// SDK's whole chain of wrappers.
func runFailure(kind, id string, err error) error {
	var canceled *temporal.CanceledError
	if errors.As(err, &canceled) {
		return fmt.Errorf("%s %s was cancelled; its cleanup has run", kind, id)
	}
	step := ""
	var actErr *temporal.ActivityError
	if errors.As(err, &actErr) {
		step = " in " + actErr.ActivityType().GetName()
	}
	var appErr *temporal.ApplicationError
	if errors.As(err, &appErr) {
		return fmt.Errorf("%s %s failed%s: %s", kind, id, step, appErr.Message())
	}
	return fmt.Errorf("%s %s failed%s: %w", kind, id, step, err)
}

// liveProgress is the workflow's progress query plus the bytes of copies in flight from
// their heartbeats.
func liveProgress(ctx context.Context, c client.Client, id, runID string) (workflows.Progress, error) {
	var p workflows.Progress
	v, err := c.QueryWorkflow(ctx, id, runID, workflows.ProgressQueryName)
	if err != nil {
		return p, fmt.Errorf("query progress of %s: %w", id, err)
	}
	if err := v.Get(&p); err != nil {
		return p, fmt.Errorf("decode progress of %s: %w", id, err)
	}
	desc, err := c.DescribeWorkflow(ctx, id, runID)
	if err != nil {
		return p, fmt.Errorf("describe %s: %w", id, err)
	}
	pending := desc.RawResponse.GetPendingActivities()
	live, err := workflows.LiveCopies(pending, converter.GetDefaultDataConverter())
	if err != nil {
		return p, err
	}
	p = p.WithLiveCopies(live, time.Now())
	return p, withFileRestores(&p, pending)
}

// withFileRestores sets the bytes done of the disks a pending RestoreFile converts (its
// activity ID is workflows.CopyActivityID of the point's disk key) from the percentage it
// heartbeats: qemu-img convert reports no bytes.
func withFileRestores(p *workflows.Progress, pending []*workflowpb.PendingActivityInfo) error {
	for _, a := range pending {
		if a.GetActivityType().GetName() != activities.RestoreFileName || len(a.GetHeartbeatDetails().GetPayloads()) == 0 {
			continue
		}
		for i := range p.Disks {
			d := &p.Disks[i]
			if a.GetActivityId() != workflows.CopyActivityID(d.Key) || d.Phase != workflows.PhaseCopying {
				continue
			}
			var fp activities.RestoreFileProgress
			if err := converter.GetDefaultDataConverter().FromPayloads(a.GetHeartbeatDetails(), &fp); err != nil {
				return fmt.Errorf("decode heartbeat of %s: %w", a.GetActivityId(), err)
			}
			d.BytesTotal = d.CapacityBytes
			d.BytesDone = int64(min(max(fp.Percent, 0), 100) / 100 * float64(d.CapacityBytes))
		}
	}
	return nil
}

// renderProgressDetail prints what follows a status's head line: what the run waits for,
// its error and a line per disk.
func renderProgressDetail(out io.Writer, p workflows.Progress) error {
	if p.WaitingFor != "" {
		printf(out, "waiting for: %s\n", p.WaitingFor)
	}
	if p.Error != "" {
		printf(out, "error: %s\n", p.Error)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DISK\tMODE\tPHASE\tDONE\tTOTAL\tRATE")
	for _, d := range p.Disks {
		printf(tw, "%d\t%s\t%s\t%s\t%s\t%s/s\n", d.Key, orDash(d.Mode), d.Phase, humanBytes(d.BytesDone), humanBytes(d.BytesTotal), humanBytes(int64(d.Rate)))
	}
	return tw.Flush()
}

// pendingSteps names the steps a run waits on, for a message about a wait that ran out.
func pendingSteps(ctx context.Context, c client.Client, id string) string {
	desc, err := c.DescribeWorkflow(ctx, id, "")
	if err != nil {
		return fmt.Sprintf("cannot describe it: %v", err)
	}
	var steps []string
	for _, a := range desc.RawResponse.GetPendingActivities() {
		s := fmt.Sprintf("%s (%s, attempt %d", a.GetActivityType().GetName(),
			strings.ToLower(strings.TrimPrefix(a.GetState().String(), "PENDING_ACTIVITY_STATE_")), a.GetAttempt())
		if msg := a.GetLastFailure().GetMessage(); msg != "" {
			s += ", last failure: " + msg
		}
		steps = append(steps, s+")")
	}
	if len(steps) == 0 {
		return "no step pending"
	}
	return "pending: " + strings.Join(steps, "; ")
}

// runRow is one run in a list, from Temporal visibility.
type runRow struct {
	WorkflowID string    `json:"workflowId"`
	RunID      string    `json:"runId"`
	State      string    `json:"state"` // Temporal execution status
	Start      time.Time `json:"start"`
	End        time.Time `json:"end,omitzero"`
}

// listedRun is a runRow with the run's search attributes.
type listedRun struct {
	runRow
	attrs map[string]*commonpb.Payload
}

// keyword is the value of a Keyword search attribute, "" when the run has none.
func (r listedRun) keyword(name string) string {
	var v string
	if p, ok := r.attrs[name]; ok {
		_ = converter.GetDefaultDataConverter().FromPayload(p, &v)
	}
	return v
}

// listRuns returns at most limit runs matching a visibility query, newest first.
func listRuns(ctx context.Context, c client.Client, query string, limit int) ([]listedRun, error) {
	resp, err := c.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{Query: query, PageSize: int32(limit)})
	if err != nil {
		return nil, err
	}
	rows := make([]listedRun, 0, len(resp.GetExecutions()))
	for _, e := range resp.GetExecutions() {
		r := listedRun{runRow: runRow{
			WorkflowID: e.GetExecution().GetWorkflowId(), RunID: e.GetExecution().GetRunId(),
			State: strings.ToLower(strings.TrimPrefix(e.GetStatus().String(), "WORKFLOW_EXECUTION_STATUS_")),
			Start: e.GetStartTime().AsTime(),
		}, attrs: e.GetSearchAttributes().GetIndexedFields()}
		if e.GetStatus() != enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING {
			r.End = e.GetCloseTime().AsTime()
		}
		rows = append(rows, r)
		if len(rows) >= limit {
			break
		}
	}
	return rows, nil
}

// newCancelCommand cancels a running job of kind; after says what its cleanup undoes.
func newCancelCommand(kind, after string) *cobra.Command {
	return &cobra.Command{
		Use:   "cancel WORKFLOW-ID",
		Short: "Cancel a running " + kind + "; " + after,
		Args:  cobra.ExactArgs(1),
		RunE: withTemporal(func(cmd *cobra.Command, args []string, c client.Client) error {
			ctx := cmd.Context()
			if err := c.CancelWorkflow(ctx, args[0], ""); err != nil {
				return fmt.Errorf("cancel %s: %w", args[0], err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "cancel requested for %s; cleanup runs before it closes\n", args[0])
			return nil
		}),
	}
}
