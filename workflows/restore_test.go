package workflows

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
)

const testRestoreID = "restore-new-vm-web01-restore-p1"

func (r *run) executeRestore(in RestoreInput) (RestoreResult, error) {
	r.env.SetStartWorkflowOptions(client.StartWorkflowOptions{ID: testRestoreID, TaskQueue: activities.HubQueue})
	r.env.ExecuteWorkflow(RestoreWorkflowName, in)
	if !r.env.IsWorkflowCompleted() {
		return RestoreResult{}, errors.New("workflow did not complete")
	}
	if err := r.env.GetWorkflowError(); err != nil {
		return RestoreResult{}, err
	}
	var res RestoreResult
	err := r.env.GetWorkflowResult(&res)
	return res, err
}

func newVMInput() RestoreInput { return RestoreInput{Point: testPointID} }
func inPlaceInput() RestoreInput {
	return RestoreInput{Point: testPointID, Destination: activities.DestinationInPlace}
}

// newVMForward lists the calls of a successful two-disk restore to a new VM, in order.
var newVMForward = []string{
	"ResolvePoint", "CreateRestoreVM",
	"AllocatePorts", "StartExport 2000", "StartExport 2001",
	"EnsureTunnel", "WriteDisk 2100", "WriteDisk 2101",
	"DropTunnel", "StopExport 2000", "StopExport 2001", "ReleasePorts",
	"ReadBackDisk 2100", "ReadBackDisk 2101",
}

// inPlaceForward lists the calls of a successful in-place restore of the powered-off original.
var inPlaceForward = []string{
	"ResolvePoint", "InspectVM", "MarkRestoredInPlace",
	"AllocatePorts", "StartExport 2000", "StartExport 2001",
	"EnsureTunnel", "WriteDisk 2000", "WriteDisk 2001",
	"DropTunnel", "StopExport 2000", "StopExport 2001", "ReleasePorts",
	"ReadBackDisk 2000", "ReadBackDisk 2001",
}

func until(t *testing.T, forward []string, step string) []string {
	t.Helper()
	i := slices.Index(forward, step)
	require.GreaterOrEqual(t, i, 0, "unknown step %q", step)
	return slices.Clone(forward[:i+1])
}

func poweredOff(vm *activities.VM) { vm.PowerState = activities.PowerOff }

