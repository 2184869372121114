package workflows

import (
	"errors"
	"fmt"
	"path"
	"slices"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/text"
)

// RestoreWorkflow gives a restore point back: into a new VM, over the disks of the VM it was
// taken from (in place) or into files on the hub. The new-vm and in-place paths serve the
// point read-only on the hub, write it into the VM's disks from the SNA through the tunnel and
// read the disks back from vCenter against the digest of what was written. As in
// BackupWorkflow every step's undo is registered before the step and runs on failure or cancel.
func RestoreWorkflow(ctx workflow.Context, in RestoreInput) (RestoreResult, error) {
	r := newRestore(ctx, in.withDefaults())
	if err := workflow.SetQueryHandler(ctx, ProgressQueryName, func() (Progress, error) {
		return r.progress.clone(), nil
	}); err != nil {
		return RestoreResult{}, fmt.Errorf("register progress query: %w", err)
	}
	if err := in.Validate(); err != nil {
		return RestoreResult{}, r.refuse(ctx, err)
	}
	r.setStatus(ctx, StatusRunning)
	r.journal.add(ctx, "restore of %s to %s requested", pointRef(r.in.Point, r.in.VM), r.in.Destination)

	result, err := r.run(ctx)
	if err == nil {
		r.setStatus(ctx, StatusComplete)
		r.step(ctx, "%s", StatusComplete)
		r.journal.add(ctx, "point %s restored to %s: %d disk(s) in %s", result.PointID, r.target(), len(result.Disks), result.Duration.Round(time.Second))
		return result, nil
	}
	if r.partial {
		err = partialError(r.vm.Name, r.vm.Moref, err)
	}
	return RestoreResult{}, r.fail(ctx, err)
}

// restoreDisk is one disk of the point as the restore goes.
type restoreDisk struct {
	src      activities.SourceDisk
	vmKey    int32 // the VM's disk it is written into
	port     int
	export   activities.Export
	write    activities.WriteDiskResult
	file     activities.RestoreFileResult
	output   string
	duration time.Duration // of a file restore
}

// restore is one run of RestoreWorkflow.
type restore struct {
	job
	in RestoreInput

	src   activities.RestoreSource
	site  string               // the SNA that writes into vCenter
	vm    activities.RestoreVM // the VM written into
	disks []*restoreDisk
	// poweredOn: the original VM ran when inspected (in-place).
	poweredOn bool
	// partial is set once an in-place restore may have written: from then on a failure leaves
	// the VM's disks partly overwritten.
	partial  bool
	warnings []string
}

func newRestore(ctx workflow.Context, in RestoreInput) *restore {
	progress := &Progress{
		VM: text.Shorten(in.VM, MaxVMRefLength), Site: text.Shorten(in.Site, MaxVMRefLength),
		PointID: text.Shorten(in.Point, 80), Mode: text.Shorten(in.Destination, 80), Started: workflow.Now(ctx),
	}
	r := &restore{in: in, site: in.Site}
	r.job = newJob(ctx, "restore", fmt.Sprintf("Restore of %s to %s", pointRef(r.in.Point, r.in.VM), progress.Mode), in.WorkerWaitSeconds, progress)
	r.attributes = r.pointStatusAttributes
	r.watchCopyWaits(ctx)
	return r
}

func (r *restore) run(ctx workflow.Context) (RestoreResult, error) {
	if err := r.resolve(ctx); err != nil {
		return RestoreResult{}, err
	}
	var steps []func(workflow.Context) error
	switch r.in.Destination {
	case activities.DestinationFile:
		steps = []func(workflow.Context) error{r.restoreFiles}
	case activities.DestinationNewVM:
		steps = []func(workflow.Context) error{
			r.createVM, r.exportPoint, r.ensureTunnel, r.writeDisks, r.teardown, r.readBack, r.keepVM, r.powerOn,
		}
	case activities.DestinationInPlace:
		steps = []func(workflow.Context) error{
			r.checkOriginal, r.markRestored, r.powerOffOriginal, r.exportPoint, r.ensureTunnel, r.writeDisks, r.teardown, r.readBack, r.powerOn,
		}
	}
	for _, step := range steps {
		if err := step(ctx); err != nil {
			return RestoreResult{}, err
		}
	}
	return r.result(ctx), nil
}

