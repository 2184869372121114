package hub

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/heartbeat"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/outfile"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/text"
)

func notFound(format string, args ...any) error {
	return temporal.NewNonRetryableApplicationError(fmt.Sprintf(format, args...), activities.ErrNotFound, nil)
}

// ResolvePoint finds the complete point to restore, by its ID or as the latest complete
// point of a VM (by name or moref), with the disks asked for and each disk's backing chain.
// An unknown point or VM is ErrNotFound; a failed or running point, a disk the point lacks
// and an ambiguous VM name are ErrBadInput; each message names the field.
func (a *Activities) ResolvePoint(ctx context.Context, in activities.ResolvePointInput) (activities.RestoreSource, error) {
	point, vm, err := a.findPoint(ctx, in)
	if err != nil {
		return activities.RestoreSource{}, err
	}
	switch point.Status {
	case catalog.StatusComplete:
	case catalog.StatusFailed:
		return activities.RestoreSource{}, badInput("point: %s is failed (error %s); only complete points can be restored",
			point.ID, text.Shorten(point.Error, 200))
	default:
		return activities.RestoreSource{}, badInput("point: %s is %s (workflow %s); only complete points can be restored",
			point.ID, point.Status, point.WorkflowID)
	}
	disks, err := pickDisks(point, in.Disks)
	if err != nil {
		return activities.RestoreSource{}, err
	}
	if err := a.waitForRetention(ctx, "resolve point "+point.ID, vm); err != nil {
		return activities.RestoreSource{}, err
	}
	chain, err := a.store.ChainOf(ctx, point.ID)
	if err != nil {
		return activities.RestoreSource{}, fmt.Errorf("resolve point %s: %w", point.ID, err)
	}
	src := activities.RestoreSource{
		PointID: point.ID, HubID: point.Hub, Site: point.Site, VMName: vm.Name, VMMoref: vm.Moref,
		InstanceUUID: vm.InstanceUUID, Mode: point.Mode, FinishedAt: point.FinishedAt, Config: point.VMConfig,
	}
	for _, d := range disks {
		n, err := chainLength(chain, d)
		if err != nil {
			return activities.RestoreSource{}, badInput("point: %s disk %d: %v", point.ID, d.Key, err)
		}
		src.Disks = append(src.Disks, activities.SourceDisk{Key: d.Key, CapacityBytes: d.CapacityBytes, Path: d.Path, Chain: n})
	}
	return src, nil
}

// findPoint looks the point up by ID, or takes the VM's latest complete point.
func (a *Activities) findPoint(ctx context.Context, in activities.ResolvePointInput) (catalog.Point, catalog.VM, error) {
	if in.PointID != "" {
		point, err := a.store.GetPoint(ctx, in.PointID)
		if errors.Is(err, catalog.ErrNotFound) {
			return catalog.Point{}, catalog.VM{}, notFound("point: no restore point %s", in.PointID)
		}
		if err != nil {
			return catalog.Point{}, catalog.VM{}, fmt.Errorf("resolve point %s: %w", in.PointID, err)
		}
		vm, err := a.store.GetVM(ctx, point.VMID)
		if err != nil {
			return catalog.Point{}, catalog.VM{}, fmt.Errorf("resolve point %s: %w", in.PointID, err)
		}
		if in.VM != "" && in.VM != vm.Name && in.VM != vm.Moref {
			return catalog.Point{}, catalog.VM{}, badInput("vm: point %s is of VM %s (%s), not %s", point.ID, vm.Name, vm.Moref, in.VM)
		}
		return point, vm, nil
	}
	if in.VM == "" {
		return catalog.Point{}, catalog.VM{}, badInput("point: name a restore point or a VM")
	}
	vm, err := a.findVM(ctx, in.VM, "the moref or a point ID")
	if err != nil {
		return catalog.Point{}, catalog.VM{}, err
	}
	point, err := a.store.LastCompletePoint(ctx, vm.ID)
	if errors.Is(err, catalog.ErrNotFound) {
		return catalog.Point{}, catalog.VM{}, notFound("vm: VM %s (%s) has no complete restore point", vm.Name, vm.Moref)
	}
	if err != nil {
		return catalog.Point{}, catalog.VM{}, fmt.Errorf("resolve latest point of VM %s: %w", in.VM, err)
	}
	return point, vm, nil
}

