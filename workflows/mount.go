package workflows

import (
	"fmt"
	"slices"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/text"
)

// Why a mount ended (MountInfo.Ended).
const (
	EndedUnmount = "unmount"
	EndedTTL     = "ttl"
	EndedCancel  = "cancel"
	EndedError   = "error"
)

// MountWorkflow keeps a read-only NBD export of a point alive on its hub (and, with a site,
// forwarded to that site's SNA) until the unmount signal, its TTL or a cancel; then it drops
// the forwards, stops the exports and releases the ports. The mount query returns MountInfo.
func MountWorkflow(ctx workflow.Context, in MountInput) (MountInfo, error) {
	m := newMount(ctx, in)
	if err := workflow.SetQueryHandler(ctx, MountQueryName, func() (MountInfo, error) {
		return m.snapshot(), nil
	}); err != nil {
		return MountInfo{}, fmt.Errorf("register mount query: %w", err)
	}
	// Registered at once: an unmount sent while the mount is being prepared is kept and
	// ends the mount as soon as it serves.
	unmount := workflow.GetSignalChannel(ctx, UnmountSignalName)
	if err := in.Validate(); err != nil {
		m.info.Status, m.info.Ended, m.info.Error = MountFailed, EndedError, err.Error()
		return MountInfo{}, m.refuse(ctx, err)
	}
	m.setStatus(ctx, MountPreparing)
	m.journal.add(ctx, "mount of %s requested for %s", pointRef(m.in.Point, m.in.VM), in.ttl())

	if err := m.prepare(ctx); err != nil {
		return MountInfo{}, m.failMount(ctx, err)
	}
	ended := m.wait(ctx, unmount)
	return m.unmount(ctx, ended)
}

// mount is one run of MountWorkflow.
type mount struct {
	job
	in   MountInput
	info MountInfo
	src  activities.RestoreSource
}

func newMount(ctx workflow.Context, in MountInput) *mount {
	progress := &Progress{
		VM: text.Shorten(in.VM, MaxVMRefLength), Site: text.Shorten(in.Site, MaxVMRefLength),
		PointID: text.Shorten(in.Point, 80), Mode: "mount", Started: workflow.Now(ctx),
	}
	m := &mount{in: in, info: MountInfo{PointID: progress.PointID, Site: progress.Site, Status: MountPreparing}}
	m.job = newJob(ctx, "mount", "Mount of "+pointRef(m.in.Point, m.in.VM), in.WorkerWaitSeconds, progress)
	m.attributes = m.pointStatusAttributes
	return m
}

func (m *mount) snapshot() MountInfo {
	info := m.info
	info.Disks = slices.Clone(m.info.Disks)
	return info
}

func (m *mount) setStatus(ctx workflow.Context, status string) {
	m.info.Status = status
	m.job.setStatus(ctx, status)
}

// prepare resolves the point, exports its disks read-only and forwards them to the site.
func (m *mount) prepare(ctx workflow.Context) error {
	m.step(ctx, "resolving %s", pointRef(m.in.Point, m.in.VM))
	in := activities.ResolvePointInput{PointID: m.in.Point, VM: m.in.VM, Disks: m.in.Disks}
	if err := m.execute(ctx, activities.ResolvePointName, activities.HubQueue, "resolve "+pointRef(m.in.Point, m.in.VM), in, &m.src); err != nil {
		return err
	}
	if len(m.src.Disks) == 0 {
		return badMountInput(fmt.Sprintf("disks: point %s has no disk to mount", m.src.PointID))
	}
	m.info.PointID, m.info.HubID = m.src.PointID, m.src.HubID
	m.progress.PointID, m.progress.HubID, m.progress.VM = m.src.PointID, m.src.HubID, text.Shorten(m.src.VMName, MaxVMRefLength)
	m.job.setStatus(ctx, MountPreparing)
	m.journal.add(ctx, "point %s of VM %s on hub %s", m.src.PointID, m.src.VMName, m.src.HubID)

	m.registerPortRelease(m.src.HubID)
	keys := make([]int32, len(m.src.Disks))
	for i, d := range m.src.Disks {
		keys[i] = d.Key
	}
	portFor, err := m.leasePorts(ctx, m.src.HubID, keys)
	if err != nil {
		return err
	}
	exports := make([]activities.Export, 0, len(m.src.Disks))
	for _, d := range m.src.Disks {
		m.step(ctx, "exporting disk %d", d.Key)
		port, err := portFor(ctx, d.Key)
		if err != nil {
			return err
		}
		var export activities.Export
		in := activities.StartExportInput{WorkflowID: m.workflowID(), DiskKey: d.Key, Path: d.Path, Port: port, Connections: DefaultConnections, ReadOnly: true}
		if err := m.startExport(ctx, m.src.HubID, in, &export); err != nil {
			return err
		}
		exports = append(exports, export)
		m.info.Disks = append(m.info.Disks, MountedDisk{Key: d.Key, Port: export.Port, URI: nbdUnixURI(export.Name, export.Socket)})
	}
	if m.in.Site != "" {
		var forwards activities.Forwards
		if err := m.openTunnel(ctx, activities.SNAQueue(m.in.Site), m.src.HubID, exports, &forwards); err != nil {
			return err
		}
		for i, e := range exports {
			socket, ok := forwards.Sockets[e.Port]
			if !ok {
				return temporal.NewNonRetryableApplicationError(
					fmt.Sprintf("the SNA of site %s reported no forward for port %d", m.in.Site, e.Port), activities.ErrRefused, nil)
			}
			m.info.Disks[i].SiteURI = nbdUnixURI(e.Name, socket)
		}
	}
	return nil
}

