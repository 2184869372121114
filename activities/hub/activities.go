// Package hub adapts the hub's mechanisms (catalog, port leases, repository, qemu) to
// Temporal activities: the host-agnostic ones on diskferry-hub and the ones bound to this
// host's files and qemu-nbd processes on diskferry-hub.<hubID>.
package hub

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/heartbeat"
	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/coverage"
	"github.com/diskferry/diskferry/internal/nbd"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/text"
)

// Settings of one hub host.
type Settings struct {
	HubID string
	// ExportCache is qemu-nbd's --cache for targets; none and directsync also get native AIO.
	ExportCache string
	// RunDir holds the exports' pid files and logs, so a restarted worker finds them again,
	// and their sockets in RunDir/exports.
	RunDir      string
	StopTimeout time.Duration // SIGTERM grace before SIGKILL
	// WorkflowClosed asks Temporal whether a workflow has closed. Reconcile needs it; PlanBackup
	// uses it to take over a VM whose running point belongs to a closed workflow (terminated
	// workflows run no compensation). Nil: both treat every workflow as running.
	WorkflowClosed catalog.WorkflowClosed
	// CountVerified is told how many bytes each successful verification read; optional.
	CountVerified func(bytes int64)
	// RepositoryMargin is the free space PrepareTarget leaves in the repository's file
	// system; the zero value is the default (repo.Margin).
	RepositoryMargin repo.Margin
	// HubHeartbeat is how often hub workers record themselves in the catalog
	// (DISKFERRY_HUB_HEARTBEAT): a hub seen within 3 heartbeats is alive for placement. Zero:
	// 10s.
	HubHeartbeat time.Duration
	// PortsFree tells a run waiting in this hub's line for ports that it would get them now
	// (PortsFreeSignal); a failure only costs the run its wait until its next try. Nil:
	// waiting runs find out at their next try.
	PortsFree func(ctx context.Context, workflowID string) error
	// RetentionRunning returns the workflow ID of the running retention started for a VM by
	// this name or moref, "" when none runs. PlanBackup and ResolvePoint wait while one runs: a
	// retention merges and removes the files of the VM's chain. Nil: none ever runs.
	RetentionRunning func(ctx context.Context, vmRef string) (workflowID string, err error)
}

// Activities are the hub activities. One instance per worker; safe for concurrent use.
type Activities struct {
	store    *catalog.Store
	ports    *catalog.Ports
	layout   repo.Layout
	settings Settings
	log      *slog.Logger

	// exporting is held shared by StartExport and StopExport and exclusively by Reconcile,
	// so Reconcile never judges an export this process is starting or stopping.
	exporting sync.RWMutex
	// verifying holds the run-dir entries of verifications in progress in this process, so
	// Reconcile only stops the leftovers of a crashed worker.
	mu        sync.Mutex
	verifying map[string]bool
}

// New returns the hub activities.
func New(store *catalog.Store, ports *catalog.Ports, layout repo.Layout, settings Settings, log *slog.Logger) (*Activities, error) {
	if settings.HubID == "" {
		return nil, errors.New("hub activities: empty hub ID")
	}
	if settings.RunDir == "" {
		return nil, errors.New("hub activities: empty run dir")
	}
	if settings.StopTimeout <= 0 {
		settings.StopTimeout = 10 * time.Second
	}
	if settings.WorkflowClosed == nil {
		settings.WorkflowClosed = func(context.Context, string) (bool, error) { return false, nil }
	}
	if settings.PortsFree == nil {
		settings.PortsFree = func(context.Context, string) error { return nil }
	}
	if settings.RetentionRunning == nil {
		settings.RetentionRunning = func(context.Context, string) (string, error) { return "", nil }
	}
	if settings.HubHeartbeat <= 0 {
		settings.HubHeartbeat = 10 * time.Second
	}
	if settings.CountVerified == nil {
		settings.CountVerified = func(int64) {}
	}
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(settings.RunDir, 0o750); err != nil {
		return nil, fmt.Errorf("hub activities: run dir: %w", err)
	}
	// Owner and group only, whatever the umask: the group is how the SNA's ssh account on
	// this hub reaches the export sockets (docs/operations.md), and nobody else may.
	exports := filepath.Join(settings.RunDir, exportsDir)
	if err := os.MkdirAll(exports, 0o750); err != nil {
		return nil, fmt.Errorf("hub activities: exports dir: %w", err)
	}
	if err := os.Chmod(exports, 0o750); err != nil {
		return nil, fmt.Errorf("hub activities: exports dir: %w", err)
	}
	return &Activities{store: store, ports: ports, layout: layout, settings: settings, log: log, verifying: map[string]bool{}}, nil
}

// RegisterShared registers the host-agnostic activities (for diskferry-hub).
func (a *Activities) RegisterShared(w worker.ActivityRegistry) {
	reg := func(f any, name string) { w.RegisterActivityWithOptions(f, activity.RegisterOptions{Name: name}) }
	reg(a.PlanBackup, activities.PlanBackupName)
	reg(a.AllocatePort, activities.AllocatePortName)
	reg(a.AllocatePorts, activities.AllocatePortsName)
	reg(a.ReleasePorts, activities.ReleasePortsName)
	reg(a.CommitPoint, activities.CommitPointName)
	reg(a.FailPoint, activities.FailPointName)
	reg(a.ResolvePoint, activities.ResolvePointName)
	reg(a.MarkRestoredInPlace, activities.MarkRestoredInPlaceName)
	reg(a.PlanRetention, activities.PlanRetentionName)
}