func TestRestoreNewVM(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	in := newVMInput()
	in.Datastore, in.Folder = "ds2", "/dc1/vm/restored"
	res, err := r.executeRestore(in)
	require.NoError(t, err)

	assert.Equal(t, newVMForward, r.fakes.recorded())
	assert.Equal(t, RestoreResult{
		PointID: testPointID, Destination: activities.DestinationNewVM, VMName: "web01-restore-p1", VMMoref: newVMMoref,
		Disks: []RestoredDisk{
			{PointKey: 2000, VMKey: 2100, BytesRead: gib, BytesWritten: gib, Duration: 2e9, Digest: "sha256:2100"},
			{PointKey: 2001, VMKey: 2101, BytesRead: gib / 8, BytesWritten: gib / 8, Duration: 2e9, Digest: "sha256:2101"},
		},
		Duration: res.Duration,
	}, res)

	require.Len(t, r.fakes.creates, 1)
	c := r.fakes.creates[0]
	assert.Equal(t, testRestoreID, c.WorkflowID)
	assert.Equal(t, activities.RestoreVMSpec{
		Name: "web01-restore-p1", Folder: "/dc1/vm/restored", Datastore: "ds2", Config: testVM().Config, SourceVMMoref: "vm-42",
	}, c.Spec)
	for _, e := range r.fakes.exports {
		assert.True(t, e.ReadOnly, "disk %d is exported read-only", e.DiskKey)
		assert.Equal(t, testTargetPath(e.DiskKey), e.Path)
	}
	require.Len(t, r.fakes.writes, 2)
	for _, w := range r.fakes.writes {
		pointKey := w.DiskKey - newVMKeyBase
		assert.Equal(t, activities.WriteDiskInput{
			HubID: testHubID, SourcePort: testPort(pointKey), SourceSocket: testExportSocket(testPort(pointKey)),
			ExportName: "disk-" + itoa(pointKey), VMMoref: newVMMoref, DiskKey: w.DiskKey, CapacityBytes: w.CapacityBytes,
			Connections: DefaultConnections,
		}, w)
		assert.Equal(t, CopyActivityID(pointKey), r.fakes.activityIDs[label(activities.WriteDiskName, w.DiskKey)],
			"LiveCopies finds the write under the point's disk key")
	}
	for _, rb := range r.fakes.readBacks {
		assert.Equal(t, activities.ReadBackDiskInput{VMMoref: newVMMoref, DiskKey: rb.DiskKey, BlockSize: 1 << 20, Digest: "sha256:" + itoa(rb.DiskKey)}, rb)
	}
	assert.Empty(t, r.fakes.powers, "never powered on unless asked")
	assert.Empty(t, r.fakes.destroys)
	assert.Empty(t, r.fakes.marks)

	p := r.progress(t)
	assert.Equal(t, StatusComplete, p.Status)
	assert.Equal(t, activities.DestinationNewVM, p.Mode)
	assert.Equal(t, testPointID, p.PointID)
	assert.Equal(t, testHubID, p.HubID)
	require.Len(t, p.Disks, 2)
	assert.Equal(t, []int32{2000, 2001}, []int32{p.Disks[0].Key, p.Disks[1].Key}, "disks keyed by the point's keys")
	for _, d := range p.Disks {
		assert.Equal(t, PhaseDone, d.Phase)
	}
	assert.Equal(t, []string{StatusRunning, StatusRunning, StatusCopying, StatusVerifying, StatusComplete}, r.statuses)
	assert.Equal(t, map[string]string{"VMName": "web01", "Site": testSite, "BackupStatus": StatusComplete}, r.attrs)
	assert.Contains(t, r.details(t), "new VM web01-restore-p1")
}

func itoa(key int32) string { return label("", key)[1:] }

func TestRestoreNewVMPowersOnOnlyWhenAsked(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	in := newVMInput()
	in.PowerOn, in.Name = true, "web01-copy"
	res, err := r.executeRestore(in)
	require.NoError(t, err)
	assert.Equal(t, append(slices.Clone(newVMForward), "SetPower poweredOn"), r.fakes.recorded())
	assert.Equal(t, []activities.SetPowerInput{{VMMoref: newVMMoref, State: activities.PowerOn}}, r.fakes.powers)
	assert.Equal(t, "web01-copy", res.VMName)
}

// A restored and verified VM that does not start is kept, with a warning.
func TestRestoreNewVMPowerOnFailureIsWarning(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.fail["SetPower poweredOn"] = injected("SetPower poweredOn")
	in := newVMInput()
	in.PowerOn = true
	res, err := r.executeRestore(in)
	require.NoError(t, err)
	require.Len(t, res.Warnings, 1)
	assert.Contains(t, res.Warnings[0], "VM web01-restore-p1 is restored but did not power on")
	assert.Empty(t, r.fakes.destroys)
}

// newVMUndosAfter is what must run, in this order, when the step of a restore to a new VM
// fails: the VM is destroyed last, after the tunnel, exports and leases that reach it.
var newVMUndosAfter = map[string][]string{
	"ResolvePoint":      nil,
	"CreateRestoreVM":   {"DestroyRestoreVM"},
	"AllocatePorts":     {"ReleasePorts", "DestroyRestoreVM"},
	"StartExport 2000":  {"StopExport 2000", "ReleasePorts", "DestroyRestoreVM"},
	"StartExport 2001":  {"StopExport 2001", "StopExport 2000", "ReleasePorts", "DestroyRestoreVM"},
	"EnsureTunnel":      {"DropTunnel", "StopExport 2001", "StopExport 2000", "ReleasePorts", "DestroyRestoreVM"},
	"WriteDisk 2101":    {"DropTunnel", "StopExport 2001", "StopExport 2000", "ReleasePorts", "DestroyRestoreVM"},
	"DropTunnel":        {"StopExport 2001", "StopExport 2000", "ReleasePorts", "DestroyRestoreVM"},
	"StopExport 2000":   {"StopExport 2001", "ReleasePorts", "DestroyRestoreVM"},
	"StopExport 2001":   {"ReleasePorts", "DestroyRestoreVM"},
	"ReleasePorts":      {"DestroyRestoreVM"},
	"ReadBackDisk 2100": {"DestroyRestoreVM"},
	"ReadBackDisk 2101": {"DestroyRestoreVM"},
}

