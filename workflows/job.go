package workflows

import (
	"errors"
	"fmt"
	"strings"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/text"
)

// job is what every diskferry workflow run shares: its steps run through execute (options per
// step, the worker it waits for, a missing worker named), its undos in one saga, its state in
// a Progress, its job log in the Web UI's current details and its status in search attributes.
type job struct {
	// kind names the job in messages an operator reads: "backup", "restore", "mount".
	kind     string
	info     *workflow.Info
	started  time.Time
	undo     *compensations
	progress *Progress
	journal  *jobLog
	// workerWaitSeconds is the input's bound on waiting for a worker; 0: DefaultWorkerWait.
	workerWaitSeconds int
	// attributes are the search attributes that go with a status.
	attributes func(status string) []temporal.SearchAttributeUpdate
}

func newJob(ctx workflow.Context, kind, title string, workerWaitSeconds int, progress *Progress) job {
	return job{
		kind:              kind,
		info:              workflow.GetInfo(ctx),
		started:           progress.Started,
		undo:              &compensations{},
		progress:          progress,
		journal:           &jobLog{title: title},
		workerWaitSeconds: workerWaitSeconds,
	}
}

// watchCopyWaits keeps the job log's copy waits as the run's copies report them
// (CopyWaitSignal): a copy waiting on the SNA for a copy slot, and no longer once it runs.
func (j *job) watchCopyWaits(ctx workflow.Context) {
	signals := workflow.GetSignalChannel(ctx, activities.CopyWaitSignal)
	workflow.Go(ctx, func(ctx workflow.Context) {
		for {
			var w activities.CopyWait
			if more := signals.Receive(ctx, &w); !more {
				return
			}
			if w.WaitingFor == "" {
				delete(j.journal.copyWaits, w.DiskKey)
			} else {
				if j.journal.copyWaits == nil {
					j.journal.copyWaits = map[int32]string{}
				}
				j.journal.copyWaits[w.DiskKey] = text.Shorten(w.WaitingFor, maxWaitText)
			}
			j.journal.publish(ctx, j.journal.current)
		}
	})
}

// maxWaitText bounds what a signal may put in the job log.
const maxWaitText = 200

// workflowID is the run's workflow ID: what leases, exports and restored VMs are named by.
func (j *job) workflowID() string { return j.info.WorkflowExecution.ID }

// execute runs one activity by name with the options of its step and waits for its result.
func (j *job) execute(ctx workflow.Context, name, queue, summary string, in, out any) error {
	return j.executeAs(ctx, "", name, queue, summary, in, out)
}

// executeAs is execute under a given activity ID (empty: the SDK's), for steps clients
// look up by ID to read their heartbeats.
func (j *job) executeAs(ctx workflow.Context, activityID, name, queue, summary string, in, out any) error {
	opts := j.options(name, queue, summary)
	opts.ActivityID = activityID
	return j.executeWith(ctx, opts, name, in, out)
}

// executeWith runs one activity by name with the given options, the job log naming the worker
// it waits for meanwhile.
func (j *job) executeWith(ctx workflow.Context, opts workflow.ActivityOptions, name string, in, out any) error {
	j.waitFor(ctx, name, opts.TaskQueue)
	defer j.waitFor(ctx, "", "")
	return j.run(ctx, opts, name, in, out)
}

// run runs one activity and waits for its result, leaving what the job log says it waits for
// as it is.
func (j *job) run(ctx workflow.Context, opts workflow.ActivityOptions, name string, in, out any) error {
	err := workflow.ExecuteActivity(workflow.WithActivityOptions(ctx, opts), name, in).Get(ctx, out)
	return j.noWorker(err, name, opts.TaskQueue)
}

// workerWait is the schedule-to-start bound of the SNA and hub-host steps.
func (j *job) workerWait() time.Duration {
	if j.workerWaitSeconds > 0 {
		return time.Duration(j.workerWaitSeconds) * time.Second
	}
	return DefaultWorkerWait
}