// nbdUnixURI is the NBD URI of an export on a unix socket.
func nbdUnixURI(exportName, socket string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", exportName, socket)
}

// wait serves the mount until the unmount signal, the TTL or a cancel and says which came.
func (m *mount) wait(ctx workflow.Context, unmount workflow.ReceiveChannel) string {
	ttl := m.in.ttl()
	m.info.Expires = workflow.Now(ctx).Add(ttl)
	m.setStatus(ctx, MountMounted)
	m.step(ctx, "mounted until %s", m.info.Expires.UTC().Format(time.RFC3339))
	for _, d := range m.info.Disks {
		if d.SiteURI != "" {
			m.journal.add(ctx, "disk %d: %s (on site %s: %s)", d.Key, d.URI, m.in.Site, d.SiteURI)
			continue
		}
		m.journal.add(ctx, "disk %d: %s", d.Key, d.URI)
	}
	timerCtx, cancelTimer := workflow.WithCancel(ctx)
	defer cancelTimer()
	var ended string
	sel := workflow.NewSelector(ctx)
	sel.AddReceive(unmount, func(c workflow.ReceiveChannel, _ bool) {
		c.Receive(ctx, nil)
		ended = EndedUnmount
	})
	sel.AddFuture(workflow.NewTimer(timerCtx, ttl), func(workflow.Future) { ended = EndedTTL })
	sel.AddReceive(ctx.Done(), func(workflow.ReceiveChannel, bool) { ended = EndedCancel })
	sel.Select(ctx)
	return ended
}

// unmount tears the mount down; a cancelled mount ends cancelled once everything is released.
func (m *mount) unmount(ctx workflow.Context, ended string) (MountInfo, error) {
	cleanupCtx, _ := workflow.NewDisconnectedContext(ctx)
	m.info.Ended = ended
	m.setStatus(cleanupCtx, MountUnmounting)
	m.journal.add(cleanupCtx, "unmounting (%s)", ended)
	for _, key := range m.teardownKeys() {
		m.step(cleanupCtx, "unmounting: %s", key)
		if err := m.undo.runNow(cleanupCtx, key); err != nil {
			return MountInfo{}, m.failMount(ctx, fmt.Errorf("unmount: %w", err))
		}
	}
	m.setStatus(cleanupCtx, MountEnded)
	m.step(cleanupCtx, "ended (%s)", ended)
	if ended == EndedCancel {
		return MountInfo{}, ctx.Err()
	}
	return m.snapshot(), nil
}

// teardownKeys are the undos the unmount runs, in the order they were registered reversed.
func (m *mount) teardownKeys() []string {
	keys := make([]string, 0, len(m.undo.list))
	for i := len(m.undo.list) - 1; i >= 0; i-- {
		keys = append(keys, m.undo.list[i].key)
	}
	return keys
}

// failMount releases what the mount holds after err and records why it ended.
func (m *mount) failMount(ctx workflow.Context, err error) error {
	cleanupCtx, _ := workflow.NewDisconnectedContext(ctx)
	if m.info.Ended == "" {
		m.info.Ended = EndedError
		if cancelled(ctx, err) {
			m.info.Ended = EndedCancel
		}
	}
	m.info.Error, m.progress.Error = err.Error(), err.Error()
	m.journal.add(cleanupCtx, "failed: %v; cleaning up", err)
	m.step(cleanupCtx, "cleaning up")
	m.compensate(cleanupCtx, err)
	status := MountFailed
	if m.info.Ended == EndedCancel {
		status = MountEnded
	}
	m.setStatus(cleanupCtx, status)
	m.step(cleanupCtx, "%s", status)
	if cancelled(ctx, err) && !temporal.IsCanceledError(err) {
		return ctx.Err()
	}
	return err
}
