// Package workflows holds the Temporal workflows of diskferry. They only orchestrate: every
// piece of I/O is an activity named in the activities contract, called by name so this
// package never depends on the hub or SNA implementations.
package workflows

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/text"
)

// BackupWorkflowName is the registered workflow type name.
const BackupWorkflowName = "BackupWorkflow"

// Connection limits for one disk copy (and the matching qemu-nbd --shared).
const (
	DefaultConnections = 4
	MaxConnections     = 16
)

// BackupInput is the plain-JSON request of a backup; it never carries a secret.
type BackupInput struct {
	VM          string  `json:"vm"`                    // inventory path, name or moref
	Site        string  `json:"site"`                  // SNA site; selects the SNA task queue
	Mode        string  `json:"mode,omitempty"`        // auto (default) | full | incremental
	Quiesce     bool    `json:"quiesce,omitempty"`     // quiesce the guest file systems for the snapshot
	Disks       []int32 `json:"disks,omitempty"`       // disk keys; empty: every disk
	Connections int     `json:"connections,omitempty"` // NBD connections per disk copy; 0: DefaultConnections
	// WorkerWaitSeconds bounds how long an SNA or hub-host step waits for a worker to take
	// it; 0: DefaultWorkerWait.
	WorkerWaitSeconds int `json:"workerWaitSeconds,omitempty"`
	// Bandwidth limits the job's copies together, e.g. "50Mbit", "1Gbit", "12.5MB/s",
	// "800KiB/s" (at least 1Mbit); empty: no job limit. The SNA's DISKFERRY_SITE_BANDWIDTH
	// applies as well: the stricter wins.
	Bandwidth string `json:"bandwidth,omitempty"`

	// unknown is the error of a strict decoding (a field this version does not know, such as
	// a misspelt "disk"); Validate reports it, so the run fails cleanly instead of ignoring it.
	unknown error
}

// UnmarshalJSON decodes the input leniently and remembers whether a strict decoding would
// have refused it: an error here would fail the workflow task over and over instead of the run.
func (in *BackupInput) UnmarshalJSON(data []byte) error {
	type plain BackupInput
	var lenient plain
	unknown, err := decodeStrict(data, &lenient)
	if err != nil {
		return err
	}
	*in = BackupInput(lenient)
	in.unknown = unknown
	return nil
}

// BackupResult describes the committed restore point.
type BackupResult struct {
	PointID  string                  `json:"pointId"`
	HubID    string                  `json:"hubId"`
	VMName   string                  `json:"vmName"`
	Mode     string                  `json:"mode"` // full if any disk was copied in full
	Disks    []activities.DiskResult `json:"disks"`
	Duration time.Duration           `json:"duration"`
	// Warnings are fallbacks the run took (a disk copied in full because vCenter refused its
	// changeId) and cleanup steps that failed after the point was committed; the point is usable.
	Warnings []string `json:"warnings,omitempty"`
	// Retention is the workflow ID of the VM's retention run the backup started, or found
	// running; empty when none was started (a warning says why).
	Retention string `json:"retention,omitempty"`
}

// Register registers BackupWorkflow, RestoreWorkflow, MountWorkflow and RetentionWorkflow
// under their explicit names.
func Register(r worker.WorkflowRegistry) {
	r.RegisterWorkflowWithOptions(BackupWorkflow, workflow.RegisterOptions{Name: BackupWorkflowName})
	r.RegisterWorkflowWithOptions(RestoreWorkflow, workflow.RegisterOptions{Name: RestoreWorkflowName})
	r.RegisterWorkflowWithOptions(MountWorkflow, workflow.RegisterOptions{Name: MountWorkflowName})
	r.RegisterWorkflowWithOptions(RetentionWorkflow, workflow.RegisterOptions{Name: RetentionWorkflowName})
}

// BackupWorkflowID is the workflow ID convention for a manual backup of a VM: one ID per VM,
// so the server itself refuses a second concurrent run (see StartBackupOptions). Runs started
// by a schedule get their IDs from the schedule; the catalog guard in PlanBackup
// (ErrBackupRunning) covers them and a VM named differently (path, name, moref).
func BackupWorkflowID(vm string) string { return "backup-" + vm }