// newVMUndosAfterCancel: a cancelled teardown step may not have run, so it stays registered.
var newVMUndosAfterCancel = map[string][]string{
	"DropTunnel":      newVMUndosAfter["EnsureTunnel"],
	"StopExport 2000": newVMUndosAfter["DropTunnel"],
	"StopExport 2001": newVMUndosAfter["StopExport 2000"],
	"ReleasePorts":    {"ReleasePorts", "DestroyRestoreVM"},
}

func stepsOf(forward []string, undos map[string][]string) []string {
	var out []string
	for _, c := range forward {
		if _, ok := undos[c]; ok {
			out = append(out, c)
		}
	}
	return out
}

func TestRestoreNewVMFailureCompensates(t *testing.T) {
	for _, step := range stepsOf(newVMForward, newVMUndosAfter) {
		t.Run(step, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			r.fakes.fail[step] = injected(step)
			_, err := r.executeRestore(newVMInput())

			var appErr *temporal.ApplicationError
			require.ErrorAs(t, err, &appErr)
			assert.Equal(t, "Injected", appErr.Type(), "the original error is returned")
			assert.Contains(t, err.Error(), "injected failure at "+step)
			assert.Equal(t, append(until(t, newVMForward, step), newVMUndosAfter[step]...), r.fakes.recorded())
			r.assertRestoreFailed(t, StatusFailed, "injected failure at "+step)
			if slices.Contains(newVMUndosAfter[step], "DestroyRestoreVM") {
				require.Len(t, r.fakes.destroys, 1)
				d := r.fakes.destroys[0]
				assert.Equal(t, testRestoreID, d.WorkflowID)
				assert.Equal(t, "web01-restore-p1", d.Name)
				if step == "CreateRestoreVM" {
					assert.Empty(t, d.Moref, "a failed create is undone by name")
				} else {
					assert.Equal(t, newVMMoref, d.Moref)
				}
			}
		})
	}
}

func TestRestoreNewVMCancelCompensates(t *testing.T) {
	for _, step := range stepsOf(newVMForward, newVMUndosAfter) {
		t.Run(step, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			r.fakes.blockAt = step
			r.fakes.onBlock = r.env.CancelWorkflow
			_, err := r.executeRestore(newVMInput())

			var canceled *temporal.CanceledError
			require.ErrorAs(t, err, &canceled)
			undos := newVMUndosAfter[step]
			if u, ok := newVMUndosAfterCancel[step]; ok {
				undos = u
			}
			assert.Equal(t, append(until(t, newVMForward, step), undos...), r.fakes.recorded())
			r.assertRestoreFailed(t, StatusCancelled, "canceled")
		})
	}
}

// assertRestoreFailed checks what an operator sees of a failed or cancelled restore.
func (r *run) assertRestoreFailed(t *testing.T, status, errText string) {
	t.Helper()
	assert.Equal(t, status, r.attrs[BackupStatusKey.GetName()])
	p := r.progress(t)
	assert.Equal(t, status, p.Status)
	assert.Contains(t, p.Error, errText)
	assert.Empty(t, p.UndoErrors)
	for _, d := range p.Disks {
		assert.Equal(t, PhaseFailed, d.Phase, "disk %d", d.Key)
	}
	assert.Empty(t, r.fakes.powers, "a failed restore powers nothing on")
}

// A point kept before VM configurations were captured cannot become a new VM: refused before
// anything is created.
func TestRestoreNewVMWithoutConfigIsRefused(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.changeSrc = func(s *activities.RestoreSource) { s.Config = nil }
	_, err := r.executeRestore(newVMInput())
	var appErr *temporal.ApplicationError
	require.ErrorAs(t, err, &appErr)
	assert.Equal(t, activities.ErrBadInput, appErr.Type())
	assert.Contains(t, err.Error(), "point p1 has no VM configuration")
	assert.Equal(t, []string{"ResolvePoint"}, r.fakes.recorded())
}