// pickDisks returns the point's disks named by keys (all of them when keys is empty).
func pickDisks(point catalog.Point, keys []int32) ([]catalog.PointDisk, error) {
	if len(keys) == 0 {
		return point.Disks, nil
	}
	var out []catalog.PointDisk
	for _, k := range keys {
		i := slices.IndexFunc(point.Disks, func(d catalog.PointDisk) bool { return d.Key == k })
		if i < 0 {
			has := make([]string, len(point.Disks))
			for j, d := range point.Disks {
				has[j] = strconv.Itoa(int(d.Key))
			}
			return nil, badInput("disks: point %s has no disk %d (it has %s)", point.ID, k, strings.Join(has, ", "))
		}
		if slices.ContainsFunc(out, func(d catalog.PointDisk) bool { return d.Key == k }) {
			return nil, badInput("disks: disk %d is listed twice", k)
		}
		out = append(out, point.Disks[i])
	}
	return out, nil
}

// chainLength counts the files of a disk's backing chain, following each file's parent
// through the points of the chain (a disk copied in full in an incremental point starts
// its own chain).
func chainLength(chain []catalog.Point, d catalog.PointDisk) (int, error) {
	n := 1
	for parent := d.ParentPath; parent != ""; n++ {
		if n > len(chain) {
			return 0, fmt.Errorf("backing chain of %s is longer than the point's chain of %d points", d.Path, len(chain))
		}
		found := false
		for _, p := range chain {
			for _, pd := range p.Disks {
				if pd.Key == d.Key && pd.Path == parent {
					parent, found = pd.ParentPath, true
				}
			}
		}
		if !found {
			return 0, fmt.Errorf("backing file %s is in none of the points of its chain", parent)
		}
	}
	return n, nil
}

// MarkRestoredInPlace records that the VM's next backup must be full, with the reason:
// its disks were overwritten from a point, so CBT no longer describes what our points hold.
// It records this activity's workflow as the restore, so PlanBackup refuses the VM while that
// workflow is open. It refuses (ErrBackupRunning, nothing marked) while a backup of the VM
// runs: a snapshot taken during the restore would hold half-written disks. A running point of
// a closed workflow is abandoned: it is marked failed and the VM marked. Idempotent;
// PlanBackup plans every disk full with the reason until a full point opened after the mark
// completes.
func (a *Activities) MarkRestoredInPlace(ctx context.Context, in activities.MarkRestoredInPlaceInput) error {
	switch {
	case in.InstanceUUID == "":
		return badInput("instanceUuid: empty")
	case in.VMMoref == "":
		return badInput("vmMoref: empty")
	case strings.TrimSpace(in.Reason) == "":
		return badInput("reason: empty")
	}
	what := "mark VM " + in.VMMoref + " restored in place"
	workflowID := activity.GetInfo(ctx).WorkflowExecution.ID
	mark := func() error { return a.store.MarkNextFull(ctx, in.InstanceUUID, in.VMMoref, in.Reason, workflowID) }
	err := mark()
	var running *catalog.BackupRunningError
	if errors.As(err, &running) {
		abandoned, failErr := a.failAbandoned(ctx, running.PointID, running.WorkflowID)
		if failErr != nil {
			return classify(what, failErr)
		}
		if abandoned {
			err = mark()
		}
	}
	if errors.As(err, &running) {
		return temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("vmMoref: a backup of VM %s is running (workflow %s); wait for it or cancel it", in.VMMoref, running.WorkflowID),
			activities.ErrBackupRunning, nil)
	}
	if errors.Is(err, catalog.ErrNotFound) {
		return notFound("vmMoref: no VM %s of vCenter %s in the catalog", in.VMMoref, in.InstanceUUID)
	}
	return classify(what, err)
}

// Bounds of RestoreFile's waits on qemu-img: it reports every 1% of the disk, so a
// conversion or comparison silent for this long is hung, not slow.
const restoreFileStall = 30 * time.Minute

// restoreBeat is how often RestoreFile heartbeats.
const restoreBeat = 5 * time.Second