// StartBackupOptions are the options the CLI starts a backup with: while a run with the same
// ID is open the start fails with *serviceerror.WorkflowExecutionAlreadyStarted (conflict
// policy FAIL; without WorkflowExecutionErrorWhenAlreadyStarted the SDK would silently hand
// back the running backup instead); once it closed, a new run may reuse the ID.
func StartBackupOptions(in BackupInput) client.StartWorkflowOptions {
	return client.StartWorkflowOptions{
		ID:                                       BackupWorkflowID(in.VM),
		TaskQueue:                                activities.HubQueue,
		WorkflowIDConflictPolicy:                 enumspb.WORKFLOW_ID_CONFLICT_POLICY_FAIL,
		WorkflowIDReusePolicy:                    enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		WorkflowExecutionErrorWhenAlreadyStarted: true,
	}
}

// SnapshotPrefix starts the name of every backup snapshot.
const SnapshotPrefix = "diskferry-"

// SnapshotName is the name of the snapshot a backup run creates. It is unique per run, not
// per workflow ID (IDs are reused): a new run must never take a snapshot an earlier failed
// run left behind for its own, and a leftover names the exact run that made it.
func SnapshotName(workflowID, runID string) string { return SnapshotPrefix + workflowID + "@" + runID }

// ParseSnapshotName returns the run that made a backup snapshot; ok is false for any other name.
func ParseSnapshotName(name string) (workflowID, runID string, ok bool) {
	rest, ok := strings.CutPrefix(name, SnapshotPrefix)
	if !ok {
		return "", "", false
	}
	i := strings.LastIndexByte(rest, '@')
	if i <= 0 || i == len(rest)-1 {
		return "", "", false
	}
	return rest[:i], rest[i+1:], true
}

// siteName keeps the site usable inside a task queue name.
var siteName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// MaxVMRefLength is the longest VM reference a backup accepts, in bytes: vSphere names have
// at most 80 characters, inventory paths a few folders more; the catalog keeps 255.
const MaxVMRefLength = 255

// vmMoref is the shape of a VM moref given with its type prefix.
var vmMoref = regexp.MustCompile(`^VirtualMachine:vm-[0-9]+$`)

// Validate checks the input and returns a non-retryable ErrBadInput error naming the field.
func (in BackupInput) Validate() error {
	if in.unknown != nil {
		return badInput(fmt.Sprintf("%v (known fields: vm, site, mode, quiesce, disks, connections, workerWaitSeconds, bandwidth)", in.unknown))
	}
	if err := validateVMRef(in.VM, badInput); err != nil {
		return err
	}
	switch {
	case in.Site == "":
		return badInput("site: required")
	case !siteName.MatchString(in.Site):
		return badInput(fmt.Sprintf("site: %q is not a valid site name (letters, digits, '.', '_', '-'; at most 63)", text.Shorten(in.Site, 80)))
	}
	switch in.Mode {
	case "", activities.ModeAuto, activities.ModeFull, activities.ModeIncremental:
	default:
		return badInput(fmt.Sprintf("mode: %q is not one of auto, full, incremental", text.Shorten(in.Mode, 80)))
	}
	if in.Connections < 0 || in.Connections > MaxConnections {
		return badInput(fmt.Sprintf("connections: %d is outside 0..%d", in.Connections, MaxConnections))
	}
	if in.WorkerWaitSeconds < 0 || in.WorkerWaitSeconds > int(MaxWorkerWait/time.Second) {
		return badInput(fmt.Sprintf("workerWaitSeconds: %d is outside 0..%d", in.WorkerWaitSeconds, int(MaxWorkerWait/time.Second)))
	}
	if err := validateBandwidth(in.Bandwidth, badInput); err != nil {
		return err
	}
	seen := make(map[int32]bool, len(in.Disks))
	for _, key := range in.Disks {
		if seen[key] {
			return badInput(fmt.Sprintf("disks: key %d listed twice", key))
		}
		seen[key] = true
	}
	return nil
}