// One disk of the point: the new VM gets only that disk and only it is written.
func TestRestoreNewVMSelectedDisk(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	in := newVMInput()
	in.Disks = []int32{2001}
	res, err := r.executeRestore(in)
	require.NoError(t, err)
	require.Len(t, r.fakes.creates, 1)
	require.Len(t, r.fakes.creates[0].Spec.Config.Disks, 1)
	assert.Equal(t, int32(2001), r.fakes.creates[0].Spec.Config.Disks[0].Key)
	require.Len(t, res.Disks, 1)
	assert.Equal(t, int32(2101), res.Disks[0].VMKey)
	assert.Equal(t, []activities.ResolvePointInput{{PointID: testPointID, Disks: []int32{2001}}}, r.fakes.resolves)
	assert.Len(t, testVM().Config.Disks, 2, "the source's configuration is not changed")
}

func TestRestoreInPlace(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.changeVM = poweredOff
	res, err := r.executeRestore(inPlaceInput())
	require.NoError(t, err)
	assert.Equal(t, inPlaceForward, r.fakes.recorded())
	assert.Equal(t, []activities.InspectVMInput{{VM: "vm-42"}}, r.fakes.inspects, "the point's VM, by moref")
	assert.Equal(t, []activities.MarkRestoredInPlaceInput{{
		InstanceUUID: "5012-aaaa", VMMoref: "vm-42", Reason: "disks restored in place from point p1 by " + testRestoreID,
	}}, r.fakes.marks)
	for _, w := range r.fakes.writes {
		assert.Equal(t, "vm-42", w.VMMoref)
	}
	assert.Equal(t, "web01", res.VMName)
	assert.Equal(t, int32(2000), res.Disks[0].VMKey)
	assert.Empty(t, r.fakes.powers)
	assert.Empty(t, r.fakes.creates)
	assert.Equal(t, activities.DestinationInPlace, r.progress(t).Mode)
}

// A powered-on VM is refused with the message the CLI shows, before anything is created
// or marked.
func TestRestoreInPlaceRefusedWhilePoweredOn(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	_, err := r.executeRestore(inPlaceInput())
	var appErr *temporal.ApplicationError
	require.ErrorAs(t, err, &appErr)
	assert.Equal(t, activities.ErrPoweredOn, appErr.Type())
	assert.True(t, appErr.NonRetryable())
	assert.Equal(t, "VM web01 is powered on; power it off or pass --power-off", appErr.Message())
	assert.Equal(t, []string{"ResolvePoint", "InspectVM"}, r.fakes.recorded())
	assert.Empty(t, r.fakes.marks)
	assert.NotContains(t, err.Error(), "partial")
	r.assertRestoreFailed(t, StatusFailed, "powered on")
}

// With PowerOff the VM is powered off first, and never powered on again.
func TestRestoreInPlacePowersOffWhenAllowed(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	in := inPlaceInput()
	in.PowerOff = true
	_, err := r.executeRestore(in)
	require.NoError(t, err)
	want := slices.Insert(slices.Clone(inPlaceForward), 3, "SetPower poweredOff")
	assert.Equal(t, want, r.fakes.recorded())
	assert.Equal(t, []activities.SetPowerInput{{VMMoref: "vm-42", State: activities.PowerOff}}, r.fakes.powers)
}