// RegisterHost registers the activities bound to this host (for diskferry-hub.<hubID>).
func (a *Activities) RegisterHost(w worker.ActivityRegistry) {
	reg := func(f any, name string) { w.RegisterActivityWithOptions(f, activity.RegisterOptions{Name: name}) }
	reg(a.PrepareTarget, activities.PrepareTargetName)
	reg(a.DiscardTarget, activities.DiscardTargetName)
	reg(a.StartExport, activities.StartExportName)
	reg(a.StopExport, activities.StopExportName)
	reg(a.VerifyTarget, activities.VerifyTargetName)
	reg(a.RestoreFile, activities.RestoreFileName)
	reg(a.ApplyRetention, activities.ApplyRetentionName)
}

func badInput(format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	return temporal.NewNonRetryableApplicationError(msg, activities.ErrBadInput, nil)
}

// classify makes the errors a retry cannot fix (invalid request, unknown point, a point no
// longer running, a path outside the repository, a full repository) non-retryable; anything
// else (database or disk trouble) stays retryable.
func classify(what string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, catalog.ErrInvalid), errors.Is(err, catalog.ErrPointComplete), errors.Is(err, catalog.ErrPointFailed),
		errors.Is(err, repo.ErrOutsideRoot), errors.Is(err, repo.ErrInvalidName):
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("%s: %v", what, err), activities.ErrBadInput, nil)
	case errors.Is(err, catalog.ErrNotFound):
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("%s: %v", what, err), activities.ErrNotFound, nil)
	case errors.Is(err, syscall.ENOSPC):
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("%s: the repository is full: %v", what, err), activities.ErrNoSpace, nil)
	default:
		return fmt.Errorf("%s: %w", what, err)
	}
}

// PlanBackup decides full or incremental per disk from the catalog and opens the restore
// point (status running). Idempotent per workflow.
func (a *Activities) PlanBackup(ctx context.Context, in activities.PlanBackupInput) (activities.Plan, error) {
	switch in.Mode {
	case "", activities.ModeAuto, activities.ModeFull, activities.ModeIncremental:
	default:
		return activities.Plan{}, badInput("plan backup: mode %q is not auto, full or incremental", in.Mode)
	}
	if n := in.VM.Name; n == "" || len(n) > maxVMNameLength || !utf8.ValidString(n) || strings.ContainsFunc(n, unicode.IsControl) {
		return activities.Plan{}, badInput("plan backup: VM name %q is empty, longer than %d bytes or has control characters",
			text.Shorten(n, 80), maxVMNameLength)
	}
	disks, err := selectDisks(in.VM.Disks, in.DiskKeys)
	if err != nil {
		return activities.Plan{}, err
	}
	catDisks := make([]catalog.Disk, len(in.VM.Disks))
	for i, d := range in.VM.Disks {
		catDisks[i] = catalog.Disk{Key: d.Key, Label: d.Label, CapacityBytes: d.CapacityBytes, BackingFile: d.BackingFile}
	}
	vm, err := a.store.UpsertVM(ctx, catalog.VM{InstanceUUID: in.VM.InstanceUUID, Moref: in.VM.Moref, Name: in.VM.Name}, catDisks)
	if err != nil {
		return activities.Plan{}, classify("plan backup of "+in.VM.Name, err)
	}
	if err := a.waitForRetention(ctx, "plan backup of "+in.VM.Name, vm); err != nil {
		return activities.Plan{}, err
	}
	// The mark of an in-place restore (MarkRestoredInPlace) makes every disk full, once the
	// restore's workflow closed: until then it may still be writing the disks.
	if vm, err = a.store.GetVM(ctx, vm.ID); err != nil {
		return activities.Plan{}, fmt.Errorf("plan backup of %s: %w", in.VM.Name, err)
	}
	if vm.RestoreWorkflowID != "" && !a.workflowClosed(ctx, "in-place restore", vm.RestoreWorkflowID) {
		return activities.Plan{}, restoreRunning(in.VM.Name, vm.RestoreWorkflowID)
	}
	last, err := a.store.LastCompletePoint(ctx, vm.ID)
	hasLast := err == nil
	if err != nil && !errors.Is(err, catalog.ErrNotFound) {
		return activities.Plan{}, fmt.Errorf("plan backup of %s: %w", in.VM.Name, err)
	}

	// A VM with a complete point stays on its chain's hub; a new chain is placed by OpenPoint
	// (docs/architecture.md, Placement).
	req := catalog.OpenPointRequest{
		WorkflowID: in.WorkflowID, RunID: in.RunID, Site: in.Site,
		VMID: vm.ID, Mode: catalog.ModeFull, VMConfig: in.VM.Config, RestoreClosed: vm.RestoreWorkflowID,
	}
	plan := activities.Plan{Mode: activities.ModeIncremental}
	if hasLast {
		req.Hub = last.Hub
		if plan.Note, err = a.chainNote(ctx, vm, last.Hub); err != nil {
			return activities.Plan{}, err
		}
	} else {
		req.Choose = a.chooseHub(vm)
	}
	anyIncremental := false
	for _, d := range disks {
		dp := decideDisk(in.Mode, in.VM.CBTEnabled, vm.NextFullReason, d, last, hasLast)
		if dp.Mode == activities.ModeIncremental {
			anyIncremental = true
		} else {
			plan.Mode = activities.ModeFull // the contract: full if any disk is full
		}
		plan.Disks = append(plan.Disks, dp)
	}
	if anyIncremental {
		// In the catalog the point is incremental as soon as one disk depends on the parent.
		req.Mode = catalog.ModeIncremental
		req.ParentID = last.ID
	}
	point, err := a.openPoint(ctx, req)
	var running *catalog.BackupRunningError
	if errors.As(err, &running) {
		return activities.Plan{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("a backup of VM %s is already running (workflow %s, point %s)", in.VM.Name, running.WorkflowID, running.PointID),
			activities.ErrBackupRunning, nil)
	}
	var restoring *catalog.RestoreRunningError
	if errors.As(err, &restoring) {
		// An in-place restore marked the VM since it was read.
		return activities.Plan{}, restoreRunning(in.VM.Name, restoring.WorkflowID)
	}
	var noHub *temporal.ApplicationError
	if errors.As(err, &noHub) {
		return activities.Plan{}, noHub
	}
	if err != nil {
		return activities.Plan{}, classify("open restore point for "+in.VM.Name, err)
	}
	plan.HubID, plan.PointID = point.Hub, point.ID
	return plan, nil
}