// validateVMRef accepts a name, a moref or an absolute inventory path of sane length; bad
// makes the error of the input being checked.
func validateVMRef(vm string, bad func(string) error) error {
	switch {
	case vm == "":
		return bad("vm: required")
	case len(vm) > MaxVMRefLength:
		return bad(fmt.Sprintf("vm: %d bytes long, at most %d", len(vm), MaxVMRefLength))
	case !utf8.ValidString(vm):
		return bad("vm: not valid UTF-8")
	case strings.TrimSpace(vm) != vm:
		return bad(fmt.Sprintf("vm: %q has leading or trailing spaces", vm))
	case strings.ContainsFunc(vm, unicode.IsControl):
		return bad(fmt.Sprintf("vm: %q contains control characters", vm))
	case strings.HasPrefix(vm, "VirtualMachine:") && !vmMoref.MatchString(vm):
		return bad(fmt.Sprintf("vm: %q is not a VM moref (VirtualMachine:vm-<number>)", vm))
	}
	if !strings.Contains(vm, "/") {
		return nil
	}
	// An inventory path: /datacenter/vm/folder.../name, nothing relative.
	if !strings.HasPrefix(vm, "/") {
		return bad(fmt.Sprintf("vm: %q is neither a name nor an absolute inventory path (/datacenter/vm/name)", vm))
	}
	for _, elem := range strings.Split(vm[1:], "/") {
		if elem == "" || elem == "." || elem == ".." {
			return bad(fmt.Sprintf("vm: inventory path %q has an empty, '.' or '..' element", vm))
		}
	}
	return nil
}

func badInput(msg string) error {
	return temporal.NewNonRetryableApplicationError("invalid backup input: "+msg, activities.ErrBadInput, nil)
}

// withDefaults fills the optional fields.
func (in BackupInput) withDefaults() BackupInput {
	if in.Mode == "" {
		in.Mode = activities.ModeAuto
	}
	if in.Connections == 0 {
		in.Connections = DefaultConnections
	}
	return in
}

// BackupWorkflow backs up one VM into a new restore point (docs/architecture.md). Every step that creates
// something registers its undo as soon as it succeeds; on failure or cancel the undos run in
// reverse order on a disconnected context and the original error is returned.
func BackupWorkflow(ctx workflow.Context, in BackupInput) (BackupResult, error) {
	b := newBackup(ctx, in.withDefaults())
	if err := workflow.SetQueryHandler(ctx, ProgressQueryName, func() (Progress, error) {
		return b.progress.clone(), nil
	}); err != nil {
		return BackupResult{}, fmt.Errorf("register progress query: %w", err)
	}
	if err := in.Validate(); err != nil {
		return BackupResult{}, b.refuse(ctx, err)
	}
	b.setStatus(ctx, StatusRunning)
	b.journal.add(ctx, "backup of %s from site %s requested (mode %s, quiesce %t)", in.VM, in.Site, b.in.Mode, in.Quiesce)

	result, err := b.run(ctx)
	if err == nil {
		b.setStatus(ctx, StatusComplete)
		b.step(ctx, "%s", StatusComplete)
		b.journal.add(ctx, "point %s complete: %d disk(s), %s read in %s",
			result.PointID, len(result.Disks), humanBytes(result.bytesRead()), result.Duration.Round(time.Second))
		return result, nil
	}
	return BackupResult{}, b.fail(ctx, err)
}

// diskRun is the state of one planned disk as the run goes.
type diskRun struct {
	plan     activities.DiskPlan
	port     int
	target   activities.Target
	export   activities.Export
	copy     activities.CopyDiskResult
	changeID string
	verified activities.Verification
}

// backup is one run of BackupWorkflow.
type backup struct {
	job
	in BackupInput

	vm       activities.VM
	plan     activities.Plan
	disks    []*diskRun
	snapshot activities.Snapshot
	warnings []string
}

func newBackup(ctx workflow.Context, in BackupInput) *backup {
	progress := &Progress{VM: text.Shorten(in.VM, MaxVMRefLength), Site: text.Shorten(in.Site, MaxVMRefLength), Mode: in.Mode, Started: workflow.Now(ctx)}
	title := fmt.Sprintf("Backup of %s (site %s)", text.Shorten(in.VM, MaxVMRefLength), text.Shorten(in.Site, MaxVMRefLength))
	b := &backup{job: newJob(ctx, "backup", title, in.WorkerWaitSeconds, progress), in: in}
	b.attributes = b.statusAttributes
	b.watchCopyWaits(ctx)
	return b
}