// waitFor tells the job log which worker the run waits for; an empty name clears it. The
// shared hub queue has no worker-wait bound (options): its line names no deadline.
func (j *job) waitFor(ctx workflow.Context, name, queue string) {
	_, owner := queueOwner(queue)
	var what string
	switch {
	case name == "":
	case queue == activities.HubQueue:
		what = fmt.Sprintf("%s to run %s (task queue %s)", owner, name, queue)
	default:
		what = fmt.Sprintf("%s to run %s (task queue %s; the %s fails if no worker takes it within %s)",
			owner, name, queue, j.kind, j.workerWait())
	}
	j.waiting(ctx, what)
}

// waiting sets what the run waits for, in its progress and its job log; "" clears it.
func (j *job) waiting(ctx workflow.Context, what string) {
	j.progress.WaitingFor = what
	j.journal.waiting = what
	j.journal.publish(ctx, j.journal.current)
}

// queueOwner names who polls a task queue, as an operator knows it: the kind of worker
// ("SNA") and the one worker ("the SNA of site lab").
func queueOwner(queue string) (kind, owner string) {
	if site, ok := strings.CutPrefix(queue, activities.SNAQueue("")); ok {
		return "SNA", "the SNA of site " + site
	}
	if hub, ok := strings.CutPrefix(queue, activities.HubHostQueue("")); ok {
		return "hub worker", "the hub worker of host " + hub
	}
	return "worker", "a hub worker"
}

// noWorker turns a step nobody took from its queue (a schedule-to-start timeout, which
// Temporal does not retry) into a non-retryable error naming the queue and its owner.
func (j *job) noWorker(err error, name, queue string) error {
	var timeout *temporal.TimeoutError
	if !errors.As(err, &timeout) || timeout.TimeoutType() != enumspb.TIMEOUT_TYPE_SCHEDULE_TO_START {
		return err
	}
	kind, owner := queueOwner(queue)
	return temporal.NewNonRetryableApplicationError(
		fmt.Sprintf("no %s is polling %s: %s waited %s for %s (check the site or hub name and that its worker runs)",
			kind, queue, name, j.workerWait(), owner),
		activities.ErrNoWorker, err)
}

// hasErrorType reports whether err carries an application error of the type.
func hasErrorType(err error, errType string) bool {
	var appErr *temporal.ApplicationError
	return errors.As(err, &appErr) && appErr.Type() == errType
}

// rootMessage is the message of the innermost application error, without the layers of
// activity wrapping around it.
func rootMessage(err error) string {
	var appErr *temporal.ApplicationError
	if errors.As(err, &appErr) {
		return appErr.Message()
	}
	return err.Error()
}

func (j *job) step(ctx workflow.Context, format string, args ...any) {
	j.progress.Step = fmt.Sprintf(format, args...)
	j.journal.publish(ctx, j.progress.Step)
}

func (j *job) setStatus(ctx workflow.Context, status string) {
	j.progress.Status = status
	if j.attributes != nil {
		j.upsert(ctx, j.attributes(status)...)
	}
}

func (j *job) setPhase(key int32, phase string) {
	if p := j.progress.disk(key); p != nil {
		p.Phase = phase
	}
}

// upsert updates search attributes. The error is only the SDK's local check: the server checks the
// names when the task completes, and an unregistered one fails every workflow task of the run.
func (j *job) upsert(ctx workflow.Context, updates ...temporal.SearchAttributeUpdate) {
	if err := workflow.UpsertTypedSearchAttributes(ctx, updates...); err != nil {
		workflow.GetLogger(ctx).Warn("upsert search attributes", "error", err)
	}
}

// refuse ends a run whose input is invalid before any step ran.
func (j *job) refuse(ctx workflow.Context, err error) error {
	j.progress.Error = err.Error()
	j.setStatus(ctx, StatusFailed)
	j.journal.add(ctx, "refused: %v", err)
	return err
}

