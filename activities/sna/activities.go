// Package sna adapts the source-side mechanisms (vSphere, nbdkit sources, the SSH tunnel,
// the copy engine) to Temporal activities on the site's queue, diskferry-sna.<site>.
package sna

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"strings"
	"syscall"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/heartbeat"
	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/limits"
	"github.com/diskferry/diskferry/internal/nbdkit"
	"github.com/diskferry/diskferry/internal/tunnel"
	"github.com/diskferry/diskferry/internal/vsphere"
)

// Transports for reading a snapshot's disks.
const (
	TransportHTTPS = "https" // nbdkit curl on the datastore's /folder URL of the flat file
	TransportVDDK  = "vddk"  // nbdkit vddk plugin with VMware's VDDK
)

// Settings are the SNA's copy settings; none of them is secret except the vCenter password,
// which only reaches nbdkit through a file (password=+FILE).
type Settings struct {
	Transport       string
	VDDKLibDir      string
	VCenterHost     string // host name of vCenter, for VDDK
	VCenterPort     int    // 0: 443
	VCenterUser     string
	VCenterPassword string
	Thumbprint      string // vCenter certificate pin, used by the https source too
	Insecure        bool   // explicit opt-in, already warned about at connect
	Connections     int
	RequestSize     int64
	// SourceFilters are nbdkit filters stacked on every source, e.g. retry (survive a
	// flaky vCenter) or rate (cap the bandwidth a copy takes from the datastore).
	SourceFilters  []nbdkit.Filter
	HeartbeatEvery time.Duration
	// CheckpointEvery is how often a copy flushes the target to advance its resume
	// checkpoint: what a crashed attempt's successor may have to redo. 0: blockcopy's default.
	CheckpointEvery time.Duration
	// MaxCopies caps the disk copies (backup and restore) this SNA runs at once; the others
	// wait for a slot. 0: no cap.
	MaxCopies int
	// SiteBandwidth is the bytes per second every copy of this SNA shares; 0: no limit.
	SiteBandwidth int64
}

// Activities are the SNA activities. One instance per worker; safe for concurrent use.
type Activities struct {
	vc       *vsphere.Client
	tunnels  *Tunnels
	settings Settings
	log      *slog.Logger
	slots    *limits.Slots // nil: no cap
	site     *limits.Limit // nil: no site limit
	jobs     limits.Jobs
	// signaler tells runs what their copies wait for; nil: the activity's own client.
	signaler runSignaler
}

// runSignaler is the part of a Temporal client that tells a run something.
type runSignaler interface {
	SignalWorkflow(ctx context.Context, workflowID, runID, signalName string, arg any) error
}

// New returns the SNA activities over a connected vSphere client and the tunnel pool.
func New(vc *vsphere.Client, tunnels *Tunnels, settings Settings, log *slog.Logger) *Activities {
	if settings.Connections <= 0 {
		settings.Connections = 4
	}
	if settings.HeartbeatEvery <= 0 {
		settings.HeartbeatEvery = 2 * time.Second
	}
	if settings.Transport == "" {
		settings.Transport = TransportHTTPS
	}
	a := &Activities{vc: vc, tunnels: tunnels, settings: settings, log: log, slots: limits.NewSlots(settings.MaxCopies)}
	if settings.SiteBandwidth > 0 {
		a.site = limits.NewLimit(settings.SiteBandwidth)
	}
	return a
}

// Register registers every SNA activity under its contract name.
func (a *Activities) Register(w worker.ActivityRegistry) {
	reg := func(f any, name string) {
		w.RegisterActivityWithOptions(f, activity.RegisterOptions{Name: name})
	}
	reg(a.InspectVM, activities.InspectVMName)
	reg(a.EnsureTunnel, activities.EnsureTunnelName)
	reg(a.DropTunnel, activities.DropTunnelName)
	reg(a.CreateSnapshot, activities.CreateSnapshotName)
	reg(a.RemoveSnapshot, activities.RemoveSnapshotName)
	reg(a.CopyDisk, activities.CopyDiskName)
	reg(a.ReadChangeIDs, activities.ReadChangeIDsName)
	reg(a.CreateRestoreVM, activities.CreateRestoreVMName)
	reg(a.DestroyRestoreVM, activities.DestroyRestoreVMName)
	reg(a.SetPower, activities.SetPowerName)
	reg(a.WriteDisk, activities.WriteDiskName)
	reg(a.ReadBackDisk, activities.ReadBackDiskName)
}

