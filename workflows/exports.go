package workflows

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
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

// portWaitChange versions how a run leases its ports (leasePorts): runs that started before
// it leased disk by disk, between the exports, and left AllocatePort retrying
// ErrPortsExhausted on the server, silently.
const portWaitChange = "port-wait"

// portQueueChange versions the wake-up in the wait for ports (waitForPorts): runs that
// started before it only wake at their timer.
const portQueueChange = "port-queue"

// Bounds of the wait for ports: the first pause, the longest, and the whole wait from the
// first time the hub had too few free ports.
const (
	portWaitFirst = time.Second
	portWaitMax   = 30 * time.Second
	portWaitBound = 30 * time.Minute
)

// portFor returns the port leased to a disk of the run.
type portFor func(ctx workflow.Context, key int32) (int, error)

// leasePorts leases a port on the hub for every disk of the run in one step, all or none: a
// run never holds some ports while it waits for others, so runs that each need several
// cannot deadlock on a small range. Too few free ports is back-pressure, not failure: the
// run waits for leases to free up, saying so in its progress and job log, with pauses from
// portWaitFirst growing to portWaitMax so the catalog is not hammered, for portWaitBound at
// most; then it fails naming the hub and its range. The result gives each disk its port; for
// a run that started before portWaitChange it leases the disk's port right then, as that run
// did.
func (j *job) leasePorts(ctx workflow.Context, hubID string, keys []int32) (portFor, error) {
	j.step(ctx, "leasing ports on hub %s", hubID)
	if workflow.GetVersion(ctx, portWaitChange, workflow.DefaultVersion, 1) == workflow.DefaultVersion {
		return func(ctx workflow.Context, key int32) (int, error) {
			name := activities.AllocatePortName
			opts := j.options(name, activities.HubQueue, fmt.Sprintf("lease a port for disk %d", key))
			opts.RetryPolicy.NonRetryableErrorTypes = nonRetryable
			opts.RetryPolicy.InitialInterval = 5 * time.Second
			opts.RetryPolicy.MaximumAttempts = 0
			opts.ScheduleToCloseTimeout = portWaitBound
			var port int
			err := j.executeWith(ctx, opts, name, activities.AllocatePortInput{HubID: hubID, WorkflowID: j.workflowID(), DiskKey: key}, &port)
			return port, err
		}, nil
	}
	ports, err := j.allocatePorts(ctx, hubID, keys)
	if err != nil {
		return nil, err
	}
	leased := make(map[int32]int, len(keys))
	for i, key := range keys {
		leased[key] = ports[i]
	}
	return func(_ workflow.Context, key int32) (int, error) {
		port, ok := leased[key]
		if !ok {
			return 0, fmt.Errorf("disk %d has no port leased on hub %s", key, hubID)
		}
		return port, nil
	}, nil
}

// allocatePorts runs AllocatePorts, waiting as leasePorts says while the hub has too few free ports.
func (j *job) allocatePorts(ctx workflow.Context, hubID string, keys []int32) ([]int, error) {
	name, queue := activities.AllocatePortsName, activities.HubQueue
	in := activities.AllocatePortsInput{HubID: hubID, WorkflowID: j.workflowID(), DiskKeys: keys}
	opts := j.options(name, queue, "lease ports for "+diskList(keys))
	var ports []int
	err := j.executeWith(ctx, opts, name, in, &ports)
	exhausted, ok := portsExhausted(err, hubID)
	if !ok {
		return ports, err
	}
	since := workflow.Now(ctx)
	waitingFor := exhausted.waitingFor(len(keys))
	j.journal.add(ctx, "%s wait for %s", diskList(keys), waitingFor)
	defer j.waiting(ctx, "")
	wakeable := workflow.GetVersion(ctx, portQueueChange, workflow.DefaultVersion, 1) == 1
	pause := portWaitFirst
	for {
		waited := workflow.Now(ctx).Sub(since)
		if waited >= portWaitBound {
			return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf(
				"no free export ports on hub %s for %s: %s for %s (other jobs hold them; "+
					"widen DISKFERRY_PORT_MIN-DISKFERRY_PORT_MAX on the hub or run fewer jobs at once)",
				hubID, diskList(keys), exhausted.describe(), waited.Round(time.Second)), activities.ErrPortsExhausted, err)
		}
		j.waiting(ctx, waitingFor)
		if err := waitForPorts(ctx, wakeable, min(pause, portWaitBound-waited), waitingFor); err != nil {
			return nil, err
		}
		pause = min(2*pause, portWaitMax)
		err = j.run(ctx, opts, name, in, &ports)
		if exhausted, ok = portsExhausted(err, hubID); !ok {
			if err == nil {
				j.journal.add(ctx, "%s leased ports %s on hub %s after waiting %s", diskList(keys), joinInts(ports), hubID,
					workflow.Now(ctx).Sub(since).Round(time.Second))
			}
			return ports, err
		}
		waitingFor = exhausted.waitingFor(len(keys))
	}
}

