package sna

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"syscall"
	"time"

	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/heartbeat"
	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/nbdkit"
	"github.com/diskferry/diskferry/internal/tunnel"
	"github.com/diskferry/diskferry/internal/vsphere"
)

// CreateRestoreVM creates the powered-off VM a restore writes into, of the point's shape,
// marked as the workflow's. A retry finds the VM its predecessor made.
func (a *Activities) CreateRestoreVM(ctx context.Context, in activities.CreateRestoreVMInput) (activities.RestoreVM, error) {
	if in.Spec.Config == nil {
		return activities.RestoreVM{}, temporal.NewNonRetryableApplicationError(
			"invalid restore input: config: the point holds no VM configuration (taken before it was captured); restore in place or to a file",
			activities.ErrBadInput, nil)
	}
	beat := heartbeat.Start(ctx, waitBeat, nil)
	defer beat.Stop()
	vm, err := a.vc.CreateVM(ctx, vsphere.NewVMSpec{
		Name: in.Spec.Name, WorkflowID: in.WorkflowID,
		Folder: in.Spec.Folder, ResourcePool: in.Spec.ResourcePool, Host: in.Spec.Host, Datastore: in.Spec.Datastore,
		SourceVM: in.Spec.SourceVMMoref, Config: *in.Spec.Config,
	})
	if err != nil {
		return activities.RestoreVM{}, classify(err)
	}
	out := activities.RestoreVM{Moref: vm.Moref, Name: vm.Name}
	for _, d := range vm.Disks {
		out.Disks = append(out.Disks, activities.RestoreDiskMap{PointKey: d.ConfigKey, VMKey: d.Key,
			CapacityBytes: d.CapacityBytes, BackingFile: d.BackingFile})
	}
	return out, nil
}

// DestroyRestoreVM removes the VM CreateRestoreVM made for the workflow (powering it off
// first); a VM without the workflow's mark and a VM already gone are left alone.
func (a *Activities) DestroyRestoreVM(ctx context.Context, in activities.DestroyRestoreVMInput) error {
	if in.WorkflowID == "" || (in.Name == "" && in.Moref == "") {
		return temporal.NewNonRetryableApplicationError("destroy restore VM: workflow and a name or moref are required",
			activities.ErrBadInput, nil)
	}
	beat := heartbeat.Start(ctx, waitBeat, nil)
	defer beat.Stop()
	_, err := a.vc.DestroyVM(ctx, in.Moref, in.Name, in.WorkflowID)
	return classify(err)
}

// SetPower powers a VM on or off; already in that state is success.
func (a *Activities) SetPower(ctx context.Context, in activities.SetPowerInput) error {
	beat := heartbeat.Start(ctx, waitBeat, nil)
	defer beat.Stop()
	return classify(a.vc.SetPower(ctx, in.VMMoref, in.State))
}