func (b *backup) run(ctx workflow.Context) (BackupResult, error) {
	steps := []func(workflow.Context) error{
		b.inspectVM,
		b.planBackup,
		b.prepareTargets,
		b.ensureTunnel,
		b.createSnapshot,
		b.copyDisks,
		b.readChangeIDs,
		b.removeSnapshot,
		b.dropTunnel,
		b.stopExports,
		b.verifyTargets,
		b.commitPoint,
	}
	for _, step := range steps {
		if err := step(ctx); err != nil {
			return BackupResult{}, err
		}
	}
	result := b.result(ctx)
	result.Warnings = append(result.Warnings, b.warnings...)
	// The point is committed and usable: a cancel no longer stops the release of the leases,
	// and a failure to release them is a warning, not a failed backup.
	releaseCtx, _ := workflow.NewDisconnectedContext(ctx)
	if err := b.releasePorts(releaseCtx); err != nil {
		result.Warnings = append(result.Warnings, err.Error())
		b.journal.add(ctx, "warning: %v", err)
	}
	if workflow.GetVersion(ctx, startRetentionChange, workflow.DefaultVersion, 1) == 1 {
		var err error
		if result.Retention, err = b.startRetention(releaseCtx); err != nil {
			result.Warnings = append(result.Warnings, err.Error())
			b.journal.add(ctx, "warning: %v", err)
		}
	}
	return result, nil
}

// startRetentionChange is the GetVersion change ID of the retention run a backup starts.
const startRetentionChange = "start-retention"

// scheduledByKey is the search attribute the Temporal scheduler sets on the runs it starts:
// the schedule's ID.
var scheduledByKey = temporal.NewSearchAttributeKeyKeyword("TemporalScheduledById")

// startRetention starts the VM's RetentionWorkflow once the point is committed and returns its
// workflow ID. The backup neither waits for it nor fails with it: the child is abandoned when
// the backup closes, and waits only until the server recorded its start (a child not started
// before its parent closes is never started). A retention of the VM already running is fine:
// it reviews the new point too, or the next backup's run does. Any other error is returned
// for a warning.
func (b *backup) startRetention(ctx workflow.Context) (string, error) {
	in := RetentionInput{VM: b.vm.Name}
	in.ScheduleID, _ = workflow.GetTypedSearchAttributes(ctx).GetKeyword(scheduledByKey)
	id := RetentionWorkflowID(in.VM)
	b.step(ctx, "starting retention %s", id)
	childCtx := workflow.WithChildOptions(ctx, workflow.ChildWorkflowOptions{
		WorkflowID:            id,
		TaskQueue:             activities.HubQueue,
		ParentClosePolicy:     enumspb.PARENT_CLOSE_POLICY_ABANDON,
		WorkflowIDReusePolicy: enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		StaticSummary:         escapeMarkdown("retention of VM " + in.VM),
	})
	err := workflow.ExecuteChildWorkflow(childCtx, RetentionWorkflowName, in).GetChildWorkflowExecution().Get(ctx, nil)
	var running *temporal.ChildWorkflowExecutionAlreadyStartedError
	switch {
	case errors.As(err, &running):
		b.journal.add(ctx, "retention %s already running; it reviews the VM's points", id)
		return id, nil
	case err != nil:
		return "", fmt.Errorf("retention of VM %s not started (the next backup starts it, or diskferry retention apply --vm %s): %w", in.VM, in.VM, err)
	}
	b.journal.add(ctx, "retention %s started", id)
	return id, nil
}

func (b *backup) inspectVM(ctx workflow.Context) error {
	b.step(ctx, "inspecting VM %s", b.in.VM)
	err := b.execute(ctx, activities.InspectVMName, b.snaQueue(), "inspect VM "+b.in.VM,
		activities.InspectVMInput{VM: b.in.VM}, &b.vm)
	if err != nil {
		return err
	}
	b.upsert(ctx, VMNameKey.ValueSet(b.vm.Name))
	b.journal.add(ctx, "VM %s (%s): %d disk(s), CBT %t, %s", b.vm.Name, b.vm.Moref, len(b.vm.Disks), b.vm.CBTEnabled, b.vm.PowerState)
	return nil
}