// waitBeat is how often the activities heartbeat while they wait on vCenter or nbdkit.
const waitBeat = 5 * time.Second

// ErrHostKeyMismatch is the error type of EnsureTunnel when the hub's SSH host key is not
// the one pinned in known_hosts: retrying cannot help until an operator checks the hub.
const ErrHostKeyMismatch = "HostKeyMismatch"

// MaxHeartbeatThrottle caps how long the SDK holds back an activity's heartbeats. A cancel
// reaches an activity only in a heartbeat's reply, and the SDK's default (0.8 × the heartbeat
// timeout, 24 s for a copy) let a cancelled copy run on that long; the SNA worker sets this.
const MaxHeartbeatThrottle = time.Second

// classify turns mechanism errors the workflow must not retry into non-retryable ones.
func classify(err error) error {
	var hostKey *tunnel.HostKeyError
	var input *vsphere.InputError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &input):
		return temporal.NewNonRetryableApplicationError("invalid restore input: "+input.Error(), activities.ErrBadInput, err)
	case errors.Is(err, vsphere.ErrNotFlat):
		return temporal.NewNonRetryableApplicationError(err.Error(), activities.ErrBadInput, err)
	case errors.Is(err, vsphere.ErrNotFound):
		return temporal.NewNonRetryableApplicationError(err.Error(), activities.ErrNotFound, err)
	case errors.Is(err, vsphere.ErrInvalidChangeID), errors.Is(err, vsphere.ErrInvalidReference):
		return temporal.NewNonRetryableApplicationError(err.Error(), activities.ErrBadInput, err)
	case errors.As(err, &hostKey):
		return temporal.NewNonRetryableApplicationError(err.Error(), ErrHostKeyMismatch, err)
	case errors.Is(err, syscall.ENOSPC):
		// qemu-nbd answers a write to a full repository with NBD's ENOSPC; the next attempt
		// would fail the same way within seconds.
		return temporal.NewNonRetryableApplicationError("the hub's repository is full: "+err.Error(), activities.ErrNoSpace, err)
	case vsphere.IsRefused(err):
		return temporal.NewNonRetryableApplicationError("vCenter refused the request: "+err.Error(), activities.ErrRefused, err)
	}
	return err
}

// InspectVM describes the VM: disks, CBT, power state, and its shape for a restore.
func (a *Activities) InspectVM(ctx context.Context, in activities.InspectVMInput) (activities.VM, error) {
	if in.VM == "" {
		return activities.VM{}, temporal.NewNonRetryableApplicationError("inspect VM: empty VM reference", activities.ErrBadInput, nil)
	}
	vm, err := a.vc.FindVM(ctx, in.VM)
	if err != nil {
		return activities.VM{}, classify(err)
	}
	info, err := a.vc.Inspect(ctx, vm)
	if err != nil {
		return activities.VM{}, classify(err)
	}
	out := activities.VM{
		InstanceUUID: info.InstanceUUID,
		Moref:        info.Moref,
		Name:         info.Name,
		PowerState:   info.PowerState,
		CBTEnabled:   info.CBTEnabled,
	}
	for _, d := range info.Disks {
		out.Disks = append(out.Disks, activities.Disk{
			Key: d.Key, Label: d.Label, CapacityBytes: d.CapacityBytes,
			BackingFile: d.BackingFile, Datastore: d.Datastore, ChangeID: d.ChangeID,
		})
	}
	out.Config = &info.Config
	return out, nil
}

// EnsureTunnel makes every export reachable on the SNA and checks each with an NBD
// handshake (the exports are started before the tunnel). It returns the SNA-side socket of
// each port (a mount prints it; a backup ignores it).
func (a *Activities) EnsureTunnel(ctx context.Context, in activities.EnsureTunnelInput) (activities.Forwards, error) {
	forwards := make([]tunnel.Forward, len(in.Ports))
	for i, p := range in.Ports {
		socket, ok := in.Sockets[p]
		if !ok || socket == "" {
			return activities.Forwards{}, temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("ensure tunnel: no socket for export port %d on hub %s (a hub older than this SNA?)", p, in.HubID),
				activities.ErrBadInput, nil)
		}
		forwards[i] = tunnel.Forward{Port: p, Remote: socket}
	}
	m, err := a.ensureForwards(ctx, in.HubID, forwards)
	if err != nil {
		return activities.Forwards{}, err
	}
	out := activities.Forwards{Sockets: make(map[int]string, len(in.Ports))}
	for _, p := range in.Ports {
		out.Sockets[p] = m.SocketPath(p)
	}
	return out, nil
}

