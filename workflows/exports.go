package workflows

import (
	"errors"
	"fmt"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
)

// Undo keys of the hub exports and tunnel forwards every workflow sets up the same way.
const (
	releasePortsKey = "release-ports"
	tunnelKey       = "tunnel"
)

func stopExportKey(key int32) string { return fmt.Sprintf("stop-export-%d", key) }

// registerPortRelease registers the release of every port lease the run holds on the hub.
// It goes before the first lease: an AllocatePort that failed after its lease was written (a
// timeout, a lost reply) still leaves it behind, and the release is idempotent.
func (j *job) registerPortRelease(hubID string) {
	release := activities.ReleasePortsInput{HubID: hubID, WorkflowID: j.workflowID()}
	j.undo.add(releasePortsKey, func(ctx workflow.Context, _ error) error {
		return j.execute(ctx, activities.ReleasePortsName, activities.HubQueue, "release the port leases", release, nil)
	})
}

// portWaitChange versions the wait for a port (allocatePort): runs that started before it
// left AllocatePort retrying ErrPortsExhausted on the server, silently.
const portWaitChange = "port-wait"

// Bounds of the wait for a port: the first pause, the longest, and the whole wait from the
// first time every port of the hub was leased.
const (
	portWaitFirst = time.Second
	portWaitMax   = 30 * time.Second
	portWaitBound = 30 * time.Minute
)

// allocatePort leases a port on the hub for one disk of the run. A hub with every port leased
// is back-pressure, not failure: the run waits for a lease to free up, saying so in its
// progress and job log, with pauses from portWaitFirst growing to portWaitMax so the catalog
// is not hammered, for portWaitBound at most; then it fails naming the hub and its range.
func (j *job) allocatePort(ctx workflow.Context, hubID string, key int32, port *int) error {
	name, queue := activities.AllocatePortName, activities.HubQueue
	in := activities.AllocatePortInput{HubID: hubID, WorkflowID: j.workflowID(), DiskKey: key}
	opts := j.options(name, queue, fmt.Sprintf("lease a port for disk %d", key))
	if workflow.GetVersion(ctx, portWaitChange, workflow.DefaultVersion, 1) == workflow.DefaultVersion {
		opts.RetryPolicy.NonRetryableErrorTypes = nonRetryable
		opts.RetryPolicy.InitialInterval = 5 * time.Second
		opts.RetryPolicy.MaximumAttempts = 0
		opts.ScheduleToCloseTimeout = portWaitBound
		return j.executeWith(ctx, opts, name, in, port)
	}
	err := j.executeWith(ctx, opts, name, in, port)
	exhausted, ok := portsExhausted(err, hubID)
	if !ok {
		return err
	}
	since := workflow.Now(ctx)
	waitingFor := fmt.Sprintf("a port on hub %s (all %s leased; retrying)", hubID, exhausted.count())
	j.journal.add(ctx, "disk %d waits for %s", key, waitingFor)
	defer j.waiting(ctx, "")
	pause := portWaitFirst
	for {
		waited := workflow.Now(ctx).Sub(since)
		if waited >= portWaitBound {
			return temporal.NewNonRetryableApplicationError(fmt.Sprintf(
				"no free export port on hub %s for disk %d: all %s stayed leased for %s (other jobs hold them; "+
					"widen DISKFERRY_PORT_MIN-DISKFERRY_PORT_MAX on the hub or run fewer jobs at once)",
				hubID, key, exhausted.describe(), waited.Round(time.Second)), activities.ErrPortsExhausted, err)
		}
		j.waiting(ctx, waitingFor)
		if err := workflow.NewTimerWithOptions(ctx, min(pause, portWaitBound-waited), workflow.TimerOptions{
			Summary: escapeMarkdown("wait for " + waitingFor),
		}).Get(ctx, nil); err != nil {
			return err
		}
		pause = min(2*pause, portWaitMax)
		err = j.run(ctx, opts, name, in, port)
		if exhausted, ok = portsExhausted(err, hubID); !ok {
			if err == nil {
				j.journal.add(ctx, "disk %d leased port %d on hub %s after waiting %s", key, *port, hubID,
					workflow.Now(ctx).Sub(since).Round(time.Second))
			}
			return err
		}
	}
}