// The mark comes before any write, so even a restore that fails mid-write leaves the VM
// marked for a full next backup; the error says the disks are partial, and the VM stays off.
func TestRestoreInPlaceFailureSaysDisksArePartial(t *testing.T) {
	for _, step := range []string{"WriteDisk 2001", "ReadBackDisk 2000", "DropTunnel"} {
		t.Run(step, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			r.fakes.changeVM = poweredOff
			r.fakes.fail[step] = injected(step)
			in := inPlaceInput()
			in.PowerOn = true
			_, err := r.executeRestore(in)
			var appErr *temporal.ApplicationError
			require.ErrorAs(t, err, &appErr)
			assert.Equal(t, "Injected", appErr.Type())
			assert.Contains(t, err.Error(), "in-place restore of VM web01 (vm-42) failed: the VM's disks are now partial and it is not powered on")
			assert.Contains(t, err.Error(), "injected failure at "+step)
			calls := r.fakes.recorded()
			assert.Less(t, slices.Index(calls, "MarkRestoredInPlace"), slices.Index(calls, "WriteDisk 2000"))
			assert.Len(t, r.fakes.marks, 1)
			assert.Empty(t, r.fakes.powers, "not powered on, though asked")
			assert.Contains(t, r.progress(t).Error, "partial")
		})
	}
}

// A failure before the first write leaves the VM's disks untouched: no "partial". The mark
// made before it stays: the next backup is full, at worst one full more than needed.
func TestRestoreInPlaceFailureBeforeWritesIsClean(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.changeVM = poweredOff
	r.fakes.fail["EnsureTunnel"] = injected("EnsureTunnel")
	_, err := r.executeRestore(inPlaceInput())
	require.Error(t, err)
	assert.NotContains(t, err.Error(), "partial")
	assert.Len(t, r.fakes.marks, 1)
	assert.Equal(t, append(until(t, inPlaceForward, "EnsureTunnel"), "DropTunnel", "StopExport 2001", "StopExport 2000", "ReleasePorts"),
		r.fakes.recorded())
}

// A backup of the VM running when the mark is asked for: the hub refuses the mark
// (ErrBackupRunning, nothing marked) and the restore ends failed at once, not retried,
// without "partial", before anything is exported or written and before the running VM is
// powered off (powering off was allowed).
func TestRestoreInPlaceRefusedWhileBackupRuns(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	refusal := "vmMoref: a backup of VM vm-42 is running (workflow backup-vm-42); wait for it or cancel it"
	r.fakes.fail[activities.MarkRestoredInPlaceName] = temporal.NewNonRetryableApplicationError(refusal, activities.ErrBackupRunning, nil)
	in := inPlaceInput()
	in.PowerOff = true // allowed, but the running VM is left running: the refusal comes first
	_, err := r.executeRestore(in)
	var appErr *temporal.ApplicationError
	require.ErrorAs(t, err, &appErr)
	assert.Equal(t, activities.ErrBackupRunning, appErr.Type())
	assert.Contains(t, err.Error(), refusal)
	assert.NotContains(t, err.Error(), "partial")
	assert.Equal(t, 1, r.fakes.attempts[activities.MarkRestoredInPlaceName], "a refused mark is not retried")
	assert.Equal(t, until(t, inPlaceForward, "MarkRestoredInPlace"), r.fakes.recorded(), "nothing exported, written or powered off")
	r.assertRestoreFailed(t, StatusFailed, refusal)
}

// Cancelled mid-write: the other write is cancelled too and waited for, then everything set
// up is torn down in reverse order; the VM is not powered on.
func TestRestoreInPlaceCancelMidWrite(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.changeVM = poweredOff
	r.fakes.blockAt = "WriteDisk 2001"
	r.fakes.onBlock = r.env.CancelWorkflow
	_, err := r.executeRestore(inPlaceInput())
	var canceled *temporal.CanceledError
	require.ErrorAs(t, err, &canceled)
	assert.Equal(t, append(until(t, inPlaceForward, "WriteDisk 2001"), "DropTunnel", "StopExport 2001", "StopExport 2000", "ReleasePorts"),
		r.fakes.recorded())
	r.assertRestoreFailed(t, StatusCancelled, "canceled")
	assert.Contains(t, r.progress(t).Error, "partial")
}