// ensureForwards opens the forwards and proves each reaches a live export.
func (a *Activities) ensureForwards(ctx context.Context, hubID string, forwards []tunnel.Forward) (*tunnel.Manager, error) {
	m, err := a.tunnels.Get(hubID)
	if err != nil {
		return nil, temporal.NewNonRetryableApplicationError(err.Error(), activities.ErrBadInput, err)
	}
	if err := m.EnsureForwards(ctx, forwards); err != nil {
		return nil, classify(fmt.Errorf("ensure forwards to hub %s: %w", hubID, err))
	}
	for _, f := range forwards {
		if err := m.Health(ctx, f.Port); err != nil {
			return nil, exportError(hubID, f.Port, err)
		}
	}
	return m, nil
}

// exportError names the real cause when the hub refused the channel: nothing serves the
// export's socket. It stays retryable: the hub's reconcile restarts a running backup's
// export on the same socket.
func exportError(hubID string, port int, err error) error {
	if errors.Is(err, tunnel.ErrRefused) {
		return fmt.Errorf("export on hub %s port %d is not running (qemu-nbd gone?): %w", hubID, port, err)
	}
	return fmt.Errorf("tunnel to hub %s port %d: %w", hubID, port, err)
}

// exportGone names the real cause of a copy that failed through a forward: a copy cut off
// mid-way sees only a dead NBD connection, the forward knows whether the export behind it
// went away. Any other failure is returned as it is.
func exportGone(ctx context.Context, m *tunnel.Manager, hubID string, port int, err error) error {
	if ctx.Err() != nil {
		return err
	}
	if healthErr := m.Health(ctx, port); errors.Is(healthErr, tunnel.ErrRefused) {
		return exportError(hubID, port, healthErr)
	}
	return err
}

// sourceExitWait bounds the wait for a source that broke off a copy to be seen exited: its
// connections close as it dies, a moment before its exit is reaped.
const sourceExitWait = 5 * time.Second

// sourceGone names the real cause when a read of the copy's nbdkit source failed because
// nbdkit died (killed, or crashed in its plugin): the read error alone says only that the
// socket closed. It stays retryable: the next attempt starts its own source and resumes
// from the checkpoint.
func sourceGone(ctx context.Context, src *nbdkit.Server, err error) error {
	var read *blockcopy.SourceError
	if ctx.Err() != nil || !errors.As(err, &read) {
		return err
	}
	select {
	case <-src.Done():
		return fmt.Errorf("the source (nbdkit, pid %d) exited during the copy: %w", src.PID(), err)
	case <-ctx.Done():
	case <-time.After(sourceExitWait):
	}
	return err
}

// DropTunnel closes the forwards; idempotent.
func (a *Activities) DropTunnel(ctx context.Context, in activities.EnsureTunnelInput) error {
	m, err := a.tunnels.Get(in.HubID)
	if err != nil {
		return temporal.NewNonRetryableApplicationError(err.Error(), activities.ErrBadInput, err)
	}
	m.DropForwards(in.Ports)
	return nil
}

// CreateSnapshot creates the backup snapshot. A retried attempt finds the snapshot its
// predecessor made (same name) instead of making a second one.
func (a *Activities) CreateSnapshot(ctx context.Context, in activities.CreateSnapshotInput) (activities.Snapshot, error) {
	// Quiescing can take minutes, and the workflow must notice an SNA that died meanwhile.
	beat := heartbeat.Start(ctx, waitBeat, nil)
	defer beat.Stop()
	vm, err := a.vc.FindVM(ctx, in.VMMoref)
	if err != nil {
		return activities.Snapshot{}, classify(err)
	}
	existing, err := a.vc.ListSnapshots(ctx, vm)
	if err != nil {
		return activities.Snapshot{}, fmt.Errorf("list snapshots of %s: %w", in.VMMoref, err)
	}
	for _, s := range existing {
		if s.Name == in.Name {
			return activities.Snapshot{VMMoref: s.VMMoref, Moref: s.Moref, Name: s.Name}, nil
		}
	}
	s, err := a.vc.CreateSnapshot(ctx, vm, in.Name, in.Quiesce)
	if err != nil {
		return activities.Snapshot{}, classify(err)
	}
	return activities.Snapshot{VMMoref: s.VMMoref, Moref: s.Moref, Name: s.Name}, nil
}

