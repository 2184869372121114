package lab

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.temporal.io/api/serviceerror"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"

	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/workflows"
)

// Bounds of the lab's teardown.
const (
	drainTimeout      = 3 * time.Minute  // schedules deleted, running backups cancelled and closed
	cancelGrace       = 60 * time.Second // a cancelled backup's cleanup, before it is terminated
	exportStopTimeout = 10 * time.Second
)

// shutdown stops everything the lab caused, while Temporal, the catalog, vcsim and sshd are
// still up: schedules are deleted and running backups cancelled (their cleanup runs on the
// workers) and waited for, then the workers stop, then the exports the hubs leave running by
// design (a restarted hub adopts them) are stopped by their pid files, and any data-plane
// process still serving the lab's files is killed.
func (l *Lab) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
	defer cancel()
	if err := l.drainWorkflows(ctx); err != nil {
		l.t.Errorf("lab teardown: %v", err)
	}
	l.mu.Lock()
	var names []string
	for name := range l.workers {
		names = append(names, name)
	}
	l.mu.Unlock()
	for _, name := range names {
		l.StopWorker(name)
	}
	if err := l.stopExports(ctx); err != nil {
		l.t.Errorf("lab teardown: %v", err)
	}
	for _, p := range l.DataPlaneProcesses() {
		pid, _, _ := strings.Cut(p, ":")
		if n, err := strconv.Atoi(pid); err == nil {
			l.t.Logf("lab teardown: killing leftover %s", p)
			_ = syscall.Kill(n, syscall.SIGKILL)
		}
	}
}

// drainWorkflows deletes the lab's schedules and cancels every running backup, waiting for
// each to close; one whose cleanup does not finish in cancelGrace is terminated.
func (l *Lab) drainWorkflows(ctx context.Context) error {
	c := l.Temporal.Client
	var errs []error
	schedules, err := c.ScheduleClient().List(ctx, client.ScheduleListOptions{PageSize: 100})
	if err != nil {
		return fmt.Errorf("list schedules: %w", err)
	}
	for schedules.HasNext() {
		s, err := schedules.Next()
		if err != nil {
			errs = append(errs, fmt.Errorf("list schedules: %w", err))
			break
		}
		if err := c.ScheduleClient().GetHandle(ctx, s.ID).Delete(ctx); err != nil {
			errs = append(errs, fmt.Errorf("delete schedule %s: %w", s.ID, err))
		}
	}
	resp, err := c.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
		Query: fmt.Sprintf("WorkflowType = %q AND ExecutionStatus = 'Running'", workflows.BackupWorkflowName),
	})
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("list running backups: %w", err))...)
	}
	for _, e := range resp.GetExecutions() {
		id, runID := e.GetExecution().GetWorkflowId(), e.GetExecution().GetRunId()
		l.t.Logf("lab teardown: cancelling backup %s still running", id)
		if err := c.CancelWorkflow(ctx, id, runID); err != nil {
			errs = append(errs, fmt.Errorf("cancel %s: %w", id, err))
		}
		start := time.Now()
		waitCtx, cancel := context.WithTimeout(ctx, cancelGrace)
		err := c.GetWorkflow(waitCtx, id, runID).Get(waitCtx, nil)
		timedOut := waitCtx.Err() != nil
		cancel()
		if !timedOut {
			l.t.Logf("lab teardown: backup %s closed after %s (%v)", id, time.Since(start).Round(time.Millisecond), err)
			continue
		}
		l.t.Logf("lab teardown: backup %s did not finish its cleanup in %s; terminating it", id, cancelGrace)
		var closed *serviceerror.NotFound // it closed meanwhile
		if err := c.TerminateWorkflow(ctx, id, runID, "lab teardown"); err != nil && !errors.As(err, &closed) {
			errs = append(errs, fmt.Errorf("terminate %s: %w", id, err))
		}
	}
	return errors.Join(errs...)
}

// stopExports stops every qemu-nbd whose pid file is in a hub's run dir.
func (l *Lab) stopExports(ctx context.Context) error {
	var errs []error
	for _, h := range l.Hubs {
		errs = append(errs, stopRunDirExports(ctx, h.RunDir))
	}
	return errors.Join(errs...)
}

func stopRunDirExports(ctx context.Context, runDir string) error {
	var errs []error
	err := filepath.WalkDir(runDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".pid") {
			return err
		}
		if err := qemu.StopPidFile(ctx, path, exportStopTimeout); err != nil {
			errs = append(errs, err)
		}
		return nil
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("walk %s: %w", runDir, err))
	}
	return errors.Join(errs...)
}