// waitForPorts pauses a run waiting for ports for d, or, when wakeable, until the hub
// signals (activities.PortsFreeSignal) that a release made room for it, whichever is first.
// The hub serves its line first come, first served and wakes the runs that fit, so free
// ports do not sit idle until the next timer; the timer stays as the bound should a wake-up
// be lost.
func waitForPorts(ctx workflow.Context, wakeable bool, d time.Duration, waitingFor string) error {
	opts := workflow.TimerOptions{Summary: escapeMarkdown("wait for " + waitingFor)}
	if !wakeable {
		return workflow.NewTimerWithOptions(ctx, d, opts).Get(ctx, nil)
	}
	timerCtx, stopTimer := workflow.WithCancel(ctx)
	timer := workflow.NewTimerWithOptions(timerCtx, d, opts)
	wake := workflow.GetSignalChannel(ctx, activities.PortsFreeSignal)
	var err error
	woken := false
	sel := workflow.NewSelector(ctx)
	sel.AddFuture(timer, func(f workflow.Future) { err = f.Get(ctx, nil) })
	sel.AddReceive(wake, func(c workflow.ReceiveChannel, _ bool) { c.Receive(ctx, nil); woken = true })
	sel.Select(ctx)
	if woken {
		stopTimer()
	}
	// One try answers every wake-up received so far.
	for wake.ReceiveAsync(nil) {
	}
	return err
}

// diskList names disks for people: "disk 2000", "disks 2000, 2001".
func diskList(keys []int32) string {
	if len(keys) == 1 {
		return fmt.Sprintf("disk %d", keys[0])
	}
	return "disks " + joinInts(keys)
}

// joinInts is "1, 2, 3".
func joinInts[T int | int32](values []T) string {
	s := make([]string, len(values))
	for i, v := range values {
		s[i] = strconv.Itoa(int(v))
	}
	return strings.Join(s, ", ")
}

// portsLeased is what an ErrPortsExhausted says of the hub's ports.
type portsLeased activities.PortsExhausted

// portsExhausted reports whether err is ErrPortsExhausted, with its details; a hub worker
// older than the details says only which hub.
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

// waitingFor is what a run needing ports for n disks waits for: "a port on hub X (all 4 ports
// leased; retrying)", "a port on hub X for each of 2 disks (1 of 4 ports free, 2 jobs ahead
// in line; retrying)".
func (p portsLeased) waitingFor(n int) string {
	what := "a port on hub " + p.HubID
	if n > 1 {
		what += fmt.Sprintf(" for each of %d disks", n)
	}
	var ahead string
	switch {
	case p.Ahead == 1:
		ahead = ", 1 job ahead in line"
	case p.Ahead > 1:
		ahead = fmt.Sprintf(", %d jobs ahead in line", p.Ahead)
	}
	switch {
	case p.Ports == 0:
		return what + " (retrying)"
	case p.Free == 0:
		return fmt.Sprintf("%s (all %d ports leased%s; retrying)", what, p.Ports, ahead)
	default:
		return fmt.Sprintf("%s (%d of %d ports free%s; retrying)", what, p.Free, p.Ports, ahead)
	}
}

// describe says how the hub's ports stood: "all 4 ports (10100-10103) stayed leased",
// "2 of the 4 ports (10100-10103) stayed free at most".
func (p portsLeased) describe() string {
	switch {
	case p.Ports == 0:
		return "its ports stayed leased"
	case p.Free == 0:
		return fmt.Sprintf("all %d ports (%d-%d) stayed leased", p.Ports, p.First, p.Last)
	default:
		return fmt.Sprintf("only %d of the %d ports (%d-%d) were free at the last try", p.Free, p.Ports, p.First, p.Last)
	}
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