// RestoreFile writes a point's disk (its whole chain flattened) to a file on this hub as raw,
// standalone qcow2 or streamOptimized vmdk. The output must be an absolute path that does
// not exist, in an existing directory outside the repository; it is written under a
// temporary name beside it, compared with the point, synced and only then given its name,
// mode 0640. Heartbeats RestoreFileProgress. A retry after a lost reply finds the file
// there: it is accepted when it is identical to the point, else refused.
func (a *Activities) RestoreFile(ctx context.Context, in activities.RestoreFileInput) (activities.RestoreFileResult, error) {
	outFormat, options, err := restoreFormat(in.Format)
	if err != nil {
		return activities.RestoreFileResult{}, err
	}
	if !a.layout.Contains(in.Path) {
		return activities.RestoreFileResult{}, badInput("path: %q is outside the repository", in.Path)
	}
	if _, err := os.Stat(in.Path); errors.Is(err, os.ErrNotExist) {
		return activities.RestoreFileResult{}, notFound("path: %s does not exist on hub %s", in.Path, a.settings.HubID)
	} else if err != nil {
		return activities.RestoreFileResult{}, fmt.Errorf("restore file: %w", err)
	}
	if a.layout.Contains(in.Output) {
		return activities.RestoreFileResult{}, badInput("output: %s is inside the repository %s", in.Output, a.layout.Root)
	}
	beat := heartbeat.Start(ctx, restoreBeat, activities.RestoreFileProgress{Phase: activities.RestoreFilePhaseConvert})
	defer beat.Stop()
	point := qemu.QCOW2(in.Path)
	compare := func(path string) error {
		res, err := qemu.CompareProgress(ctx, point, qemu.Image{Path: path, Format: outFormat}, func(p float64) {
			beat.Record(activities.RestoreFileProgress{Percent: p, Phase: activities.RestoreFilePhaseCompare})
		}, restoreFileStall)
		if err != nil {
			return fmt.Errorf("restore file: %w", err)
		}
		if !res.Equal {
			return temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("output: %s differs from point file %s: %s", in.Output, in.Path, res.Message), activities.ErrMismatch, nil)
		}
		return nil
	}

	pending, err := outfile.Create(in.Output)
	if errors.Is(err, outfile.ErrExists) && activity.GetInfo(ctx).Attempt > 1 {
		// The earlier attempt may have named the file and lost its reply.
		if cmpErr := compare(in.Output); cmpErr == nil {
			a.log.InfoContext(ctx, "restore file: the output an earlier attempt wrote is there and identical", "output", in.Output)
			return a.restoreFileResult(ctx, in, outFormat)
		}
	}
	if err != nil {
		return activities.RestoreFileResult{}, outputError(err)
	}
	err = qemu.Convert(ctx, point, qemu.Image{Path: pending.Temp(), Format: outFormat}, qemu.ConvertOptions{
		Options: options, StallTimeout: restoreFileStall,
		OnProgress: func(p float64) {
			beat.Record(activities.RestoreFileProgress{Percent: p, Phase: activities.RestoreFilePhaseConvert})
		},
	})
	if err == nil {
		err = compare(pending.Temp())
	}
	if err == nil {
		err = pending.Commit()
	}
	if err != nil {
		if discardErr := pending.Discard(); discardErr != nil {
			a.log.ErrorContext(ctx, "restore file: remove temporary file", "err", discardErr)
		}
		return activities.RestoreFileResult{}, outputError(err)
	}
	a.log.InfoContext(ctx, "restore file written", "path", in.Path, "output", in.Output, "format", outFormat)
	return a.restoreFileResult(ctx, in, outFormat)
}

func (a *Activities) restoreFileResult(ctx context.Context, in activities.RestoreFileInput, format string) (activities.RestoreFileResult, error) {
	infoCtx, cancel := context.WithTimeout(ctx, imageMetadataTimeout)
	defer cancel()
	info, err := qemu.Info(infoCtx, in.Path)
	if err != nil {
		return activities.RestoreFileResult{}, fmt.Errorf("restore file: %w", err)
	}
	st, err := os.Stat(in.Output)
	if err != nil {
		return activities.RestoreFileResult{}, fmt.Errorf("restore file: %w", err)
	}
	var allocated int64
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		allocated = sys.Blocks * 512
	}
	return activities.RestoreFileResult{Output: in.Output, Format: format, VirtualBytes: info.VirtualSize, AllocatedBytes: allocated}, nil
}

// restoreFormat maps a restore format to qemu-img's output format and options.
func restoreFormat(format string) (string, string, error) {
	switch format {
	case activities.FormatRaw:
		return qemu.FormatRaw, "", nil
	case activities.FormatQCOW2:
		return qemu.FormatQCOW2, "", nil
	case activities.FormatVMDK:
		return qemu.FormatVMDK, qemu.StreamOptimized, nil
	}
	return "", "", badInput("format: %q is not %s, %s or %s", format, activities.FormatRaw, activities.FormatQCOW2, activities.FormatVMDK)
}

// outputError makes the errors about the output a retry cannot fix non-retryable.
func outputError(err error) error {
	var appErr *temporal.ApplicationError
	switch {
	case errors.As(err, &appErr):
		return err
	case errors.Is(err, outfile.ErrExists), errors.Is(err, outfile.ErrNotAbsolute), errors.Is(err, outfile.ErrNoDir),
		errors.Is(err, os.ErrPermission):
		return badInput("output: %v", err)
	case errors.Is(err, syscall.ENOSPC):
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("output: the file system is full: %v", err), activities.ErrNoSpace, nil)
	}
	return fmt.Errorf("restore file: %w", err)
}