func (r *restore) resolve(ctx workflow.Context) error {
	r.step(ctx, "resolving %s", pointRef(r.in.Point, r.in.VM))
	in := activities.ResolvePointInput{PointID: r.in.Point, VM: r.in.VM, Disks: r.in.Disks}
	if err := r.execute(ctx, activities.ResolvePointName, activities.HubQueue, "resolve "+pointRef(r.in.Point, r.in.VM), in, &r.src); err != nil {
		return err
	}
	if len(r.src.Disks) == 0 {
		return badRestoreInput(fmt.Sprintf("disks: point %s has no disk to restore", r.src.PointID))
	}
	if r.site == "" {
		r.site = r.src.Site
	}
	p := r.progress
	p.PointID, p.HubID, p.VM = r.src.PointID, r.src.HubID, text.Shorten(r.src.VMName, MaxVMRefLength)
	if r.in.Destination != activities.DestinationFile {
		p.Site = text.Shorten(r.site, MaxVMRefLength)
	}
	for _, d := range r.src.Disks {
		r.disks = append(r.disks, &restoreDisk{src: d})
		p.Disks = append(p.Disks, DiskProgress{
			Key: d.Key, Mode: r.in.Destination, Phase: PhaseWaiting, CapacityBytes: d.CapacityBytes, BytesTotal: d.CapacityBytes,
		})
	}
	r.setStatus(ctx, StatusRunning)
	r.journal.add(ctx, "point %s of VM %s (%s, finished %s) on hub %s: %s", r.src.PointID, r.src.VMName, r.src.Mode,
		r.src.FinishedAt.UTC().Format(time.RFC3339), r.src.HubID, r.describeDisks())
	return nil
}

func (r *restore) describeDisks() string {
	var s string
	for i, d := range r.src.Disks {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("disk %d %s (chain of %d)", d.Key, humanBytes(d.CapacityBytes), d.Chain)
	}
	return s
}

// restoreFiles writes each disk into a file on the hub: Output itself for one disk, files
// disk-<key>.<format> in the directory Output for several. A file appears complete or not at
// all; files of disks already written stay when a later one fails.
func (r *restore) restoreFiles(ctx workflow.Context) error {
	r.setStatus(ctx, StatusCopying)
	hubHost := activities.HubHostQueue(r.src.HubID)
	for _, d := range r.disks {
		d.output = r.in.Output
		if len(r.disks) > 1 {
			d.output = path.Join(r.in.Output, fmt.Sprintf("disk-%d.%s", d.src.Key, r.in.Format))
		}
		key := d.src.Key
		r.step(ctx, "writing disk %d to %s", key, d.output)
		r.setPhase(key, PhaseCopying)
		r.progress.disk(key).CopyStarted = workflow.Now(ctx)
		in := activities.RestoreFileInput{Path: d.src.Path, Format: r.in.Format, Output: d.output}
		// Under the activity ID of a copy of its disk, so clients find its heartbeated percentage.
		if err := r.executeAs(ctx, CopyActivityID(key), activities.RestoreFileName, hubHost,
			fmt.Sprintf("write disk %d as %s to %s", key, r.in.Format, d.output), in, &d.file); err != nil {
			return err
		}
		d.duration = workflow.Now(ctx).Sub(r.progress.disk(key).CopyStarted)
		p := r.progress.disk(key)
		p.Phase, p.BytesDone, p.BytesTotal, p.CopyDuration = PhaseDone, d.file.VirtualBytes, d.file.VirtualBytes, d.duration
		r.journal.add(ctx, "disk %d written to %s (%s, %s allocated of %s), compared with the point", key, d.file.Output,
			d.file.Format, humanBytes(d.file.AllocatedBytes), humanBytes(d.file.VirtualBytes))
	}
	return nil
}