// WriteDisk copies a point's disk from its read-only hub export, through the tunnel, into
// a disk of a powered-off VM, heartbeating CopyProgress from its first moment.
//
// https: one HTTP PUT of the whole flat file to the datastore, streamed in order from the
// export; a retried attempt starts over (BytesRecopied says how much it redid).
// vddk: nbdkit's vddk plugin opens the disk writable and the copy engine writes the
// export's allocated extents and zeroes the rest, resuming from its checkpoint.
func (a *Activities) WriteDisk(ctx context.Context, in activities.WriteDiskInput) (activities.WriteDiskResult, error) {
	if in.HubID == "" || in.SourceSocket == "" || in.ExportName == "" || in.VMMoref == "" {
		return activities.WriteDiskResult{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("write disk %d: hub, export socket, export name and VM are required", in.DiskKey), activities.ErrBadInput, nil)
	}
	log := a.log.With("vm", in.VMMoref, "disk", in.DiskKey, "transport", a.settings.Transport)
	resume, beat := a.startCopyHeartbeat(ctx, log)
	defer beat.Stop()
	release, err := a.takeCopySlot(ctx, in.DiskKey, beat, resume, log)
	if err != nil {
		return activities.WriteDiskResult{}, fmt.Errorf("write disk %d: %w", in.DiskKey, err)
	}
	defer release()

	state, err := a.vc.PowerState(ctx, in.VMMoref)
	if err != nil {
		return activities.WriteDiskResult{}, classify(err)
	}
	if state != activities.PowerOff {
		return activities.WriteDiskResult{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("write disk %d: VM %s is %s; a restore writes only to a powered-off VM", in.DiskKey, in.VMMoref, state),
			activities.ErrPoweredOn, nil)
	}
	disk, _, err := a.vc.VMDisk(ctx, in.VMMoref, in.DiskKey)
	if err != nil {
		return activities.WriteDiskResult{}, classify(err)
	}
	if disk.CapacityBytes < in.CapacityBytes ||
		(a.settings.Transport == TransportHTTPS && disk.CapacityBytes != in.CapacityBytes) {
		return activities.WriteDiskResult{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("invalid restore input: disks: VM %s disk %d holds %d bytes, the point's disk %d (https writes the whole flat file: they must be equal)",
				in.VMMoref, in.DiskKey, disk.CapacityBytes, in.CapacityBytes), activities.ErrBadInput, nil)
	}

	m, err := a.ensureForwards(ctx, in.HubID, []tunnel.Forward{{Port: in.SourcePort, Remote: in.SourceSocket}})
	if err != nil {
		return activities.WriteDiskResult{}, err
	}
	source := (&url.URL{Scheme: "nbd+unix", Path: "/" + in.ExportName,
		RawQuery: "socket=" + url.QueryEscape(m.SocketPath(in.SourcePort))}).String()
	opts := blockcopy.Options{
		Connections:        in.Connections,
		RequestSize:        a.settings.RequestSize,
		MaxRequestSize:     blockcopy.VCenterMaxRequestSize,
		CheckpointInterval: a.settings.CheckpointEvery,
		ProgressInterval:   a.settings.HeartbeatEvery,
		OnProgress:         recordProgress(beat),
		Logger:             log,
	}
	if opts.Connections <= 0 {
		opts.Connections = a.settings.Connections
	}
	// The job's and the site's limits pace the bytes sent to vCenter as a backup's copies:
	// vddk's data writes, or every byte of the https upload (its zeros cross the wire too).
	var releasePace func()
	opts.Throttle, releasePace = a.pacer(ctx, in.BandwidthBytesPerSec, log)
	defer releasePace()

	var res *blockcopy.Result
	switch a.settings.Transport {
	case TransportHTTPS:
		res, err = a.uploadDisk(ctx, in, source, opts, resume)
	case TransportVDDK:
		res, err = a.writeVDDK(ctx, in, disk, source, opts, resume, log)
	default:
		return activities.WriteDiskResult{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("unknown transport %q", a.settings.Transport), activities.ErrBadInput, nil)
	}
	if err != nil {
		err = exportGone(ctx, m, in.HubID, in.SourcePort, err)
		return activities.WriteDiskResult{}, classifyWrite(fmt.Errorf("write disk %d of VM %s from hub port %d: %w", in.DiskKey, in.VMMoref, in.SourcePort, err))
	}
	log.Info("disk restored", "read", res.BytesRead, "written", res.BytesWritten, "zeroed", res.BytesZeroed,
		"recopied", res.BytesRecopied, "duration", res.Duration)
	return activities.WriteDiskResult{
		DiskKey:       in.DiskKey,
		BytesRead:     res.BytesRead,
		BytesWritten:  res.BytesWritten,
		BytesZeroed:   res.BytesZeroed,
		BytesRecopied: res.BytesRecopied,
		Duration:      res.Duration,
		BlockSize:     res.BlockSize,
		Digest:        res.Digest,
	}, nil
}

// uploadDisk streams the export into the disk's flat file with one HTTP PUT. The datastore
// takes the file whole, so a retried attempt redoes what its predecessor had sent.
func (a *Activities) uploadDisk(ctx context.Context, in activities.WriteDiskInput, source string, opts blockcopy.Options,
	resume *activities.CopyProgress) (*blockcopy.Result, error) {
	flat, err := a.vc.LiveDiskFlatURL(ctx, in.VMMoref, in.DiskKey)
	if err != nil {
		return nil, err
	}
	var res *blockcopy.Result
	err = vsphere.UploadFlat(ctx, flat, in.CapacityBytes, vsphere.Trust{Thumbprint: a.settings.Thumbprint, Insecure: a.settings.Insecure, Logger: a.log},
		func(w io.Writer) error {
			var err error
			res, err = blockcopy.Stream(ctx, source, w, opts)
			return err
		})
	if err != nil {
		return nil, err
	}
	if resume != nil {
		res.BytesRecopied = resume.BytesDone
	}
	return res, nil
}

// writeVDDK copies the export into the disk through nbdkit's vddk plugin, writable, with
// the checkpoint/resume of a backup copy.
func (a *Activities) writeVDDK(ctx context.Context, in activities.WriteDiskInput, disk vsphere.Disk, source string,
	opts blockcopy.Options, resume *activities.CopyProgress, log *slog.Logger) (*blockcopy.Result, error) {
	if p := resume; p != nil && (p.Checkpoint > 0 || len(p.Ahead) > 0) {
		opts.Resume = &blockcopy.Checkpoint{Offset: p.Checkpoint, DigestState: p.DigestState, BytesDone: p.BytesDone,
			Ahead: toFinished(p.Ahead)}
		log.Info("resuming restore", "checkpoint", p.Checkpoint, "finishedAhead", len(p.Ahead))
	}
	target, err := nbdkit.Start(ctx, a.liveVDDK(in.VMMoref, disk.BackingFile),
		nbdkit.Options{Writable: true, Filters: a.settings.SourceFilters, Logger: a.log})
	if err != nil {
		return nil, fmt.Errorf("start vddk target for disk %d: %w", in.DiskKey, err)
	}
	defer func() {
		if err := target.Stop(context.WithoutCancel(ctx)); err != nil {
			log.Warn("stop nbdkit target", "err", err)
		}
	}()
	cp, err := blockcopy.New(source, target.URI(), opts)
	if err != nil {
		return nil, temporal.NewNonRetryableApplicationError(err.Error(), activities.ErrBadInput, err)
	}
	return cp.Run(ctx)
}