// cancelled reports whether the run ends cancelled: a cancelled run ends cancelled even when
// the step it stopped failed otherwise meanwhile (a copy that timed out while being cancelled).
func cancelled(ctx workflow.Context, err error) bool {
	return temporal.IsCanceledError(err) || temporal.IsCanceledError(ctx.Err())
}

// compensate runs the registered undos in reverse order and records the ones that failed.
// cleanupCtx must be disconnected from the run's cancel: compensation runs after a cancel too.
func (j *job) compensate(cleanupCtx workflow.Context, cause error) {
	for _, undoErr := range j.undo.runAll(cleanupCtx, cause) {
		workflow.GetLogger(cleanupCtx).Error("compensation failed", "error", undoErr)
		j.progress.UndoErrors = append(j.progress.UndoErrors, undoErr.Error())
		j.journal.add(cleanupCtx, "cleanup failed: %v", undoErr)
	}
}

// fail runs the compensations after err, records the outcome everywhere an operator looks
// and returns the run's error.
func (j *job) fail(ctx workflow.Context, err error) error {
	status := StatusFailed
	if cancelled(ctx, err) {
		status = StatusCancelled
	}
	// Compensation must run even though ctx may be cancelled.
	cleanupCtx, _ := workflow.NewDisconnectedContext(ctx)
	j.progress.Error = err.Error()
	// Nothing of a failed run is kept: a backup's targets go with the point, a restore's
	// disks are not verified.
	for i := range j.progress.Disks {
		j.progress.Disks[i].Phase = PhaseFailed
	}
	j.journal.add(cleanupCtx, "%s: %v; cleaning up", status, err)
	j.step(cleanupCtx, "cleaning up")
	j.compensate(cleanupCtx, err)
	j.setStatus(cleanupCtx, status)
	j.step(cleanupCtx, "%s", status)
	if status == StatusCancelled && !temporal.IsCanceledError(err) {
		// Only a canceled error closes the run as cancelled rather than failed.
		return ctx.Err()
	}
	return err
}

// pointStatusAttributes are the search attributes of a run on a restore point (restore,
// mount): its status in BackupStatus, so one query finds a VM's runs whatever their type,
// and the VM and site once known.
func (j *job) pointStatusAttributes(status string) []temporal.SearchAttributeUpdate {
	updates := []temporal.SearchAttributeUpdate{BackupStatusKey.ValueSet(status)}
	if j.progress.VM != "" {
		updates = append(updates, VMNameKey.ValueSet(j.progress.VM))
	}
	if j.progress.Site != "" {
		updates = append(updates, SiteKey.ValueSet(j.progress.Site))
	}
	return updates
}

// pointRef names the point a request asked for: by ID, or as the latest point of a VM.
func pointRef(point, vm string) string {
	if point != "" {
		return "point " + text.Shorten(point, 80)
	}
	return "the latest point of VM " + text.Shorten(vm, MaxVMRefLength)
}

// copyAll runs copy for each disk (by key) in parallel, each disk in phase copying from now;
// the run waits for activity on queue meanwhile. The first failure cancels the other copies
// and waits for them to stop, so compensation never pulls an export or a snapshot from under
// a running copy.
func (j *job) copyAll(ctx workflow.Context, activity, queue string, keys []int32, copy func(ctx workflow.Context, i int) error) error {
	j.waitFor(ctx, activity, queue)
	copyCtx, cancelCopies := workflow.WithCancel(ctx)
	defer cancelCopies()

	var firstErr error
	wg := workflow.NewWaitGroup(ctx)
	for i, key := range keys {
		j.setPhase(key, PhaseCopying)
		j.progress.disk(key).CopyStarted = workflow.Now(ctx)
		wg.Add(1)
		workflow.Go(copyCtx, func(copyCtx workflow.Context) {
			defer wg.Done()
			if err := copy(copyCtx, i); err != nil && firstErr == nil {
				firstErr = err
				cancelCopies()
			}
		})
	}
	wg.Wait(ctx)
	j.waitFor(ctx, "", "")
	return firstErr
}