// restoreRunning refuses a backup of the VM while an in-place restore of it runs.
func restoreRunning(vmName, workflowID string) error {
	return temporal.NewNonRetryableApplicationError(
		fmt.Sprintf("an in-place restore of VM %s is running (workflow %s)", vmName, workflowID), activities.ErrBackupRunning, nil)
}

// waitForRetention fails retryably (ErrBusy) while the VM's retention runs, so the step is
// retried until it ended (bounded by the step's retry policy): a backup must not build on, and
// a restore or mount must not read, a chain whose files are being merged and removed. A
// retention started right after this check finds the point the backup opens, or the export a
// restore starts, and is skipped (PlanRetention's guard).
func (a *Activities) waitForRetention(ctx context.Context, what string, vm catalog.VM) error {
	// A retention is named by the reference it was asked for: a backup's by the VM's name, an
	// operator's by name or moref.
	for _, ref := range []string{vm.Name, vm.Moref} {
		id, err := a.settings.RetentionRunning(ctx, ref)
		if err != nil {
			return fmt.Errorf("%s: is a retention of VM %s running: %w", what, vm.Name, err)
		}
		if id != "" {
			return temporal.NewApplicationError(fmt.Sprintf("%s: the retention of VM %s is running (workflow %s); waiting until it ends",
				what, vm.Name, id), activities.ErrBusy)
		}
	}
	return nil
}

// openPoint opens the point; when the VM's running point belongs to a workflow that closed
// without finishing it (terminated, timed out), that point is marked failed and the open retried.
func (a *Activities) openPoint(ctx context.Context, req catalog.OpenPointRequest) (catalog.Point, error) {
	point, err := a.store.OpenPoint(ctx, req)
	var running *catalog.BackupRunningError
	if !errors.As(err, &running) {
		return point, err
	}
	abandoned, failErr := a.failAbandoned(ctx, running.PointID, running.WorkflowID)
	if failErr != nil {
		return catalog.Point{}, failErr
	}
	if !abandoned {
		return point, err
	}
	return a.store.OpenPoint(ctx, req)
}

// failAbandoned marks the running point failed when its workflow closed without finishing
// it (terminated, timed out: no compensation ran) and says so. A workflow Temporal cannot
// tell about counts as open.
func (a *Activities) failAbandoned(ctx context.Context, pointID, workflowID string) (bool, error) {
	if !a.workflowClosed(ctx, "running backup", workflowID) {
		return false, nil
	}
	a.log.WarnContext(ctx, "failing the abandoned point of a closed workflow", "point", pointID, "workflow", workflowID)
	if err := a.store.FailPoint(ctx, pointID, "workflow "+workflowID+" closed without finishing the backup"); err != nil &&
		!errors.Is(err, catalog.ErrPointComplete) {
		return false, err
	}
	return true, nil
}

// workflowClosed asks Temporal whether the workflow of a backup or restore (what) closed;
// when Temporal cannot tell, the workflow counts as open.
func (a *Activities) workflowClosed(ctx context.Context, what, workflowID string) bool {
	closed, err := a.settings.WorkflowClosed(ctx, workflowID)
	if err != nil {
		a.log.WarnContext(ctx, "cannot tell whether the "+what+"'s workflow closed", "workflow", workflowID, "err", err)
		return false
	}
	return closed
}

// maxVMNameLength is what the catalog keeps of a VM name (vSphere allows 80 characters).
const maxVMNameLength = 255

func selectDisks(all []activities.Disk, keys []int32) ([]activities.Disk, error) {
	if len(all) == 0 {
		return nil, badInput("plan backup: the VM has no disks")
	}
	if len(keys) == 0 {
		return all, nil
	}
	byKey := map[int32]activities.Disk{}
	for _, d := range all {
		byKey[d.Key] = d
	}
	var out []activities.Disk
	for _, k := range keys {
		d, ok := byKey[k]
		if !ok {
			return nil, badInput("plan backup: the VM has no disk with key %d", k)
		}
		if slices.ContainsFunc(out, func(o activities.Disk) bool { return o.Key == k }) {
			// It would make two targets, exports and copies of one disk.
			return nil, badInput("plan backup: disk %d is listed twice", k)
		}
		out = append(out, d)
	}
	return out, nil
}