// portsLeased is what an ErrPortsExhausted says of the hub's ports.
type portsLeased activities.PortsExhausted

// portsExhausted reports whether err is AllocatePort's ErrPortsExhausted, with its details;
// a hub worker older than the details says only which hub.
func portsExhausted(err error, hubID string) (portsLeased, bool) {
	var appErr *temporal.ApplicationError
	if !errors.As(err, &appErr) || appErr.Type() != activities.ErrPortsExhausted {
		return portsLeased{}, false
	}
	d := portsLeased{HubID: hubID}
	if appErr.HasDetails() {
		var details activities.PortsExhausted
		if appErr.Details(&details) == nil {
			d = portsLeased(details)
		}
	}
	return d, true
}

// count is "<N> ports", or "ports" when the hub did not say.
func (p portsLeased) count() string {
	if p.Ports == 0 {
		return "ports"
	}
	return fmt.Sprintf("%d ports", p.Ports)
}

// describe is count with the range: "4 ports (10100-10103)".
func (p portsLeased) describe() string {
	if p.Ports == 0 {
		return "ports"
	}
	return fmt.Sprintf("%d ports (%d-%d)", p.Ports, p.First, p.Last)
}

// startExport serves a file on its leased port with qemu-nbd on the hub host. Its stop is
// registered before the start: a StartExport that failed after qemu-nbd came up would
// otherwise leave it serving (and holding the image's lock). Stopping is idempotent and
// leaves an export of another file on the port alone.
func (j *job) startExport(ctx workflow.Context, hubID string, in activities.StartExportInput, export *activities.Export) error {
	hubHost := activities.HubHostQueue(hubID)
	stop := activities.StopExportInput{Port: in.Port, Path: in.Path}
	j.undo.add(stopExportKey(in.DiskKey), func(ctx workflow.Context, _ error) error {
		return j.execute(ctx, activities.StopExportName, hubHost, fmt.Sprintf("stop export of disk %d", in.DiskKey), stop, nil)
	})
	return j.execute(ctx, activities.StartExportName, hubHost, fmt.Sprintf("export disk %d on port %d", in.DiskKey, in.Port), in, export)
}

// openTunnel forwards the exports' ports from the site's SNA to the hub; forwards, when not
// nil, receives the SNA-side sockets. The drop is registered before the step: EnsureTunnel
// keeps the forwards it made when a later port fails (or its health check does), and dropping
// is idempotent.
func (j *job) openTunnel(ctx workflow.Context, snaQueue, hubID string, exports []activities.Export, forwards *activities.Forwards) error {
	in := activities.EnsureTunnelInput{HubID: hubID, Sockets: map[int]string{}}
	for _, e := range exports {
		in.Ports = append(in.Ports, e.Port)
		in.Sockets[e.Port] = e.Socket
	}
	j.step(ctx, "opening tunnel forwards to hub %s", hubID)
	j.undo.add(tunnelKey, func(ctx workflow.Context, _ error) error {
		return j.execute(ctx, activities.DropTunnelName, snaQueue, fmt.Sprintf("drop forwards %v", in.Ports), in, nil)
	})
	var out any
	if forwards != nil {
		out = forwards
	}
	if err := j.execute(ctx, activities.EnsureTunnelName, snaQueue, fmt.Sprintf("forward ports %v to hub %s", in.Ports, in.HubID), in, out); err != nil {
		return err
	}
	j.journal.add(ctx, "tunnel forwards %v to hub %s ready", in.Ports, in.HubID)
	return nil
}