// createVM makes the new VM in the source VM's shape.
func (r *restore) createVM(ctx workflow.Context) error {
	if r.src.Config == nil {
		return badRestoreInput(fmt.Sprintf("destination: point %s has no VM configuration (taken before configurations were kept); restore it in-place or to a file", r.src.PointID))
	}
	name := r.in.Name
	if name == "" {
		name = r.src.VMName + "-restore-" + r.src.PointID
		if err := validateVMName("name", name); err != nil {
			return badRestoreInput(fmt.Sprintf("name: the default name %q does not suit vSphere (%s); give a name", text.Shorten(name, 100), rootMessage(err)))
		}
	}
	config := *r.src.Config
	// Only the disks restored: a new VM with empty disks beside them would look restored.
	config.Disks = slices.DeleteFunc(slices.Clone(config.Disks), func(l activities.DiskLayout) bool {
		return !slices.ContainsFunc(r.disks, func(d *restoreDisk) bool { return d.src.Key == l.Key })
	})
	in := activities.CreateRestoreVMInput{WorkflowID: r.workflowID(), Spec: activities.RestoreVMSpec{
		Name: name, Folder: r.in.Folder, ResourcePool: r.in.ResourcePool, Host: r.in.Host, Datastore: r.in.Datastore,
		Config: &config, SourceVMMoref: r.src.VMMoref,
	}}
	r.step(ctx, "creating VM %s", name)
	// Registered before the create: a create that failed or lost its reply may have made the
	// VM, and the destroy finds it by name and the workflow's mark.
	r.undo.add("destroy-vm", func(ctx workflow.Context, _ error) error {
		return r.execute(ctx, activities.DestroyRestoreVMName, r.snaQueue(), "destroy VM "+name,
			activities.DestroyRestoreVMInput{WorkflowID: r.workflowID(), Name: name, Moref: r.vm.Moref}, nil)
	})
	if err := r.execute(ctx, activities.CreateRestoreVMName, r.snaQueue(), "create VM "+name, in, &r.vm); err != nil {
		return err
	}
	for _, d := range r.disks {
		i := slices.IndexFunc(r.vm.Disks, func(m activities.RestoreDiskMap) bool { return m.PointKey == d.src.Key })
		if i < 0 {
			return temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("VM %s was created without a disk for disk %d of the point", r.vm.Name, d.src.Key), activities.ErrRefused, nil)
		}
		d.vmKey = r.vm.Disks[i].VMKey
	}
	r.journal.add(ctx, "VM %s (%s) created, powered off", r.vm.Name, r.vm.Moref)
	return nil
}

// keepVM makes the restored and verified VM the run's result: no undo removes it any more.
func (r *restore) keepVM(ctx workflow.Context) error {
	r.undo.forget("destroy-vm")
	return nil
}