// decideDisk picks full or incremental for one disk (docs/architecture.md, Full or incremental).
// A non-empty nextFull (the VM's mark after an in-place restore) makes the disk full with
// that reason.
func decideDisk(mode string, cbt bool, nextFull string, d activities.Disk, last catalog.Point, hasLast bool) activities.DiskPlan {
	dp := activities.DiskPlan{Key: d.Key, CapacityBytes: d.CapacityBytes, Mode: activities.ModeFull}
	var prev *catalog.PointDisk
	if hasLast {
		for i := range last.Disks {
			if last.Disks[i].Key == d.Key {
				prev = &last.Disks[i]
			}
		}
	}
	switch {
	case nextFull != "":
		dp.Reason = nextFull
	case mode == activities.ModeFull:
		dp.Reason = "full backup requested"
	case !cbt:
		dp.Reason = "changed block tracking is off on the VM"
	case !hasLast:
		dp.Reason = "no previous restore point"
	case prev == nil:
		dp.Reason = "disk not in the previous restore point"
	case prev.CapacityBytes != d.CapacityBytes:
		dp.Reason = fmt.Sprintf("disk resized from %d to %d bytes", prev.CapacityBytes, d.CapacityBytes)
	case prev.ChangeID == "":
		dp.Reason = "previous restore point has no changeId"
	case d.ChangeID == "":
		// CBT is on but not active yet (it starts at the next stun): no changes to ask for.
		dp.Reason = "the disk reports no changeId yet (changed block tracking not active)"
	case changeIDEpoch(d.ChangeID) != changeIDEpoch(prev.ChangeID):
		dp.Reason = "changed block tracking was reset since the previous restore point"
	default:
		dp.Mode = activities.ModeIncremental
		dp.ParentPath = prev.Path
		dp.PrevChangeID = prev.ChangeID
	}
	return dp
}

// changeIDEpoch is the UUID part of a VMware changeId ("<uuid>/<sequence>"); a new UUID
// means CBT was reset and older changeIds are meaningless.
func changeIDEpoch(id string) string {
	epoch, _, _ := strings.Cut(id, "/")
	return epoch
}

// AllocatePort leases a port for (workflow, disk); the same pair gets the same port back.
// Runs that started before the port-wait change lease disk by disk through it.
func (a *Activities) AllocatePort(ctx context.Context, in activities.AllocatePortInput) (int, error) {
	port, err := a.ports.Allocate(ctx, in.HubID, in.WorkflowID, in.DiskKey)
	return port, classifyLease(in.HubID, fmt.Sprintf("allocate port for disk %d", in.DiskKey), err)
}

// AllocatePorts leases a port for every disk of the workflow at once, or none: a job never
// holds some ports while it waits for others. Too few free ports is ErrPortsExhausted with
// the hub, its range and the counts as details (PortsExhausted): leases free up as other
// jobs finish, so it is retryable unless the caller's policy says otherwise (the workflows
// wait for ports with their own timer and say so). More disks than the hub has ports is
// BadInput.
func (a *Activities) AllocatePorts(ctx context.Context, in activities.AllocatePortsInput) ([]int, error) {
	ports, err := a.ports.AllocateAll(ctx, in.HubID, in.WorkflowID, in.DiskKeys)
	return ports, classifyLease(in.HubID, fmt.Sprintf("allocate ports for disks %v", in.DiskKeys), err)
}

// classifyLease turns the catalog's *PortsExhaustedError into ErrPortsExhausted with its
// details, and everything else as classify does.
func classifyLease(hubID, what string, err error) error {
	var exhausted *catalog.PortsExhaustedError
	if errors.As(err, &exhausted) {
		rng := exhausted.Range
		return temporal.NewApplicationErrorWithOptions(fmt.Sprintf("no free export port on hub %s: %v", hubID, err),
			activities.ErrPortsExhausted, temporal.ApplicationErrorOptions{
				Details: []any{activities.PortsExhausted{HubID: hubID, Ports: rng.Size(), First: rng.First, Last: rng.Last,
					Needed: exhausted.Needed, Free: exhausted.Free, Ahead: exhausted.Ahead}},
			})
	}
	return classify(what, err)
}

// ReleasePorts frees every lease of the workflow and takes it out of the hub's line for
// ports, then wakes the runs in line that the free ports now fit; idempotent.
func (a *Activities) ReleasePorts(ctx context.Context, in activities.ReleasePortsInput) error {
	if _, err := a.ports.ReleaseWorkflow(ctx, in.HubID, in.WorkflowID); err != nil {
		return classify("release ports", err)
	}
	a.wakePortWaiters(ctx, in.HubID)
	return nil
}

// wakePortWaiters signals the runs in hub's line for ports that would get them now. Best
// effort: a run not woken asks again at its next timer (30 s at most), so failures are
// only logged.
func (a *Activities) wakePortWaiters(ctx context.Context, hub string) {
	ready, err := a.ports.Ready(ctx, hub)
	if err != nil {
		a.log.WarnContext(ctx, "cannot list the runs waiting for ports", "hub", hub, "err", err)
		return
	}
	for _, id := range ready {
		if err := a.settings.PortsFree(ctx, id); err != nil {
			a.log.WarnContext(ctx, "cannot wake a run waiting for ports", "hub", hub, "workflow", id, "err", err)
			continue
		}
		a.log.InfoContext(ctx, "woke a run waiting for ports", "hub", hub, "workflow", id)
	}
}