func (b *backup) planBackup(ctx workflow.Context) error {
	b.step(ctx, "planning")
	in := activities.PlanBackupInput{
		WorkflowID: b.info.WorkflowExecution.ID,
		RunID:      b.info.WorkflowExecution.RunID,
		Site:       b.in.Site,
		VM:         b.vm,
		Mode:       b.in.Mode,
		DiskKeys:   b.in.Disks,
	}
	if err := b.execute(ctx, activities.PlanBackupName, activities.HubQueue, "plan "+b.in.Mode+" backup of "+b.vm.Name, in, &b.plan); err != nil {
		return err
	}
	pointID := b.plan.PointID
	b.undo.add("fail-point", func(ctx workflow.Context, cause error) error {
		return b.execute(ctx, activities.FailPointName, activities.HubQueue, "mark point "+pointID+" failed",
			activities.FailPointInput{PointID: pointID, Error: cause.Error()}, nil)
	})
	if len(b.plan.Disks) == 0 {
		return temporal.NewNonRetryableApplicationError("the plan selects no disk to back up", activities.ErrBadInput, nil)
	}
	b.progress.PointID, b.progress.HubID, b.progress.Mode = b.plan.PointID, b.plan.HubID, b.plan.Mode
	for _, d := range b.plan.Disks {
		b.disks = append(b.disks, &diskRun{plan: d})
		b.progress.Disks = append(b.progress.Disks, DiskProgress{
			Key: d.Key, Mode: d.Mode, Phase: PhaseWaiting, CapacityBytes: d.CapacityBytes, BytesTotal: d.CapacityBytes,
		})
	}
	b.upsert(ctx, BackupModeKey.ValueSet(b.plan.Mode))
	b.journal.add(ctx, "planned %s backup as point %s on hub %s: %s", b.plan.Mode, b.plan.PointID, b.plan.HubID, b.describeDisks())
	if b.plan.Note != "" {
		// The chain's hub is down: the hub-host steps wait for its worker (workerWait).
		b.journal.add(ctx, "%s", b.plan.Note)
	}
	return nil
}

func (b *backup) prepareTargets(ctx workflow.Context) error {
	hubHost := activities.HubHostQueue(b.plan.HubID)
	b.registerPortRelease(b.plan.HubID)
	keys := make([]int32, len(b.disks))
	for i, d := range b.disks {
		keys[i] = d.plan.Key
	}
	portFor, err := b.leasePorts(ctx, b.plan.HubID, keys)
	if err != nil {
		return err
	}
	for _, d := range b.disks {
		key := d.plan.Key
		b.step(ctx, "preparing target of disk %d", key)
		b.setPhase(key, PhaseExporting)
		if d.port, err = portFor(ctx, key); err != nil {
			return err
		}

		// Registered before the prepare: one that created the file and then failed (or lost
		// its reply) would leave it behind. The target is named by point and disk.
		discard := activities.DiscardTargetInput{PointID: b.plan.PointID, VMName: b.vm.Name, VMMoref: b.vm.Moref, DiskKey: key}
		b.undo.add(discardKey(key), func(ctx workflow.Context, _ error) error {
			return b.execute(ctx, activities.DiscardTargetName, hubHost, fmt.Sprintf("discard target of disk %d", key), discard, nil)
		})
		if err := b.prepareTarget(ctx, d); err != nil {
			return err
		}
		if err := b.startExport(ctx, d); err != nil {
			return err
		}
	}
	return nil
}

// prepareTarget creates the disk's qcow2 as its plan says (a retry replaces what an earlier
// attempt made); the caller has registered its discard.
func (b *backup) prepareTarget(ctx workflow.Context, d *diskRun) error {
	return b.execute(ctx, activities.PrepareTargetName, activities.HubHostQueue(b.plan.HubID),
		fmt.Sprintf("create %s target of disk %d (%s)", d.plan.Mode, d.plan.Key, humanBytes(d.plan.CapacityBytes)),
		activities.PrepareTargetInput{PointID: b.plan.PointID, VM: b.vm, Disk: d.plan}, &d.target)
}

// startExport serves the disk's target on its leased port.
func (b *backup) startExport(ctx workflow.Context, d *diskRun) error {
	key := d.plan.Key
	in := activities.StartExportInput{WorkflowID: b.workflowID(), DiskKey: key, Path: d.target.Path, Port: d.port, Connections: b.in.Connections}
	if err := b.job.startExport(ctx, b.plan.HubID, in, &d.export); err != nil {
		return err
	}
	b.journal.add(ctx, "disk %d: target %s exported on port %d", key, d.target.Path, d.export.Port)
	return nil
}