// checkOriginal finds the VM the point was taken from and makes sure it can be overwritten:
// the same VM (vCenter and moref), the point's disks with their capacities, powered off.
func (r *restore) checkOriginal(ctx workflow.Context) error {
	r.step(ctx, "inspecting VM %s", r.src.VMMoref)
	var vm activities.VM
	if err := r.execute(ctx, activities.InspectVMName, r.snaQueue(), "inspect VM "+r.src.VMMoref,
		activities.InspectVMInput{VM: r.src.VMMoref}, &vm); err != nil {
		return err
	}
	if vm.InstanceUUID != r.src.InstanceUUID {
		return badRestoreInput(fmt.Sprintf("site: VM %s on site %s is in vCenter %s, the point's VM %s was in vCenter %s",
			vm.Moref, r.site, vm.InstanceUUID, r.src.VMMoref, r.src.InstanceUUID))
	}
	r.vm = activities.RestoreVM{Moref: vm.Moref, Name: vm.Name}
	for _, d := range r.disks {
		i := slices.IndexFunc(vm.Disks, func(v activities.Disk) bool { return v.Key == d.src.Key })
		switch {
		case i < 0:
			return badRestoreInput(fmt.Sprintf("disks: VM %s has no disk %d any more", vm.Name, d.src.Key))
		case vm.Disks[i].CapacityBytes != d.src.CapacityBytes:
			return badRestoreInput(fmt.Sprintf("disks: disk %d of VM %s has %d bytes, the point's %d (restore to a new VM or a file instead)",
				d.src.Key, vm.Name, vm.Disks[i].CapacityBytes, d.src.CapacityBytes))
		}
		d.vmKey = d.src.Key
		r.vm.Disks = append(r.vm.Disks, activities.RestoreDiskMap{PointKey: d.src.Key, VMKey: d.src.Key, CapacityBytes: d.src.CapacityBytes, BackingFile: vm.Disks[i].BackingFile})
	}
	r.journal.add(ctx, "VM %s (%s): %d disk(s), %s", vm.Name, vm.Moref, len(vm.Disks), vm.PowerState)
	r.poweredOn = vm.PowerState == activities.PowerOn
	if r.poweredOn && !r.in.PowerOff {
		return temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("VM %s is powered on; power it off or pass --power-off", vm.Name), activities.ErrPoweredOn, nil)
	}
	return nil
}

// powerOffOriginal powers the original VM off when it runs (the request allowed it): after
// the mark, so a restore the catalog refuses (a backup of the VM runs) leaves it running.
func (r *restore) powerOffOriginal(ctx workflow.Context) error {
	if !r.poweredOn {
		return nil
	}
	r.step(ctx, "powering VM %s off", r.vm.Name)
	if err := r.execute(ctx, activities.SetPowerName, r.snaQueue(), "power off VM "+r.vm.Name,
		activities.SetPowerInput{VMMoref: r.vm.Moref, State: activities.PowerOff}, nil); err != nil {
		return err
	}
	r.journal.add(ctx, "VM %s powered off", r.vm.Name)
	return nil
}

// markRestored records in the catalog, before the first write, that the VM's CBT chain no
// longer describes our points: the next backup is full even if this restore fails.
func (r *restore) markRestored(ctx workflow.Context) error {
	r.step(ctx, "marking VM %s for a full next backup", r.vm.Name)
	in := activities.MarkRestoredInPlaceInput{
		InstanceUUID: r.src.InstanceUUID, VMMoref: r.src.VMMoref,
		Reason: fmt.Sprintf("disks restored in place from point %s by %s", r.src.PointID, r.workflowID()),
	}
	return r.execute(ctx, activities.MarkRestoredInPlaceName, activities.HubQueue, "mark VM "+r.vm.Name+" restored in place", in, nil)
}

// exportPoint serves each disk of the point read-only on a leased port of its hub.
func (r *restore) exportPoint(ctx workflow.Context) error {
	r.registerPortRelease(r.src.HubID)
	keys := make([]int32, len(r.disks))
	for i, d := range r.disks {
		keys[i] = d.src.Key
	}
	portFor, err := r.leasePorts(ctx, r.src.HubID, keys)
	if err != nil {
		return err
	}
	for _, d := range r.disks {
		key := d.src.Key
		r.step(ctx, "exporting disk %d", key)
		r.setPhase(key, PhaseExporting)
		if d.port, err = portFor(ctx, key); err != nil {
			return err
		}
		in := activities.StartExportInput{WorkflowID: r.workflowID(), DiskKey: key, Path: d.src.Path, Port: d.port, Connections: r.in.Connections, ReadOnly: true}
		if err := r.startExport(ctx, r.src.HubID, in, &d.export); err != nil {
			return err
		}
		r.journal.add(ctx, "disk %d: %s exported read-only on port %d", key, d.src.Path, d.export.Port)
	}
	return nil
}