// CommitPoint marks the point complete with its disks' changeIds; only then is it usable.
func (a *Activities) CommitPoint(ctx context.Context, in activities.CommitPointInput) error {
	disks := make([]catalog.PointDisk, len(in.Disks))
	for i, d := range in.Disks {
		disks[i] = catalog.PointDisk{
			Key: d.Key, Path: d.Path, ParentPath: d.ParentPath, Mode: d.Mode, Reason: d.Reason, ChangeID: d.ChangeID,
			CapacityBytes: d.CapacityBytes, BytesRead: d.BytesRead, BytesWritten: d.BytesWritten,
			BytesZeroed: d.BytesZeroed, AllocatedBytes: d.AllocatedBytes, Duration: d.Duration, Digest: d.Digest,
		}
	}
	_, err := a.store.CompletePoint(ctx, in.PointID, disks)
	return classify("commit point "+in.PointID, err)
}

// FailPoint marks the point failed with the error; idempotent, and an unknown point counts
// as done. A complete point is never turned failed: that is a non-retryable error. Its files
// are the workflow's to discard (DiscardTarget on the host holding them).
func (a *Activities) FailPoint(ctx context.Context, in activities.FailPointInput) error {
	err := a.store.FailPoint(ctx, in.PointID, in.Error)
	if errors.Is(err, catalog.ErrNotFound) {
		return nil
	}
	return classify("fail point "+in.PointID, err)
}

// PrepareTarget creates the disk's qcow2: new for a full copy, an overlay on the previous
// point's file for an incremental. A retried attempt replaces what its predecessor made; the
// point must still be running, so a finished point's file is never replaced.
func (a *Activities) PrepareTarget(ctx context.Context, in activities.PrepareTargetInput) (activities.Target, error) {
	point, err := a.store.GetPoint(ctx, in.PointID)
	if err != nil {
		return activities.Target{}, classify("prepare target", err)
	}
	if point.Status != catalog.StatusRunning {
		return activities.Target{}, badInput("prepare target: point %s is %s, not running", in.PointID, point.Status)
	}
	path, err := a.layout.TargetPath(in.VM.Name, in.VM.Moref, in.PointID, in.Disk.Key)
	if err != nil {
		return activities.Target{}, classify("prepare target", err)
	}
	switch in.Disk.Mode {
	case activities.ModeFull:
	case activities.ModeIncremental:
		if !a.layout.Contains(in.Disk.ParentPath) {
			return activities.Target{}, badInput("prepare target: parent %q is outside the repository", in.Disk.ParentPath)
		}
		if _, statErr := os.Stat(in.Disk.ParentPath); statErr != nil {
			return activities.Target{}, temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("prepare target: chain broken, parent %s: %v (run a full backup)", in.Disk.ParentPath, statErr),
				activities.ErrNotFound, nil)
		}
	default:
		return activities.Target{}, badInput("prepare target: disk %d has mode %q", in.Disk.Key, in.Disk.Mode)
	}
	if _, err := a.layout.EnsurePointDir(in.VM.Name, in.VM.Moref, in.PointID); err != nil {
		return activities.Target{}, classify("prepare target", err)
	}
	if err := a.layout.RemoveTarget(path); err != nil {
		return activities.Target{}, classify("prepare target", err)
	}
	if err := a.checkSpace(in.Disk); err != nil {
		return activities.Target{}, err
	}
	if in.Disk.Mode == activities.ModeFull {
		err = qemu.CreateImage(ctx, path, in.Disk.CapacityBytes)
	} else {
		err = qemu.CreateOverlay(ctx, path, in.Disk.ParentPath)
	}
	if err != nil {
		return activities.Target{}, classify("prepare target "+path, err)
	}
	err = a.store.AddPointDisk(ctx, in.PointID, catalog.PointDisk{
		Key: in.Disk.Key, Path: path, ParentPath: in.Disk.ParentPath, Mode: in.Disk.Mode, Reason: in.Disk.Reason,
		CapacityBytes: in.Disk.CapacityBytes,
	})
	if err != nil {
		return activities.Target{}, classify("prepare target "+path, err)
	}
	return activities.Target{DiskKey: in.Disk.Key, Path: path}, nil
}

// checkSpace refuses a disk whose worst case would not fit (requireSpace), so the backup
// ends with the numbers instead of meeting ENOSPC halfway. The worst case is the disk's
// capacity, for an incremental too: how much changed is known only once the copy runs.
func (a *Activities) checkSpace(d activities.DiskPlan) error {
	return a.requireSpace("prepare target", fmt.Sprintf("disk %d", d.Key), d.CapacityBytes,
		fmt.Sprintf("%s copy of a %s disk", d.Mode, sizeText(d.CapacityBytes)))
}

// requireSpace is a non-retryable ErrNoSpace, naming op, subject and why it needs that much,
// when need bytes do not fit in the repository's free space minus the margin. Space is not
// reserved: operations checking at the same time each see the same free space.
func (a *Activities) requireSpace(op, subject string, need int64, why string) error {
	space, err := a.layout.Space()
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	margin := a.settings.RepositoryMargin.Of(space.Total)
	if need <= space.Free-margin {
		return nil
	}
	return temporal.NewNonRetryableApplicationError(fmt.Sprintf(
		"%s: not enough space in the repository %s for %s: it needs up to %d bytes (%s), "+
			"%d bytes are free and %d bytes are kept free as the margin (DISKFERRY_REPOSITORY_MARGIN %s)",
		op, a.layout.Root, subject, need, why, space.Free, margin, a.settings.RepositoryMargin), activities.ErrNoSpace, nil)
}