// liveVDDK opens a VM's disk as it is now (no snapshot) through VDDK.
func (a *Activities) liveVDDK(vmMoref, file string) nbdkit.VDDKSource {
	return nbdkit.VDDKSource{
		LibDir: a.settings.VDDKLibDir, Server: a.settings.VCenterHost, Port: a.settings.VCenterPort,
		User: a.settings.VCenterUser, Password: a.settings.VCenterPassword,
		Thumbprint: a.settings.Thumbprint, VMMoref: vmMoref, Live: true, File: file,
	}
}

// classifyWrite names the VM's datastore, not the hub's repository, when a restore's write
// finds no space.
func classifyWrite(err error) error {
	if errors.Is(err, syscall.ENOSPC) {
		return temporal.NewNonRetryableApplicationError("the VM's datastore is full: "+err.Error(), activities.ErrNoSpace, err)
	}
	return classify(err)
}

// ReadBackDisk reads a restored disk back from vCenter, as a backup reads (https: nbdkit
// curl on the live flat file; vddk: the plugin, read-only), and compares its digest with
// what WriteDisk wrote. A difference is the non-retryable ErrMismatch naming the disk.
func (a *Activities) ReadBackDisk(ctx context.Context, in activities.ReadBackDiskInput) (activities.ReadBackResult, error) {
	if in.VMMoref == "" || in.Digest == "" || in.BlockSize <= 0 {
		return activities.ReadBackResult{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("read back disk %d: VM, digest and block size are required", in.DiskKey), activities.ErrBadInput, nil)
	}
	log := a.log.With("vm", in.VMMoref, "disk", in.DiskKey, "transport", a.settings.Transport)
	beat := heartbeat.Start(ctx, a.settings.HeartbeatEvery, nil)
	defer beat.Stop()
	start := time.Now()

	var src nbdkit.Source
	switch a.settings.Transport {
	case TransportHTTPS:
		flat, err := a.vc.LiveDiskFlatURL(ctx, in.VMMoref, in.DiskKey)
		if err != nil {
			return activities.ReadBackResult{}, classify(err)
		}
		src = a.curlSource(flat)
	case TransportVDDK:
		disk, _, err := a.vc.VMDisk(ctx, in.VMMoref, in.DiskKey)
		if err != nil {
			return activities.ReadBackResult{}, classify(err)
		}
		src = a.liveVDDK(in.VMMoref, disk.BackingFile)
	default:
		return activities.ReadBackResult{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("unknown transport %q", a.settings.Transport), activities.ErrBadInput, nil)
	}
	srv, err := nbdkit.Start(ctx, src, nbdkit.Options{Filters: a.settings.SourceFilters, Logger: a.log})
	if err != nil {
		return activities.ReadBackResult{}, fmt.Errorf("start %s reader for disk %d: %w", a.settings.Transport, in.DiskKey, err)
	}
	defer func() {
		if err := srv.Stop(context.WithoutCancel(ctx)); err != nil {
			log.Warn("stop nbdkit reader", "err", err)
		}
	}()
	var bytesRead int64
	digest, err := blockcopy.ComputeDigest(ctx, srv.URI(), blockcopy.Options{
		BlockSize: in.BlockSize, Connections: a.settings.Connections, MaxRequestSize: blockcopy.VCenterMaxRequestSize,
		ProgressInterval: a.settings.HeartbeatEvery,
		OnProgress: func(p blockcopy.Progress) {
			bytesRead = p.BytesRead
			beat.Record(activities.CopyProgress{BytesDone: p.BytesDone, BytesTotal: p.BytesTotal, BytesRead: p.BytesRead})
		},
	})
	if err != nil {
		return activities.ReadBackResult{}, classify(fmt.Errorf("read back disk %d of VM %s: %w", in.DiskKey, in.VMMoref, sourceGone(ctx, srv, err)))
	}
	if digest != in.Digest {
		return activities.ReadBackResult{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("read back disk %d of VM %s: it differs from the restore point (digest %s, written %s)",
				in.DiskKey, in.VMMoref, digest, in.Digest), activities.ErrMismatch, nil)
	}
	log.Info("restored disk read back and matches", "read", bytesRead, "duration", time.Since(start))
	return activities.ReadBackResult{DiskKey: in.DiskKey, BytesRead: bytesRead, Duration: time.Since(start)}, nil
}