// RemoveSnapshot removes (and consolidates) the snapshot; "not found" counts as removed.
// Without a moref (the create failed or its reply was lost) it removes the snapshots
// carrying exactly the name, which is unique to the backup run.
func (a *Activities) RemoveSnapshot(ctx context.Context, in activities.Snapshot) error {
	if in.Moref == "" && in.Name == "" {
		return temporal.NewNonRetryableApplicationError("remove snapshot: neither moref nor name given", activities.ErrBadInput, nil)
	}
	// Consolidation can take long; heartbeats let the workflow notice an SNA that died.
	beat := heartbeat.Start(ctx, waitBeat, nil)
	defer beat.Stop()
	vm, err := a.vc.FindVM(ctx, in.VMMoref)
	if errors.Is(err, vsphere.ErrNotFound) {
		return nil
	}
	if err != nil {
		return classify(err)
	}
	if in.Moref != "" {
		return classify(a.vc.RemoveSnapshot(ctx, vm, in.Moref))
	}
	all, err := a.vc.ListSnapshots(ctx, vm)
	if err != nil {
		return classify(err)
	}
	// Children first: removing a parent first would merge it into the child.
	for _, s := range slices.Backward(all) {
		if s.Name != in.Name {
			continue
		}
		if err := a.vc.RemoveSnapshot(ctx, vm, s.Moref); err != nil {
			return classify(err)
		}
	}
	return nil
}

// ReadChangeIDs reads each disk's changeId from the snapshot's disk backings.
func (a *Activities) ReadChangeIDs(ctx context.Context, in activities.ReadChangeIDsInput) (map[int32]string, error) {
	ids, err := a.vc.ChangeIDs(ctx, in.Snapshot.Moref)
	return ids, classify(err)
}