// sizeText is a byte count for people, in binary units.
func sizeText(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// DiscardTarget deletes an unfinished target and, once empty, its point directory. The
// path comes from the layout, as PrepareTarget made it; a complete point is never touched.
func (a *Activities) DiscardTarget(ctx context.Context, in activities.DiscardTargetInput) error {
	point, err := a.store.GetPoint(ctx, in.PointID)
	if err != nil {
		return classify("discard target", err)
	}
	if point.Status == catalog.StatusComplete {
		return badInput("discard target: point %s is complete", in.PointID)
	}
	path, err := a.layout.TargetPath(in.VMName, in.VMMoref, in.PointID, in.DiskKey)
	if err != nil {
		return classify("discard target", err)
	}
	if err := a.layout.RemoveTarget(path); err != nil {
		return classify("discard target", err)
	}
	// The point directory goes once its last disk is gone; a sibling still there keeps it.
	// RemoveTarget checked that the parent is a point directory inside the root.
	if err := os.Remove(filepath.Dir(path)); err != nil && !errors.Is(err, os.ErrNotExist) && !isNotEmpty(err) {
		return fmt.Errorf("discard target: %w", err)
	}
	return nil
}

func (a *Activities) pidFile(port int) string {
	return filepath.Join(a.settings.RunDir, fmt.Sprintf("export-%d.pid", port))
}

// exportsDir is the run dir's directory of export sockets.
const exportsDir = "exports"

// ExportSocket is the unix socket of the export of a leased port, in the hub's run dir:
// <run dir>/exports/port-<port>.sock. The sshd configuration of the SNA's account names
// these paths (docs/operations.md).
func ExportSocket(runDir string, port int) string {
	return filepath.Join(runDir, exportsDir, fmt.Sprintf("port-%d.sock", port))
}

// ExportName is the NBD export name of a disk's target.
func ExportName(diskKey int32) string { return fmt.Sprintf("disk-%d", diskKey) }

// serveTarget serves a target with qemu-nbd on the unix socket of its port; a running
// export of the same target is returned as is.
func (a *Activities) serveTarget(ctx context.Context, port int, path string, diskKey int32, connections int, readOnly bool) (*qemu.Export, error) {
	exp, err := qemu.Start(ctx, qemu.ExportOptions{
		Path: path, Socket: ExportSocket(a.settings.RunDir, port), Name: ExportName(diskKey),
		Cache: a.settings.ExportCache, AIO: exportAIO(a.settings.ExportCache),
		Connections: connections, PidFile: a.pidFile(port), ReadOnly: readOnly, Logger: a.log,
	})
	if err != nil {
		return nil, err
	}
	// Group-writable, for the SNA's ssh account in the hub worker's group (connecting to a
	// unix socket needs write permission); the exports directory keeps everyone else out.
	if err := os.Chmod(exp.Socket, 0o660); err != nil {
		if stopErr := exp.Stop(context.WithoutCancel(ctx), a.settings.StopTimeout); stopErr != nil {
			a.log.Error("stop export whose socket could not be opened to the tunnel", "port", port, "err", stopErr)
		}
		return nil, fmt.Errorf("export socket: %w", err)
	}
	return exp, nil
}

// StartExport serves the target with qemu-nbd on the unix socket of the port leased to
// (workflow, disk) and records it in the catalog. Idempotent: an export already serving
// the same file on the port, read-only or not as asked, is recorded and returned as is.
// ReadOnly serves a complete point (its backing chain opened read-only too) for a restore
// or a mount: clients' writes fail.
func (a *Activities) StartExport(ctx context.Context, in activities.StartExportInput) (activities.Export, error) {
	a.exporting.RLock()
	defer a.exporting.RUnlock()
	if !a.layout.Contains(in.Path) {
		return activities.Export{}, badInput("start export: %q is outside the repository", in.Path)
	}
	// Reconcile stops exports without a lease, so starting one without it would be undone.
	leases, err := a.ports.ListLeases(ctx, a.settings.HubID)
	if err != nil {
		return activities.Export{}, fmt.Errorf("start export on port %d: %w", in.Port, err)
	}
	if !slices.ContainsFunc(leases, func(l catalog.Lease) bool {
		return l.Port == in.Port && l.WorkflowID == in.WorkflowID && l.DiskKey == in.DiskKey
	}) {
		return activities.Export{}, badInput("start export: port %d on hub %s is not leased to workflow %s disk %d",
			in.Port, a.settings.HubID, in.WorkflowID, in.DiskKey)
	}
	pidFile := a.pidFile(in.Port)
	if running, err := qemu.Find(pidFile); err == nil && (running.Path != in.Path || running.ReadOnly != in.ReadOnly) {
		return activities.Export{}, fmt.Errorf("start export on port %d: already serving %s (read-only %t): %w",
			in.Port, running.Path, running.ReadOnly, qemu.ErrPortInUse)
	}
	// Start returns the running export when a previous attempt started it.
	exp, err := a.serveTarget(ctx, in.Port, in.Path, in.DiskKey, in.Connections, in.ReadOnly)
	if err != nil {
		return activities.Export{}, fmt.Errorf("start export %s on port %d: %w", in.Path, in.Port, err)
	}
	err = a.store.RecordExport(ctx, catalog.Export{
		Hub: a.settings.HubID, Port: in.Port, PID: exp.PID, Path: in.Path, WorkflowID: in.WorkflowID, DiskKey: in.DiskKey,
		ReadOnly: in.ReadOnly,
	})
	if err != nil {
		if stopErr := exp.Stop(context.WithoutCancel(ctx), a.settings.StopTimeout); stopErr != nil {
			a.log.Error("stop unrecorded export", "port", in.Port, "err", stopErr)
		}
		return activities.Export{}, classify(fmt.Sprintf("record export on port %d", in.Port), err)
	}
	return activities.Export{DiskKey: in.DiskKey, Port: in.Port, Name: ExportName(in.DiskKey), PID: exp.PID, Path: in.Path,
		Socket: exp.Socket}, nil
}

// StopExport stops the port's export (qemu-nbd flushes on SIGTERM) and forgets it; already
// gone is success. An export serving another file on the port (a late retry after the port
// went to another backup) is left alone.
func (a *Activities) StopExport(ctx context.Context, in activities.StopExportInput) error {
	a.exporting.RLock()
	defer a.exporting.RUnlock()
	pidFile := a.pidFile(in.Port)
	if running, err := qemu.Find(pidFile); err == nil && in.Path != "" && running.Path != in.Path {
		a.log.WarnContext(ctx, "stop export: port serves another file; leaving it", "port", in.Port, "want", in.Path, "serving", running.Path)
		return nil
	}
	if err := qemu.StopPidFile(ctx, pidFile, a.settings.StopTimeout); err != nil {
		return fmt.Errorf("stop export on port %d: %w", in.Port, err)
	}
	exports, err := a.store.ListExports(ctx, a.settings.HubID)
	if err != nil {
		return fmt.Errorf("stop export on port %d: %w", in.Port, err)
	}
	for _, e := range exports {
		if e.Port == in.Port && (in.Path == "" || e.Path == in.Path) {
			if err := a.store.RemoveExport(ctx, a.settings.HubID, in.Port); err != nil {
				return fmt.Errorf("stop export on port %d: %w", in.Port, err)
			}
		}
	}
	return nil
}

// VerifyTarget checks the qcow2, proves it holds nothing the copy did not write (its own
// clusters lie inside the copied areas) and recomputes the copy's digest from the file's
// logical content (through its backing chain) over the copied areas. Damage, data outside
// the areas and a digest mismatch are non-retryable; a target still locked by its export is
// retried.
func (a *Activities) VerifyTarget(ctx context.Context, in activities.VerifyTargetInput) (activities.Verification, error) {
	if !a.layout.Contains(in.Path) {
		return activities.Verification{}, badInput("verify: %q is outside the repository", in.Path)
	}
	if in.Digest == "" {
		return activities.Verification{}, badInput("verify %s: no digest to compare with", in.Path)
	}
	// qemu-img check of a large image reports nothing for minutes; the digest heartbeats too.
	beat := heartbeat.Start(ctx, verifyBeat, nil)
	defer beat.Stop()
	// The heartbeat proves the worker alive, not qemu-img busy: a hung check or info must end
	// this attempt on its own, and a retry gets a fresh one.
	metaCtx, cancelMeta := context.WithTimeout(ctx, imageMetadataTimeout)
	defer cancelMeta()
	if _, err := qemu.Check(metaCtx, in.Path); errors.Is(err, qemu.ErrImageCorrupt) {
		return activities.Verification{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("verify %s: %v", in.Path, err), activities.ErrBadInput, nil)
	} else if err != nil {
		return activities.Verification{}, fmt.Errorf("verify %s: %w", in.Path, err)
	}
	info, err := qemu.Info(metaCtx, in.Path)
	if err != nil {
		return activities.Verification{}, fmt.Errorf("verify %s: %w", in.Path, err)
	}
	cancelMeta()
	// The read-only export holds the image's lock for the whole check, so no writer gets in
	// between the allocation map, the reads and the digest: they all see the same content.
	exp, stop, err := a.serveReadOnly(ctx, in.Path)
	if err != nil {
		return activities.Verification{}, fmt.Errorf("verify %s: %w", in.Path, err)
	}
	defer stop()
	if err := a.verifyCoverage(ctx, in, info, exp.URI()); err != nil {
		return activities.Verification{}, err
	}
	// The block manifest is written while the digest is recomputed and kept beside the
	// target only when the digest matches, for checking the point later (diskferry verify).
	manifest := repo.ManifestPath(in.Path)
	digest, err := a.digestWithManifest(ctx, in, exp.URI(), manifest+".tmp", beat)
	if err != nil {
		return activities.Verification{}, classify("verify "+in.Path, err)
	}
	if digest != in.Digest {
		_ = os.Remove(manifest + ".tmp")
		return activities.Verification{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("verify %s: content digest %s differs from the copy's %s", in.Path, digest, in.Digest),
			activities.ErrBadInput, nil)
	}
	if err := os.Rename(manifest+".tmp", manifest); err != nil {
		return activities.Verification{}, fmt.Errorf("verify %s: keep manifest: %w", in.Path, err)
	}
	verified := info.VirtualSize
	if in.Areas != nil {
		verified = 0
		for _, e := range in.Areas {
			verified += e.Length
		}
	}
	a.settings.CountVerified(verified)
	return activities.Verification{Path: in.Path, AllocatedBytes: info.ActualSize, VirtualBytes: info.VirtualSize,
		Manifest: manifest}, nil
}

// verifyCoverage proves that the target holds what the copy wrote and nothing else
// (coverage.VerifyImage); the digest covers only the copied areas, so a write elsewhere
// would pass it. The parent of an incremental is served only when partial clusters need
// comparing with it.
func (a *Activities) verifyCoverage(ctx context.Context, in activities.VerifyTargetInput, info qemu.ImageInfo, uri string) error {
	if parent := cmp.Or(info.FullBackingFile, info.BackingFile); parent != "" && !a.layout.Contains(parent) {
		return badInput("verify %s: backing file %q is outside the repository", in.Path, parent)
	}
	serve := func(ctx context.Context, path string) (string, func(), error) {
		exp, stop, err := a.serveReadOnly(ctx, path)
		if err != nil {
			return "", nil, err
		}
		return exp.URI(), stop, nil
	}
	err := coverage.VerifyImage(ctx, in.Path, toBlockExtents(in.Areas), uri, serve, nbd.Options{CommandTimeout: time.Minute})
	var ranges *coverage.RangeError
	switch {
	case errors.As(err, &ranges):
		return notExact(in.Path, ranges)
	case errors.Is(err, coverage.ErrInvalid):
		return badInput("verify %s: %v", in.Path, err)
	case err != nil:
		return fmt.Errorf("verify %s: %w", in.Path, err)
	}
	return nil
}

// notExact is the final error for a target holding data the copy did not write: a retry
// reads the same file, and the backup's compensation discards it.
func notExact(path string, err *coverage.RangeError) error {
	return temporal.NewNonRetryableApplicationError(fmt.Sprintf("verify %s: %v", path, err), activities.ErrBadInput, nil)
}

func toBlockExtents(areas []activities.Extent) []blockcopy.Extent {
	if areas == nil {
		return nil
	}
	out := make([]blockcopy.Extent, len(areas))
	for i, e := range areas {
		out[i] = blockcopy.Extent{Start: e.Start, Length: e.Length}
	}
	return out
}

// digestWithManifest computes the digest from the export at uri and writes the block
// manifest to path; on failure the file is removed. The bytes read so far become the
// details of the verification's heartbeats.
func (a *Activities) digestWithManifest(ctx context.Context, in activities.VerifyTargetInput, uri, path string,
	beat *heartbeat.Keeper) (digest string, err error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return "", fmt.Errorf("create manifest: %w", err)
	}
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(path)
		}
	}()
	blockSize := in.BlockSize
	if blockSize <= 0 {
		blockSize = blockcopy.DefaultBlockSize // what the digest uses then
	}
	m, err := blockcopy.NewManifestWriter(f, blockSize)
	if err != nil {
		return "", err
	}
	digest, err = blockcopy.ComputeDigest(ctx, uri, blockcopy.Options{
		Areas: toBlockExtents(in.Areas), BlockSize: in.BlockSize, Connections: 4, OnBlock: m.Add,
		OnProgress:       func(p blockcopy.Progress) { beat.Record(p.BytesDone) },
		ProgressInterval: verifyBeat,
	})
	if err != nil {
		return "", err
	}
	if err = m.Flush(); err != nil {
		return "", err
	}
	if err = f.Sync(); err != nil {
		return "", fmt.Errorf("sync manifest: %w", err)
	}
	if err = f.Close(); err != nil {
		return "", fmt.Errorf("close manifest: %w", err)
	}
	return digest, nil
}

