package workflows

import (
	"fmt"

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

// allocatePort leases a port on the hub for one disk of the run.
func (j *job) allocatePort(ctx workflow.Context, hubID string, key int32, port *int) error {
	return j.execute(ctx, activities.AllocatePortName, activities.HubQueue, fmt.Sprintf("lease a port for disk %d", key),
		activities.AllocatePortInput{HubID: hubID, WorkflowID: j.workflowID(), DiskKey: key}, port)
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