func (b *backup) ensureTunnel(ctx workflow.Context) error {
	exports := make([]activities.Export, 0, len(b.disks))
	for _, d := range b.disks {
		exports = append(exports, d.export)
	}
	return b.openTunnel(ctx, b.snaQueue(), b.plan.HubID, exports, nil)
}

func (b *backup) createSnapshot(ctx workflow.Context) error {
	in := activities.CreateSnapshotInput{VMMoref: b.vm.Moref, Name: SnapshotName(b.info.WorkflowExecution.ID, b.info.WorkflowExecution.RunID), Quiesce: b.in.Quiesce}
	b.step(ctx, "creating snapshot %s", in.Name)
	// Registered before the step: a create that failed or timed out may still have made the
	// snapshot (the task ran on in vCenter), and an orphan grows until its datastore is full.
	// Without a moref RemoveSnapshot removes the snapshot by its run-specific name.
	b.undo.add("snapshot", func(ctx workflow.Context, _ error) error {
		snapshot := b.snapshot
		if snapshot.Moref == "" {
			snapshot = activities.Snapshot{VMMoref: in.VMMoref, Name: in.Name}
		}
		return b.execute(ctx, activities.RemoveSnapshotName, b.snaQueue(), "remove snapshot "+snapshot.Name, snapshot, nil)
	})
	if err := b.execute(ctx, activities.CreateSnapshotName, b.snaQueue(), fmt.Sprintf("snapshot %s (quiesce %t)", b.vm.Name, in.Quiesce), in, &b.snapshot); err != nil {
		return err
	}
	b.journal.add(ctx, "snapshot %s (%s) created", b.snapshot.Name, b.snapshot.Moref)
	return nil
}

// copyDisks copies every disk in parallel (copyAll: the first failure stops the others).
func (b *backup) copyDisks(ctx workflow.Context) error {
	b.setStatus(ctx, StatusCopying)
	b.step(ctx, "copying %d disk(s)", len(b.disks))
	keys := make([]int32, len(b.disks))
	for i, d := range b.disks {
		keys[i] = d.plan.Key
	}
	return b.copyAll(ctx, activities.CopyDiskName, b.snaQueue(), keys, func(ctx workflow.Context, i int) error {
		return b.copyDisk(ctx, b.disks[i])
	})
}

// copyDisk copies one disk. When vCenter refuses the previous changeId of an incremental
// copy, the disk's target is made a fresh full one and the disk is copied in full: the next
// run builds on this copy instead of failing on the same refusal again.
func (b *backup) copyDisk(ctx workflow.Context, d *diskRun) error {
	for {
		in := activities.CopyDiskInput{
			Snapshot:      b.snapshot,
			DiskKey:       d.plan.Key,
			CapacityBytes: d.plan.CapacityBytes,
			TargetPort:    d.export.Port,
			TargetSocket:  d.export.Socket,
			HubID:         b.plan.HubID,
			ExportName:    d.export.Name,
			Mode:          d.plan.Mode,
			PrevChangeID:  d.plan.PrevChangeID,
			Connections:   b.in.Connections,
		}
		in.BandwidthBytesPerSec = bandwidthBytesPerSec(b.in.Bandwidth)
		opts := b.options(activities.CopyDiskName, b.snaQueue(),
			fmt.Sprintf("copy disk %d (%s, %s)", d.plan.Key, d.plan.Mode, humanBytes(d.plan.CapacityBytes)))
		// An ID is unique among the run's pending activities only: the full copy after a
		// refusal reuses it, so clients still find the disk's live bytes.
		opts.ActivityID = CopyActivityID(d.plan.Key)
		err := workflow.ExecuteActivity(workflow.WithActivityOptions(ctx, opts), activities.CopyDiskName, in).Get(ctx, &d.copy)
		err = b.noWorker(err, activities.CopyDiskName, b.snaQueue())
		if err == nil {
			b.copied(ctx, d)
			return nil
		}
		if !hasErrorType(err, activities.ErrChangeIDRefused) || d.plan.Mode != activities.ModeIncremental {
			return err
		}
		if err := b.retargetFull(ctx, d, err); err != nil {
			return err
		}
	}
}

// changeIDRefusedReason starts the reason of a disk copied in full after a refusal.
const changeIDRefusedReason = "vCenter refused the previous changeId"