// The VM found by the point's moref must be the point's VM with the point's disks.
func TestRestoreInPlaceChecksTheVM(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(*activities.VM)
		want   string
	}{
		{"other vCenter", func(vm *activities.VM) { vm.InstanceUUID = "5012-bbbb" }, "is in vCenter 5012-bbbb, the point's VM vm-42 was in vCenter 5012-aaaa"},
		{"disk gone", func(vm *activities.VM) { vm.Disks = vm.Disks[:1] }, "disks: VM web01 has no disk 2001 any more"},
		{"disk resized", func(vm *activities.VM) { vm.Disks[1].CapacityBytes *= 2 }, "disks: disk 2001 of VM web01 has 17179869184 bytes, the point's 8589934592"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			r.fakes.changeVM = func(vm *activities.VM) { poweredOff(vm); tc.change(vm) }
			_, err := r.executeRestore(inPlaceInput())
			var appErr *temporal.ApplicationError
			require.ErrorAs(t, err, &appErr)
			assert.Equal(t, activities.ErrBadInput, appErr.Type())
			assert.Contains(t, err.Error(), tc.want)
			assert.Equal(t, []string{"ResolvePoint", "InspectVM"}, r.fakes.recorded(), "nothing created, nothing marked")
		})
	}
}

func TestRestoreFile(t *testing.T) {
	t.Run("one disk", func(t *testing.T) {
		r := newRun(t, activities.ModeFull)
		in := RestoreInput{Point: testPointID, Destination: activities.DestinationFile, Disks: []int32{2000}, Format: activities.FormatVMDK, Output: "/srv/x.vmdk"}
		res, err := r.executeRestore(in)
		require.NoError(t, err)
		assert.Equal(t, []string{"ResolvePoint", "RestoreFile 2000"}, r.fakes.recorded())
		assert.Equal(t, []activities.RestoreFileInput{{Path: testTargetPath(2000), Format: activities.FormatVMDK, Output: "/srv/x.vmdk"}}, r.fakes.files)
		require.Len(t, res.Disks, 1)
		assert.Equal(t, RestoredDisk{PointKey: 2000, Output: "/srv/x.vmdk", BytesRead: 64 * gib, BytesWritten: gib}, res.Disks[0])
		assert.Equal(t, activities.DestinationFile, res.Destination)
		assert.Equal(t, StatusComplete, r.progress(t).Status)
		assert.NotContains(t, r.attrs, "Site", "a file restore involves no site")
	})
	t.Run("every disk", func(t *testing.T) {
		r := newRun(t, activities.ModeFull)
		in := RestoreInput{Point: testPointID, Destination: activities.DestinationFile, Format: activities.FormatQCOW2, Output: "/srv/restored"}
		_, err := r.executeRestore(in)
		require.NoError(t, err)
		assert.Equal(t, []activities.RestoreFileInput{
			{Path: testTargetPath(2000), Format: activities.FormatQCOW2, Output: "/srv/restored/disk-2000.qcow2"},
			{Path: testTargetPath(2001), Format: activities.FormatQCOW2, Output: "/srv/restored/disk-2001.qcow2"},
		}, r.fakes.files)
	})
	t.Run("failure", func(t *testing.T) {
		r := newRun(t, activities.ModeFull)
		r.fakes.fail["RestoreFile 2001"] = injected("RestoreFile 2001")
		in := RestoreInput{Point: testPointID, Destination: activities.DestinationFile, Format: activities.FormatRaw, Output: "/srv/restored"}
		_, err := r.executeRestore(in)
		require.ErrorContains(t, err, "injected failure at RestoreFile 2001")
		assert.Equal(t, []string{"ResolvePoint", "RestoreFile 2000", "RestoreFile 2001"}, r.fakes.recorded())
		r.assertRestoreFailed(t, StatusFailed, "RestoreFile 2001")
	})
}