// verifyBeat is how often VerifyTarget heartbeats while qemu-img works.
const verifyBeat = 5 * time.Second

// imageMetadataTimeout bounds VerifyTarget's qemu-img check and info: they read metadata
// only, minutes at most even for multi-terabyte images.
const imageMetadataTimeout = 30 * time.Minute

// verifyDirPrefix names the run-dir entries of verification exports.
const verifyDirPrefix = "verify"

// serveReadOnly serves an image read-only on a private unix socket, in a run-dir entry of
// its own (Reconcile stops the leftovers of a crashed worker). stop ends the export and
// removes the entry.
func (a *Activities) serveReadOnly(ctx context.Context, path string) (*qemu.Export, func(), error) {
	a.mu.Lock()
	dir, err := os.MkdirTemp(a.settings.RunDir, verifyDirPrefix)
	if err == nil {
		a.verifying[dir] = true
	}
	a.mu.Unlock()
	if err != nil {
		return nil, nil, err
	}
	forget := func() {
		a.mu.Lock()
		delete(a.verifying, dir)
		a.mu.Unlock()
		os.RemoveAll(dir)
	}
	exp, err := qemu.Start(ctx, qemu.ExportOptions{
		Path: path, Socket: filepath.Join(dir, "nbd.sock"), Name: "verify", Connections: 4,
		PidFile: filepath.Join(dir, "nbd.pid"), ReadOnly: true, Logger: a.log,
	})
	if err != nil {
		forget()
		return nil, nil, err
	}
	stop := func() {
		if err := exp.Stop(context.WithoutCancel(ctx), a.settings.StopTimeout); err != nil {
			a.log.Warn("stop verification export", "path", path, "err", err)
		}
		forget()
	}
	return exp, stop, nil
}

func isNotEmpty(err error) bool {
	var pe *os.PathError
	return errors.As(err, &pe) && errors.Is(pe.Err, syscall.ENOTEMPTY)
}

// exportAIO picks native AIO where qemu allows it (O_DIRECT cache modes): measured faster
// than threads for the copy's large sequential writes (scripts/bench.sh).
func exportAIO(cache string) string {
	if cache == "none" || cache == "directsync" {
		return "native"
	}
	return ""
}