// CopyDisk copies one disk of the snapshot into its hub export through the tunnel,
// heartbeating progress and the resume checkpoint; a retried attempt resumes from it.
//
// It heartbeats from its first moment until it returns, also while nbdkit starts and CBT is
// queried, so a cancel reaches it within seconds and a slow start never looks like a dead
// SNA. An incremental copy whose previous changeId vCenter refuses fails with the
// non-retryable ErrChangeIDRefused: the workflow then copies the disk in full.
func (a *Activities) CopyDisk(ctx context.Context, in activities.CopyDiskInput) (activities.CopyDiskResult, error) {
	if in.HubID == "" || in.TargetSocket == "" {
		return activities.CopyDiskResult{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("copy disk %d: no hub or export socket for port %d (a workflow older than this SNA?)", in.DiskKey, in.TargetPort),
			activities.ErrBadInput, nil)
	}
	log := a.log.With("vm", in.Snapshot.VMMoref, "disk", in.DiskKey, "mode", in.Mode)
	resume, beat := a.startCopyHeartbeat(ctx, log)
	defer beat.Stop()
	release, err := a.takeCopySlot(ctx, in.DiskKey, beat, resume, log)
	if err != nil {
		return activities.CopyDiskResult{}, fmt.Errorf("copy disk %d: %w", in.DiskKey, err)
	}
	defer release()

	vm, err := a.vc.FindVM(ctx, in.Snapshot.VMMoref)
	if err != nil {
		return activities.CopyDiskResult{}, classify(err)
	}

	opts := blockcopy.Options{
		Connections: in.Connections,
		RequestSize: a.settings.RequestSize,
		// Both transports read through vCenter/ESXi, whose NFC fails on larger reads.
		MaxRequestSize:     blockcopy.VCenterMaxRequestSize,
		CheckpointInterval: a.settings.CheckpointEvery,
		Logger:             log,
	}
	if opts.Connections <= 0 {
		opts.Connections = a.settings.Connections
	}
	var releasePace func()
	opts.Throttle, releasePace = a.pacer(ctx, in.BandwidthBytesPerSec, log)
	defer releasePace()
	switch in.Mode {
	case activities.ModeFull:
		// CBT "*" maps the allocated areas without VDDK's QueryAllocatedBlocks (which failed
		// in the field on >1 TB disks); the fresh qcow2 reads as zeros everywhere else.
		areas, err := a.vc.QueryChangedAreas(ctx, vm, in.Snapshot.Moref, in.DiskKey, in.CapacityBytes, vsphere.AllAllocated)
		switch {
		case err == nil:
			opts.Areas = toBlockExtents(areas)
		case errors.Is(err, vsphere.ErrInvalidChangeID):
			log.Info("no CBT allocation map, copying the whole disk with zero detection", "err", err)
		default:
			return activities.CopyDiskResult{}, classify(err)
		}
		opts.DestinationIsZero = true
	case activities.ModeIncremental:
		areas, err := a.vc.QueryChangedAreas(ctx, vm, in.Snapshot.Moref, in.DiskKey, in.CapacityBytes, in.PrevChangeID)
		if errors.Is(err, vsphere.ErrInvalidChangeID) {
			return activities.CopyDiskResult{}, temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("copy disk %d: %v", in.DiskKey, err), activities.ErrChangeIDRefused, err)
		}
		if err != nil {
			return activities.CopyDiskResult{}, classify(err)
		}
		opts.Areas = toBlockExtents(areas)
	default:
		return activities.CopyDiskResult{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("copy disk %d: unknown mode %q", in.DiskKey, in.Mode), activities.ErrBadInput, nil)
	}

	if p := resume; p != nil && (p.Checkpoint > 0 || len(p.Ahead) > 0) {
		opts.Resume = &blockcopy.Checkpoint{Offset: p.Checkpoint, DigestState: p.DigestState, BytesDone: p.BytesDone,
			Ahead: toFinished(p.Ahead)}
		log.Info("resuming copy", "checkpoint", p.Checkpoint, "finishedAhead", len(p.Ahead))
	}

	// Usually a no-op; after an SNA restart the forward EnsureTunnel made is gone.
	m, err := a.ensureForwards(ctx, in.HubID, []tunnel.Forward{{Port: in.TargetPort, Remote: in.TargetSocket}})
	if err != nil {
		return activities.CopyDiskResult{}, err
	}
	src, err := a.startSource(ctx, in)
	if err != nil {
		return activities.CopyDiskResult{}, err
	}
	defer func() {
		if err := src.Stop(context.WithoutCancel(ctx)); err != nil {
			log.Warn("stop nbdkit source", "err", err)
		}
	}()

	target := (&url.URL{Scheme: "nbd+unix", Path: "/" + in.ExportName,
		RawQuery: "socket=" + url.QueryEscape(m.SocketPath(in.TargetPort))}).String()
	opts.ProgressInterval = a.settings.HeartbeatEvery
	opts.OnProgress = recordProgress(beat)
	cp, err := blockcopy.New(src.URI(), target, opts)
	if err != nil {
		return activities.CopyDiskResult{}, temporal.NewNonRetryableApplicationError(err.Error(), activities.ErrBadInput, err)
	}
	res, err := cp.Run(ctx)
	if err != nil {
		err = exportGone(ctx, m, in.HubID, in.TargetPort, sourceGone(ctx, src, err))
		return activities.CopyDiskResult{}, classify(fmt.Errorf("copy disk %d to hub port %d: %w", in.DiskKey, in.TargetPort, err))
	}
	log.Info("disk copied", "read", res.BytesRead, "written", res.BytesWritten, "zeroed", res.BytesZeroed,
		"recopied", res.BytesRecopied, "duration", res.Duration)
	return activities.CopyDiskResult{
		DiskKey:       in.DiskKey,
		BytesRead:     res.BytesRead,
		BytesWritten:  res.BytesWritten,
		BytesZeroed:   res.BytesZeroed,
		BytesRecopied: res.BytesRecopied,
		Duration:      res.Duration,
		BlockSize:     res.BlockSize,
		Digest:        res.Digest,
		Areas:         fromBlockExtents(res.Areas),
	}, nil
}

// startCopyHeartbeat starts the heartbeat of a copy from its first moment. The previous
// attempt's checkpoint (returned, nil without one) is heartbeated again until this attempt
// has its own, so an attempt that dies early does not lose it.
func (a *Activities) startCopyHeartbeat(ctx context.Context, log *slog.Logger) (*activities.CopyProgress, *heartbeat.Keeper) {
	var resume *activities.CopyProgress
	if activity.HasHeartbeatDetails(ctx) {
		var p activities.CopyProgress
		if err := activity.GetHeartbeatDetails(ctx, &p); err != nil {
			log.Warn("previous attempt's checkpoint unreadable; copying from the start", "err", err)
		} else {
			resume = &p
		}
	}
	var first any
	if resume != nil {
		first = *resume
	}
	return resume, heartbeat.Start(ctx, a.settings.HeartbeatEvery, first)
}