// retargetFull turns an incremental disk whose changeId vCenter refused into a full one:
// its export is stopped, its overlay replaced by a fresh full target (PrepareTarget replaces
// the file; the discard registered for it still applies) and exported again on its port.
func (b *backup) retargetFull(ctx workflow.Context, d *diskRun, refusal error) error {
	key := d.plan.Key
	warning := fmt.Sprintf("disk %d: %s %q (%s); copying the disk in full", key, changeIDRefusedReason, d.plan.PrevChangeID, rootMessage(refusal))
	b.warnings = append(b.warnings, warning)
	b.journal.add(ctx, "warning: %s", warning)
	d.plan.Mode = activities.ModeFull
	d.plan.Reason = fmt.Sprintf("%s %q", changeIDRefusedReason, d.plan.PrevChangeID)
	d.plan.ParentPath, d.plan.PrevChangeID = "", ""
	if p := b.progress.disk(key); p != nil {
		p.Mode = activities.ModeFull
	}
	if b.plan.Mode != activities.ModeFull {
		b.plan.Mode, b.progress.Mode = activities.ModeFull, activities.ModeFull
		b.upsert(ctx, BackupModeKey.ValueSet(activities.ModeFull))
	}
	if err := b.undo.runNow(ctx, stopExportKey(key)); err != nil {
		return err
	}
	if err := b.prepareTarget(ctx, d); err != nil {
		return err
	}
	return b.startExport(ctx, d)
}

func (b *backup) copied(ctx workflow.Context, d *diskRun) {
	p := b.progress.disk(d.plan.Key)
	p.BytesDone, p.BytesTotal = d.copy.BytesRead, d.copy.BytesRead
	p.CopyDuration = d.copy.Duration
	if secs := d.copy.Duration.Seconds(); secs > 0 {
		p.Rate = float64(d.copy.BytesRead) / secs
	}
	b.journal.add(ctx, "disk %d copied: %s read, %s written, %s zeroed in %s", d.plan.Key,
		humanBytes(d.copy.BytesRead), humanBytes(d.copy.BytesWritten), humanBytes(d.copy.BytesZeroed), d.copy.Duration.Round(time.Millisecond))
}

func (b *backup) readChangeIDs(ctx workflow.Context) error {
	b.step(ctx, "reading change IDs")
	var changeIDs map[int32]string
	if err := b.execute(ctx, activities.ReadChangeIDsName, b.snaQueue(), "read the change IDs of "+b.snapshot.Name,
		activities.ReadChangeIDsInput{Snapshot: b.snapshot}, &changeIDs); err != nil {
		return err
	}
	for _, d := range b.disks {
		d.changeID = changeIDs[d.plan.Key]
	}
	return nil
}

// removeSnapshot, dropTunnel and stopExports are the success-path runs of registered undos
// (compensations.runNow), so the normal teardown and the compensation share one input each.
func (b *backup) removeSnapshot(ctx workflow.Context) error {
	b.step(ctx, "removing snapshot %s", b.snapshot.Name)
	if err := b.undo.runNow(ctx, "snapshot"); err != nil {
		return err
	}
	b.journal.add(ctx, "snapshot %s removed", b.snapshot.Name)
	return nil
}

func (b *backup) dropTunnel(ctx workflow.Context) error {
	b.step(ctx, "dropping tunnel forwards")
	return b.undo.runNow(ctx, tunnelKey)
}

func (b *backup) stopExports(ctx workflow.Context) error {
	b.setStatus(ctx, StatusVerifying)
	for _, d := range b.disks {
		b.step(ctx, "stopping export of disk %d", d.plan.Key)
		b.setPhase(d.plan.Key, PhaseVerifying)
		if err := b.undo.runNow(ctx, stopExportKey(d.plan.Key)); err != nil {
			return err
		}
	}
	return nil
}

func (b *backup) verifyTargets(ctx workflow.Context) error {
	hubHost := activities.HubHostQueue(b.plan.HubID)
	for _, d := range b.disks {
		b.step(ctx, "verifying disk %d", d.plan.Key)
		in := activities.VerifyTargetInput{Path: d.target.Path, BlockSize: d.copy.BlockSize, Digest: d.copy.Digest, Areas: d.copy.Areas}
		if err := b.execute(ctx, activities.VerifyTargetName, hubHost, fmt.Sprintf("verify disk %d (%s)", d.plan.Key, d.target.Path), in, &d.verified); err != nil {
			return err
		}
		b.setPhase(d.plan.Key, PhaseDone)
		b.journal.add(ctx, "disk %d verified: %s allocated of %s", d.plan.Key, humanBytes(d.verified.AllocatedBytes), humanBytes(d.verified.VirtualBytes))
	}
	return nil
}

