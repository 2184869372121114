package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/api/workflowservice/v1"

	"github.com/diskferry/diskferry/internal/vsphere"
	"github.com/diskferry/diskferry/workflows"
)

// workflowDescriber is the part of the Temporal client the sweep needs.
type workflowDescriber interface {
	DescribeWorkflowExecution(ctx context.Context, workflowID, runID string) (*workflowservice.DescribeWorkflowExecutionResponse, error)
}

// sweeper removes backup snapshots whose workflow is closed: a run whose compensation
// never happened (worker killed, vCenter down at the time) leaves one behind, and it grows
// on the datastore until removed. A snapshot of a running workflow is never touched.
type sweeper struct {
	vc        *vsphere.Client
	workflows workflowDescriber
	log       *slog.Logger
}

// sweep looks at every backup snapshot in the inventory once; failures are logged and
// retried at the next sweep.
func (s *sweeper) sweep(ctx context.Context) {
	snaps, err := s.vc.SnapshotsByPrefix(ctx, workflows.SnapshotPrefix)
	if err != nil {
		s.log.Warn("snapshot sweep", "error", err)
		return
	}
	// Children first: removing a parent first would merge it into the child.
	for i := len(snaps) - 1; i >= 0; i-- {
		if err := s.sweepSnapshot(ctx, snaps[i]); err != nil {
			s.log.Warn("snapshot sweep", "vm", snaps[i].VMMoref, "snapshot", snaps[i].Moref, "error", err)
		}
	}
}

func (s *sweeper) sweepSnapshot(ctx context.Context, snap vsphere.Snapshot) error {
	workflowID, runID, ours := workflows.ParseSnapshotName(snap.Name)
	if !ours {
		return nil
	}
	open, err := s.runOpen(ctx, workflowID, runID)
	if err != nil || open {
		return err
	}
	vm, err := s.vc.FindVM(ctx, snap.VMMoref)
	if errors.Is(err, vsphere.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := s.vc.RemoveSnapshot(ctx, vm, snap.Moref); err != nil {
		return err
	}
	s.log.Warn("removed orphaned backup snapshot", "vm", snap.VMMoref, "snapshot", snap.Moref, "name", snap.Name,
		"workflowId", workflowID, "runId", runID)
	return nil
}

// runOpen reports whether the run that made a snapshot is still running; a run the server
// no longer knows is closed.
func (s *sweeper) runOpen(ctx context.Context, workflowID, runID string) (bool, error) {
	resp, err := s.workflows.DescribeWorkflowExecution(ctx, workflowID, runID)
	var notFound *serviceerror.NotFound
	switch {
	case errors.As(err, &notFound):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("describe workflow %s run %s: %w", workflowID, runID, err)
	}
	return resp.GetWorkflowExecutionInfo().GetStatus() == enums.WORKFLOW_EXECUTION_STATUS_RUNNING, nil
}