// Bad input fails at once, non-retryable, naming the field, before any step runs.
func TestRestoreBadInput(t *testing.T) {
	file := func(format, output string) RestoreInput {
		return RestoreInput{Point: testPointID, Destination: activities.DestinationFile, Format: format, Output: output}
	}
	for _, tc := range []struct {
		in   RestoreInput
		want string
	}{
		{RestoreInput{}, "point: required"},
		{RestoreInput{Point: "p1", VM: "web01"}, "point, vm: give one of them, not both"},
		{RestoreInput{Point: "../p1"}, "point: \"../p1\" is not a point ID"},
		{RestoreInput{VM: "VirtualMachine:x"}, "vm: \"VirtualMachine:x\" is not a VM moref"},
		{RestoreInput{Point: "p1", Destination: "tape"}, "destination: \"tape\" is not one of new-vm, in-place, file"},
		{RestoreInput{Point: "p1", Disks: []int32{2000, 2000}}, "disks: key 2000 listed twice"},
		{RestoreInput{Point: "p1", Site: "no site"}, "site: \"no site\" is not a valid site name"},
		{RestoreInput{Point: "p1", Name: "a/b"}, "name: \"a/b\" contains '/'"},
		{RestoreInput{Point: "p1", Name: strings.Repeat("a", 81)}, "name: \"" + strings.Repeat("a", 81) + "\" is longer than 80 characters"},
		{RestoreInput{Point: "p1", Folder: "vm/x"}, "folder: \"vm/x\" is not an absolute inventory path"},
		{RestoreInput{Point: "p1", Host: "/dc1//h"}, "host: inventory path \"/dc1//h\" has an empty"},
		{RestoreInput{Point: "p1", PowerOff: true}, "powerOff: only for destination in-place, not new-vm"},
		{RestoreInput{Point: "p1", Destination: activities.DestinationInPlace, Name: "x"}, "name: only for destination new-vm, not in-place"},
		{RestoreInput{Point: "p1", Output: "/x"}, "output: only for destination file, not new-vm"},
		{file("", "/srv/x"), "format: required"},
		{file("vhdx", "/srv/x"), "format: \"vhdx\" is not one of raw, qcow2, vmdk"},
		{file("raw", ""), "output: required"},
		{file("raw", "x.raw"), "output: \"x.raw\" is not a clean absolute path"},
		{file("raw", "/srv/../etc/x"), "output: \"/srv/../etc/x\" is not a clean absolute path"},
		{RestoreInput{Point: "p1", Destination: activities.DestinationFile, Format: "raw", Output: "/x", PowerOn: true}, "powerOn: only for destination new-vm or in-place, not file"},
		{RestoreInput{Point: "p1", Connections: MaxConnections + 1}, "connections: 17 is outside 0..16"},
		{RestoreInput{Point: "p1", WorkerWaitSeconds: -1}, "workerWaitSeconds: -1 is outside"},
		{RestoreInput{Point: "p1", Bandwidth: "50MB"}, `bandwidth: "50MB" is not a bandwidth (e.g. 50Mbit, 1Gbit, 12.5MB/s, 800KiB/s)`},
		{RestoreInput{Point: "p1", Destination: activities.DestinationInPlace, Bandwidth: "10kbit"}, `bandwidth: bandwidth "10kbit" is below the minimum of 1Mbit`},
		{RestoreInput{Point: "p1", Destination: activities.DestinationFile, Format: "raw", Output: "/x", Bandwidth: "50Mbit"},
			"bandwidth: only for destination new-vm or in-place, not file"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			_, err := r.executeRestore(tc.in)
			var appErr *temporal.ApplicationError
			require.ErrorAs(t, err, &appErr)
			assert.Equal(t, activities.ErrBadInput, appErr.Type())
			assert.True(t, appErr.NonRetryable())
			assert.Contains(t, err.Error(), "invalid restore input: "+tc.want)
			assert.Empty(t, r.fakes.recorded())
			assert.Equal(t, StatusFailed, r.attrs[BackupStatusKey.GetName()])
		})
	}
}

// A misspelt field fails the run naming it, as for a backup.
func TestRestoreRejectsUnknownFields(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.env.SetStartWorkflowOptions(client.StartWorkflowOptions{ID: testRestoreID, TaskQueue: activities.HubQueue})
	r.env.ExecuteWorkflow(RestoreWorkflowName, map[string]any{"point": "p1", "disk": []int{2000}})
	err := r.env.GetWorkflowError()
	require.Error(t, err)
	assert.Contains(t, err.Error(), `unknown field "disk"`)
	assert.Empty(t, r.fakes.recorded())
}