func (r *restore) ensureTunnel(ctx workflow.Context) error {
	exports := make([]activities.Export, 0, len(r.disks))
	for _, d := range r.disks {
		exports = append(exports, d.export)
	}
	return r.openTunnel(ctx, r.snaQueue(), r.src.HubID, exports, nil)
}

// writeDisks writes every disk in parallel (copyAll: the first failure stops the others).
func (r *restore) writeDisks(ctx workflow.Context) error {
	if r.in.Destination == activities.DestinationInPlace {
		r.partial = true
	}
	r.setStatus(ctx, StatusCopying)
	r.step(ctx, "writing %d disk(s) into VM %s", len(r.disks), r.vm.Name)
	keys := make([]int32, len(r.disks))
	for i, d := range r.disks {
		keys[i] = d.src.Key
	}
	return r.copyAll(ctx, activities.WriteDiskName, r.snaQueue(), keys, func(ctx workflow.Context, i int) error {
		return r.writeDisk(ctx, r.disks[i])
	})
}

// writeDisk writes one disk under the activity ID of a copy of its point key, so clients find
// its live bytes as for a backup (LiveCopies).
func (r *restore) writeDisk(ctx workflow.Context, d *restoreDisk) error {
	in := activities.WriteDiskInput{
		HubID: r.src.HubID, SourcePort: d.export.Port, SourceSocket: d.export.Socket, ExportName: d.export.Name,
		VMMoref: r.vm.Moref, DiskKey: d.vmKey, CapacityBytes: d.src.CapacityBytes, Connections: r.in.Connections,
		BandwidthBytesPerSec: bandwidthBytesPerSec(r.in.Bandwidth),
	}
	opts := r.options(activities.WriteDiskName, r.snaQueue(),
		fmt.Sprintf("write disk %d into disk %d of VM %s (%s)", d.src.Key, d.vmKey, r.vm.Name, humanBytes(d.src.CapacityBytes)))
	opts.ActivityID = CopyActivityID(d.src.Key)
	err := workflow.ExecuteActivity(workflow.WithActivityOptions(ctx, opts), activities.WriteDiskName, in).Get(ctx, &d.write)
	if err = r.noWorker(err, activities.WriteDiskName, r.snaQueue()); err != nil {
		return err
	}
	p := r.progress.disk(d.src.Key)
	p.BytesDone, p.BytesTotal = d.write.BytesRead, d.write.BytesRead
	p.CopyDuration = d.write.Duration
	if secs := d.write.Duration.Seconds(); secs > 0 {
		p.Rate = float64(d.write.BytesRead) / secs
	}
	r.journal.add(ctx, "disk %d written into disk %d: %s read, %s written, %s zeroed in %s", d.src.Key, d.vmKey,
		humanBytes(d.write.BytesRead), humanBytes(d.write.BytesWritten), humanBytes(d.write.BytesZeroed), d.write.Duration.Round(time.Millisecond))
	return nil
}

// teardown drops the forwards, stops the exports and releases the ports once every disk is
// written: the success-path runs of their registered undos (compensations.runNow).
func (r *restore) teardown(ctx workflow.Context) error {
	r.step(ctx, "dropping tunnel forwards")
	if err := r.undo.runNow(ctx, tunnelKey); err != nil {
		return err
	}
	for _, d := range r.disks {
		r.step(ctx, "stopping export of disk %d", d.src.Key)
		if err := r.undo.runNow(ctx, stopExportKey(d.src.Key)); err != nil {
			return err
		}
	}
	r.step(ctx, "releasing ports")
	return r.undo.runNow(ctx, releasePortsKey)
}