// takeCopySlot waits for one of the SNA's copy slots (Settings.MaxCopies) before a copy
// opens anything. Meanwhile the heartbeat goes on (a cancel reaches the wait, the heartbeat
// timeout does not fire), carrying the previous attempt's checkpoint and what the copy waits
// for, and the run is told (CopyWaitSignal) for its job log; the activity's own timeouts
// bound the wait. The release is safe to call twice.
func (a *Activities) takeCopySlot(ctx context.Context, disk int32, beat *heartbeat.Keeper, resume *activities.CopyProgress,
	log *slog.Logger) (func(), error) {
	var base activities.CopyProgress
	if resume != nil {
		base = *resume
	}
	what := "a copy slot on the SNA of site " + siteOf(ctx)
	waited := false
	release, err := a.slots.Acquire(ctx, func() {
		waited = true
		log.Info("waiting for a copy slot", "maxCopies", a.slots.Cap())
		waiting := base
		waiting.WaitingFor = what
		beat.Record(waiting)
		a.tellRun(ctx, activities.CopyWait{DiskKey: disk, WaitingFor: what}, log)
	})
	if err != nil {
		return nil, fmt.Errorf("wait for %s: %w", what, err)
	}
	// A retried attempt also clears what its predecessor may have said before it died.
	if waited || activity.GetInfo(ctx).Attempt > 1 {
		log.Info("copy slot taken")
		beat.Record(base)
		a.tellRun(ctx, activities.CopyWait{DiskKey: disk}, log)
	}
	return release, nil
}

// tellRunTimeout bounds telling the run about a wait: the job log is a courtesy that must
// never hold up the copy.
const tellRunTimeout = 10 * time.Second

// tellRun signals the activity's run what a copy waits for. A failure is only logged: the
// heartbeat carries the same to queries.
func (a *Activities) tellRun(ctx context.Context, w activities.CopyWait, log *slog.Logger) {
	c := a.signaler
	if c == nil {
		ac := activity.GetClient(ctx)
		if ac == nil {
			return
		}
		c = ac
	}
	info := activity.GetInfo(ctx)
	ctx, cancel := context.WithTimeout(ctx, tellRunTimeout)
	defer cancel()
	if err := c.SignalWorkflow(ctx, info.WorkflowExecution.ID, info.WorkflowExecution.RunID, activities.CopyWaitSignal, w); err != nil {
		log.Warn("could not tell the run what the copy waits for", "waitingFor", w.WaitingFor, "err", err)
	}
}

// siteOf is the site whose queue (diskferry-sna.<site>) the activity came from.
func siteOf(ctx context.Context) string {
	queue := activity.GetInfo(ctx).TaskQueue
	if site, ok := strings.CutPrefix(queue, activities.SNAQueue("")); ok {
		return site
	}
	return queue
}

// pacer is a copy's throttle: its bandwidth limits, its job's (shared by the job's copies,
// keyed by workflow ID; jobBytesPerSec 0: none) and the site's; nil when neither applies, so
// an unlimited copy pays nothing. It logs the effective limit; call the release when the copy
// ends.
func (a *Activities) pacer(ctx context.Context, jobBytesPerSec int64, log *slog.Logger) (blockcopy.Throttle, func()) {
	var pace limits.Pacer
	release := func() {}
	var jobRate, siteRate int64
	if jobBytesPerSec > 0 {
		var job *limits.Limit
		job, release = a.jobs.Acquire(activity.GetInfo(ctx).WorkflowExecution.ID, jobBytesPerSec)
		pace = append(pace, job)
		jobRate = jobBytesPerSec
	}
	if a.site != nil {
		pace = append(pace, a.site)
		siteRate = a.site.BytesPerSec()
	}
	if len(pace) == 0 {
		return nil, release
	}
	log.Info("copy bandwidth", "limit", limits.FormatRate(pace.BytesPerSec()),
		"jobLimit", limits.FormatRate(jobRate), "siteLimit", limits.FormatRate(siteRate))
	return pace, release
}