func (b *backup) commitPoint(ctx workflow.Context) error {
	b.step(ctx, "committing point %s", b.plan.PointID)
	in := activities.CommitPointInput{PointID: b.plan.PointID, Disks: b.diskResults()}
	if err := b.execute(ctx, activities.CommitPointName, activities.HubQueue, "commit point "+b.plan.PointID, in, nil); err != nil {
		return err
	}
	// The point is usable now: its files must stay and it must not be marked failed.
	b.undo.forget("fail-point")
	for _, d := range b.disks {
		b.undo.forget(discardKey(d.plan.Key))
	}
	return nil
}

func (b *backup) releasePorts(ctx workflow.Context) error {
	b.step(ctx, "releasing ports")
	return b.undo.runNow(ctx, releasePortsKey)
}

func (b *backup) result(ctx workflow.Context) BackupResult {
	return BackupResult{
		PointID:  b.plan.PointID,
		HubID:    b.plan.HubID,
		VMName:   b.vm.Name,
		Mode:     b.plan.Mode,
		Disks:    b.diskResults(),
		Duration: workflow.Now(ctx).Sub(b.started),
	}
}

func (b *backup) diskResults() []activities.DiskResult {
	out := make([]activities.DiskResult, 0, len(b.disks))
	for _, d := range b.disks {
		out = append(out, activities.DiskResult{
			Key:           d.plan.Key,
			Path:          d.target.Path,
			ParentPath:    d.plan.ParentPath,
			Mode:          d.plan.Mode,
			ChangeID:      d.changeID,
			CapacityBytes: d.plan.CapacityBytes,
			BytesRead:     d.copy.BytesRead,
			BytesWritten:  d.copy.BytesWritten,
			BytesZeroed:   d.copy.BytesZeroed,
			Duration:      d.copy.Duration,
			Digest:        d.copy.Digest,
			Reason:        d.plan.Reason,
			// Zero until the disk is verified: a result built earlier (a failure) has none.
			AllocatedBytes: d.verified.AllocatedBytes,
		})
	}
	return out
}

func (r BackupResult) bytesRead() int64 {
	var n int64
	for _, d := range r.Disks {
		n += d.BytesRead
	}
	return n
}

func (b *backup) snaQueue() string { return activities.SNAQueue(b.in.Site) }

// vmName is the VM's inventory name once inspected, the requested name before.
func (b *backup) vmName() string {
	if b.vm.Name != "" {
		return b.vm.Name
	}
	return b.in.VM
}

// statusAttributes are a backup's search attributes with its status. Truncated: a refused
// input may be longer than the server's search attribute limit.
func (b *backup) statusAttributes(status string) []temporal.SearchAttributeUpdate {
	return []temporal.SearchAttributeUpdate{
		VMNameKey.ValueSet(text.Shorten(b.vmName(), MaxVMRefLength)),
		SiteKey.ValueSet(text.Shorten(b.in.Site, MaxVMRefLength)),
		BackupModeKey.ValueSet(b.progress.Mode),
		BackupStatusKey.ValueSet(status),
	}
}

func (b *backup) describeDisks() string {
	var s string
	for i, d := range b.plan.Disks {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("disk %d %s %s", d.Key, d.Mode, humanBytes(d.CapacityBytes))
		if d.Reason != "" {
			s += " (" + d.Reason + ")"
		}
	}
	return s
}

func discardKey(key int32) string { return fmt.Sprintf("discard-target-%d", key) }

// IsBackupRunning reports whether err says another backup of the VM is running.
func IsBackupRunning(err error) bool { return hasErrorType(err, activities.ErrBackupRunning) }

// humanBytes prints a byte count in binary units, as operators read disk sizes.
func humanBytes(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	v := float64(n)
	i := 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if i == 0 || v == float64(int64(v)) {
		return fmt.Sprintf("%d %s", int64(v), units[i])
	}
	return fmt.Sprintf("%.1f %s", v, units[i])
}