// readBack reads every written disk back from vCenter against the digest of what was written.
func (r *restore) readBack(ctx workflow.Context) error {
	r.setStatus(ctx, StatusVerifying)
	for _, d := range r.disks {
		r.setPhase(d.src.Key, PhaseVerifying)
	}
	for _, d := range r.disks {
		r.step(ctx, "reading disk %d of VM %s back", d.vmKey, r.vm.Name)
		in := activities.ReadBackDiskInput{VMMoref: r.vm.Moref, DiskKey: d.vmKey, BlockSize: d.write.BlockSize, Digest: d.write.Digest}
		var res activities.ReadBackResult
		if err := r.execute(ctx, activities.ReadBackDiskName, r.snaQueue(), fmt.Sprintf("read disk %d of VM %s back", d.vmKey, r.vm.Name), in, &res); err != nil {
			return err
		}
		r.setPhase(d.src.Key, PhaseDone)
		r.journal.add(ctx, "disk %d of VM %s read back in %s: equal to the point", d.vmKey, r.vm.Name, res.Duration.Round(time.Millisecond))
	}
	return nil
}

// powerOn starts the restored VM when asked. The disks are restored and verified by now: a
// VM that does not start is a warning, not a failed restore.
func (r *restore) powerOn(ctx workflow.Context) error {
	if !r.in.PowerOn {
		return nil
	}
	r.step(ctx, "powering VM %s on", r.vm.Name)
	err := r.execute(ctx, activities.SetPowerName, r.snaQueue(), "power on VM "+r.vm.Name,
		activities.SetPowerInput{VMMoref: r.vm.Moref, State: activities.PowerOn}, nil)
	if err != nil {
		warning := fmt.Sprintf("VM %s is restored but did not power on: %s", r.vm.Name, rootMessage(err))
		r.warnings = append(r.warnings, warning)
		r.journal.add(ctx, "warning: %s", warning)
		return nil
	}
	r.journal.add(ctx, "VM %s powered on", r.vm.Name)
	return nil
}

// partialError says what a failed in-place restore leaves: the original VM with partly
// overwritten disks, still powered off. It keeps the failure's error type.
func partialError(name, moref string, err error) error {
	errType := "RestoreFailed"
	var appErr *temporal.ApplicationError
	if errors.As(err, &appErr) && appErr.Type() != "" {
		errType = appErr.Type()
	}
	return temporal.NewNonRetryableApplicationError(
		fmt.Sprintf("in-place restore of VM %s (%s) failed: the VM's disks are now partial and it is not powered on; restore it again before using it: %s",
			name, moref, rootMessage(err)), errType, err)
}

func (r *restore) snaQueue() string { return activities.SNAQueue(r.site) }

// target names where the point went.
func (r *restore) target() string {
	switch r.in.Destination {
	case activities.DestinationFile:
		return r.in.Output
	case activities.DestinationInPlace:
		return "VM " + r.vm.Name + " in place"
	}
	return "new VM " + r.vm.Name
}

func (r *restore) result(ctx workflow.Context) RestoreResult {
	res := RestoreResult{
		PointID: r.src.PointID, Destination: r.in.Destination, VMName: r.vm.Name, VMMoref: r.vm.Moref,
		Duration: workflow.Now(ctx).Sub(r.started), Warnings: r.warnings,
	}
	for _, d := range r.disks {
		if r.in.Destination == activities.DestinationFile {
			res.Disks = append(res.Disks, RestoredDisk{
				PointKey: d.src.Key, Output: d.file.Output, BytesRead: d.file.VirtualBytes, BytesWritten: d.file.AllocatedBytes, Duration: d.duration,
			})
			continue
		}
		res.Disks = append(res.Disks, RestoredDisk{
			PointKey: d.src.Key, VMKey: d.vmKey, BytesRead: d.write.BytesRead, BytesWritten: d.write.BytesWritten,
			Duration: d.write.Duration, Digest: d.write.Digest,
		})
	}
	return res
}