// recordProgress heartbeats a copy's progress and checkpoint.
func recordProgress(beat *heartbeat.Keeper) func(blockcopy.Progress) {
	return func(p blockcopy.Progress) {
		beat.Record(activities.CopyProgress{
			Checkpoint:   p.Checkpoint.Offset,
			DigestState:  p.Checkpoint.DigestState,
			Ahead:        fromFinished(p.Checkpoint.Ahead),
			BytesDone:    p.BytesDone,
			BytesTotal:   p.BytesTotal,
			BytesRead:    p.BytesRead,
			BytesWritten: p.BytesWritten,
			BytesZeroed:  p.BytesZeroed,
		})
	}
}

// startSource serves the snapshot's disk with nbdkit on a private unix socket.
func (a *Activities) startSource(ctx context.Context, in activities.CopyDiskInput) (*nbdkit.Server, error) {
	var src nbdkit.Source
	switch a.settings.Transport {
	case TransportHTTPS:
		flat, err := a.vc.DiskFlatURL(ctx, in.Snapshot.Moref, in.DiskKey)
		if err != nil {
			return nil, classify(err)
		}
		src = a.curlSource(flat)
	case TransportVDDK:
		file, err := a.snapshotDiskFile(ctx, in)
		if err != nil {
			return nil, err
		}
		src = nbdkit.VDDKSource{
			LibDir: a.settings.VDDKLibDir, Server: a.settings.VCenterHost, Port: a.settings.VCenterPort,
			User: a.settings.VCenterUser, Password: a.settings.VCenterPassword,
			Thumbprint: a.settings.Thumbprint, VMMoref: in.Snapshot.VMMoref,
			SnapshotMoref: in.Snapshot.Moref, File: file,
		}
	default:
		return nil, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("unknown transport %q", a.settings.Transport), activities.ErrBadInput, nil)
	}
	srv, err := nbdkit.Start(ctx, src, nbdkit.Options{Filters: a.settings.SourceFilters, Logger: a.log})
	if err != nil {
		return nil, fmt.Errorf("start %s source for disk %d: %w", a.settings.Transport, in.DiskKey, err)
	}
	return srv, nil
}

// curlSource reads a flat file over https with the session cookie, trusting vCenter as the
// API session does.
func (a *Activities) curlSource(flat vsphere.FlatDisk) nbdkit.CurlSource {
	cs := nbdkit.CurlSource{URL: flat.URL, Cookie: flat.Cookie, Logger: a.log}
	// The insecure opt-in wins over a configured pin, as it does for the API session.
	if a.settings.Insecure {
		cs.InsecureSkipVerify = true
	} else {
		cs.Thumbprint = a.settings.Thumbprint
	}
	return cs
}

// snapshotDiskFile is the disk's backing file as of the snapshot, which VDDK opens.
func (a *Activities) snapshotDiskFile(ctx context.Context, in activities.CopyDiskInput) (string, error) {
	d, err := a.vc.SnapshotDisk(ctx, in.Snapshot.Moref, in.DiskKey)
	if err != nil {
		return "", classify(err)
	}
	return d.BackingFile, nil
}

func toFinished(in []activities.CopyStretch) []blockcopy.Finished {
	out := make([]blockcopy.Finished, len(in))
	for i, f := range in {
		out[i] = blockcopy.Finished{Start: f.Start, Length: f.Length, Sums: f.Sums}
	}
	return out
}

func fromFinished(in []blockcopy.Finished) []activities.CopyStretch {
	if len(in) == 0 {
		return nil
	}
	out := make([]activities.CopyStretch, len(in))
	for i, f := range in {
		out[i] = activities.CopyStretch{Start: f.Start, Length: f.Length, Sums: f.Sums}
	}
	return out
}

// toBlockExtents never returns nil: nil areas would make blockcopy copy the whole disk,
// while an empty map (nothing allocated, nothing changed) means copy nothing.
func toBlockExtents(in []vsphere.Extent) []blockcopy.Extent {
	out := make([]blockcopy.Extent, len(in))
	for i, e := range in {
		out[i] = blockcopy.Extent{Start: e.Start, Length: e.Length}
	}
	return out
}

func fromBlockExtents(in []blockcopy.Extent) []activities.Extent {
	if in == nil {
		return nil
	}
	out := make([]activities.Extent, len(in))
	for i, e := range in {
		out[i] = activities.Extent{Start: e.Start, Length: e.Length}
	}
	return out
}