// A point the hub refuses (unknown, failed, lacking a disk) fails the restore with its message.
func TestRestoreUnknownDiskOfPoint(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	in := newVMInput()
	in.Disks = []int32{2002}
	_, err := r.executeRestore(in)
	var appErr *temporal.ApplicationError
	require.ErrorAs(t, err, &appErr)
	assert.Equal(t, activities.ErrBadInput, appErr.Type())
	assert.Contains(t, err.Error(), "disks: point p1 has no disk 2002")
	assert.Equal(t, []string{"ResolvePoint"}, r.fakes.recorded(), "not retried, nothing created")
}

// The restore steps get the options of their kind: writes like backup copies, whole-disk
// reads and vCenter tasks heartbeat, the catalog steps outlast a catalog restart (checked with
// every catalog step in TestCatalogStepsRetryForFiveMinutes).
func TestRestoreStepOptions(t *testing.T) {
	var j job
	sna := activities.SNAQueue(testSite)
	copyOpts, writeOpts := j.options(activities.CopyDiskName, sna, ""), j.options(activities.WriteDiskName, sna, "")
	assert.Equal(t, copyOpts.StartToCloseTimeout, writeOpts.StartToCloseTimeout)
	assert.Equal(t, copyOpts.HeartbeatTimeout, writeOpts.HeartbeatTimeout)
	assert.Equal(t, copyOpts.RetryPolicy, writeOpts.RetryPolicy)
	for _, name := range []string{activities.ReadBackDiskName, activities.RestoreFileName, activities.CreateRestoreVMName,
		activities.SetPowerName, activities.DestroyRestoreVMName} {
		opts := j.options(name, sna, name)
		assert.Positive(t, opts.HeartbeatTimeout, name)
		assert.LessOrEqual(t, opts.HeartbeatTimeout, time.Minute, name)
		assert.GreaterOrEqual(t, opts.StartToCloseTimeout, 5*time.Minute, name)
		assert.Equal(t, DefaultWorkerWait, opts.ScheduleToStartTimeout, name)
	}
	for _, name := range []string{activities.CreateRestoreVMName, activities.SetPowerName, activities.DestroyRestoreVMName} {
		assert.LessOrEqual(t, j.options(name, sna, name).StartToCloseTimeout, 30*time.Minute, name)
	}
	assert.True(t, usesCatalog[activities.ResolvePointName])
	assert.True(t, usesCatalog[activities.MarkRestoredInPlaceName])
	assert.Contains(t, nonRetryable, activities.ErrPoweredOn)
	assert.Contains(t, nonRetryable, activities.ErrMismatch)
}

// A read-back that differs fails the restore at once (no retry can make it equal), and the
// new VM is removed.
func TestRestoreMismatchIsNotRetried(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.fail["ReadBackDisk 2101"] = temporal.NewApplicationError("disk 2101 differs from the point at block 7", activities.ErrMismatch)
	_, err := r.executeRestore(newVMInput())
	require.ErrorContains(t, err, "differs from the point")
	assert.Equal(t, 1, r.fakes.attempts["ReadBackDisk 2101"])
	assert.Equal(t, append(until(t, newVMForward, "ReadBackDisk 2101"), "DestroyRestoreVM"), r.fakes.recorded())
}

// A restore for a site no SNA polls fails naming the queue, and says "restore" in what it
// waits for.
func TestRestoreNoWorkerFailsNamingTheQueue(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.fail["CreateRestoreVM"] = scheduleToStartTimeout()
	waiting := ""
	r.env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, _ converter.EncodedValues) {
		if info.ActivityType.Name == activities.CreateRestoreVMName {
			waiting = r.progress(t).WaitingFor
		}
	})
	_, err := r.executeRestore(newVMInput())
	var appErr *temporal.ApplicationError
	require.ErrorAs(t, err, &appErr)
	assert.Equal(t, activities.ErrNoWorker, appErr.Type())
	assert.Contains(t, err.Error(), "no SNA is polling diskferry-sna.lab")
	assert.Equal(t, "the SNA of site lab to run CreateRestoreVM (task queue diskferry-sna.lab; the restore fails if no worker takes it within 2m0s)", waiting)
	assert.Equal(t, []string{"ResolvePoint", "CreateRestoreVM", "DestroyRestoreVM"}, r.fakes.recorded())
}
