package hub

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/qemu"
)

// WorkflowClosedFunc asks Temporal whether a workflow's latest run has closed. A workflow
// Temporal does not know (deleted, archived, never started) counts as closed.
func WorkflowClosedFunc(c client.Client) catalog.WorkflowClosed {
	return func(ctx context.Context, workflowID string) (bool, error) {
		resp, err := c.DescribeWorkflow(ctx, workflowID, "")
		var notFound *serviceerror.NotFound
		if errors.As(err, &notFound) {
			return true, nil
		}
		if err != nil {
			return false, fmt.Errorf("describe workflow %s: %w", workflowID, err)
		}
		return resp.RawResponse.GetWorkflowExecutionInfo().GetStatus() != enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING, nil
	}
}

// PortsFreeFunc wakes a run waiting for ports with PortsFreeSignal (Settings.PortsFree).
func PortsFreeFunc(c client.Client) func(context.Context, string) error {
	return func(ctx context.Context, workflowID string) error {
		if err := c.SignalWorkflow(ctx, workflowID, "", activities.PortsFreeSignal, nil); err != nil {
			return fmt.Errorf("signal %s to %s: %w", activities.PortsFreeSignal, workflowID, err)
		}
		return nil
	}
}

// RetentionRunningFunc asks Temporal whether a VM's retention, the workflow named by
// retentionID, runs (Settings.RetentionRunning).
func RetentionRunningFunc(c client.Client, retentionID func(vmRef string) string) func(context.Context, string) (string, error) {
	closed := WorkflowClosedFunc(c)
	return func(ctx context.Context, vmRef string) (string, error) {
		id := retentionID(vmRef)
		done, err := closed(ctx, id)
		if err != nil || done {
			return "", err
		}
		return id, nil
	}
}

// ReconcileReport says what Reconcile changed, by port and by point.
type ReconcileReport struct {
	Reaped     []catalog.Lease // leases of closed workflows, released
	Stopped    []int           // export processes without a lease, stopped
	Forgotten  []int           // catalog rows whose process was gone, removed
	Registered []int           // live, leased exports missing from the catalog, recorded
	Restarted  []int           // exports of running workflows whose process was gone, started again
	Verifiers  int             // verification exports a crashed worker left, stopped
	Abandoned  []string        // running points of closed workflows, marked failed
	Swept      []string        // directories of failed points of closed workflows, removed
}

// restartConnections is the copy connections a restarted export is sized for (its
// --shared): the most an SNA opens (DISKFERRY_COPY_CONNECTIONS is at most 16).
const restartConnections = 16

// Reconcile makes the catalog's exports of this hub, the qemu-nbd processes named by the
// pid files in the run dir, the port leases and the repository agree again, after a
// worker restart, a killed export or a workflow that closed without cleaning up: leases
// of closed workflows are released; an export without a lease is stopped; a row whose
// process is gone is started again when its lease still belongs to its (running)
// workflow, on the same socket, and removed otherwise; a live export holding its lease
// but missing from the catalog is recorded again; finally the files of points whose
// workflow closed without completing them are removed (sweepPoints).
// Every port and point is handled even when one fails; the errors come back joined.
func (a *Activities) Reconcile(ctx context.Context) (ReconcileReport, error) {
	a.exporting.Lock()
	defer a.exporting.Unlock()
	var report ReconcileReport
	var errs []error
	hub := a.settings.HubID

	reaped, err := a.ports.Reap(ctx, hub, a.settings.WorkflowClosed)
	report.Reaped = reaped
	if err != nil {
		// Leases whose workflow state is unknown stay; their exports stay too.
		errs = append(errs, err)
	}
	// Reaped leases and closed runs taken out of the line may make room for runs in it.
	a.wakePortWaiters(ctx, hub)
	leases, err := a.ports.ListLeases(ctx, hub)
	if err != nil {
		return report, fmt.Errorf("reconcile: %w", err)
	}
	rows, err := a.store.ListExports(ctx, hub)
	if err != nil {
		return report, fmt.Errorf("reconcile: %w", err)
	}
	pidPorts, err := a.pidFilePorts()
	if err != nil {
		return report, fmt.Errorf("reconcile: %w", err)
	}

	leaseOf := map[int]catalog.Lease{}
	for _, l := range leases {
		leaseOf[l.Port] = l
	}
	rowOf := map[int]catalog.Export{}
	ports := pidPorts
	for _, r := range rows {
		rowOf[r.Port] = r
		ports = append(ports, r.Port)
	}
	slices.Sort(ports)
	for _, port := range slices.Compact(ports) {
		lease, leased := leaseOf[port]
		row, recorded := rowOf[port]
		if err := a.reconcilePort(ctx, port, lease, leased, row, recorded, &report); err != nil {
			errs = append(errs, fmt.Errorf("port %d: %w", port, err))
		}
	}
	n, err := a.stopVerifiers(ctx)
	report.Verifiers = n
	if err != nil {
		errs = append(errs, err)
	}
	if err := a.sweepPoints(ctx, &report); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return report, fmt.Errorf("reconcile exports of hub %s: %w", hub, errors.Join(errs...))
	}
	return report, nil
}

func (a *Activities) reconcilePort(ctx context.Context, port int, lease catalog.Lease, leased bool,
	row catalog.Export, recorded bool, report *ReconcileReport) error {
	hub := a.settings.HubID
	pidFile := a.pidFile(port)
	exp, findErr := qemu.Find(pidFile)
	if findErr != nil && !errors.Is(findErr, qemu.ErrNotRunning) {
		return findErr
	}
	alive := findErr == nil
	log := a.log.With("hub", hub, "port", port)

	switch {
	case !alive:
		// Nothing serves the port: drop the stale pid file qemu-nbd leaves, then serve the
		// target again if its backup still runs, or forget the row.
		if err := qemu.StopPidFile(ctx, pidFile, a.settings.StopTimeout); err != nil {
			return err
		}
		if recorded && leased && row.WorkflowID == lease.WorkflowID && row.DiskKey == lease.DiskKey {
			return a.restartExport(ctx, row, report)
		}
		if recorded {
			if err := a.store.RemoveExport(ctx, hub, port); err != nil {
				return err
			}
			log.InfoContext(ctx, "reconcile: export process gone; row removed", "workflow", row.WorkflowID, "pid", row.PID)
			report.Forgotten = append(report.Forgotten, port)
		}
		return nil

	// The row names this very process but another workflow than the lease: the port was
	// leased anew while the old export lingered. A row with an older pid is merely stale.
	case !leased, recorded && row.PID == exp.PID && row.WorkflowID != lease.WorkflowID:
		if err := exp.Stop(ctx, a.settings.StopTimeout); err != nil {
			return err
		}
		if err := a.store.RemoveExport(ctx, hub, port); err != nil {
			return err
		}
		log.WarnContext(ctx, "reconcile: stray export stopped", "pid", exp.PID, "path", exp.Path, "rowWorkflow", row.WorkflowID)
		report.Stopped = append(report.Stopped, port)
		return nil

	case !recorded || row.PID != exp.PID || row.Path != exp.Path || row.ReadOnly != exp.ReadOnly:
		err := a.store.RecordExport(ctx, catalog.Export{
			Hub: hub, Port: port, PID: exp.PID, Path: exp.Path, WorkflowID: lease.WorkflowID, DiskKey: lease.DiskKey,
			ReadOnly: exp.ReadOnly,
		})
		if err != nil {
			return err
		}
		log.InfoContext(ctx, "reconcile: live export recorded again", "pid", exp.PID, "path", exp.Path, "workflow", lease.WorkflowID)
		report.Registered = append(report.Registered, port)
		return nil
	}
	return nil
}

// restartExport serves a running backup's target again on its port's socket, after its
// qemu-nbd died (killed, crashed, the hub rebooted): the copy's next attempt reconnects
// through the same forward and resumes from its checkpoint. A read-only export (a restore's
// or a mount's) comes back read-only.
func (a *Activities) restartExport(ctx context.Context, row catalog.Export, report *ReconcileReport) error {
	hub := a.settings.HubID
	log := a.log.With("hub", hub, "port", row.Port, "workflow", row.WorkflowID, "path", row.Path)
	if !a.layout.Contains(row.Path) {
		return fmt.Errorf("restart export of workflow %s: target %q is outside the repository", row.WorkflowID, row.Path)
	}
	if _, err := os.Stat(row.Path); err != nil {
		// Nothing to serve: the copy fails naming the dead export, the backup's undo cleans up.
		if err := a.store.RemoveExport(ctx, hub, row.Port); err != nil {
			return err
		}
		log.ErrorContext(ctx, "reconcile: export process gone and its target too; row removed", "err", err)
		report.Forgotten = append(report.Forgotten, row.Port)
		return nil
	}
	exp, err := a.serveTarget(ctx, row.Port, row.Path, row.DiskKey, restartConnections, row.ReadOnly)
	if err != nil {
		return fmt.Errorf("restart export of workflow %s: %w", row.WorkflowID, err)
	}
	row.PID = exp.PID
	if err := a.store.RecordExport(ctx, row); err != nil {
		return fmt.Errorf("restart export of workflow %s: %w", row.WorkflowID, err)
	}
	log.WarnContext(ctx, "reconcile: export of a running workflow was gone; restarted on the same socket", "pid", exp.PID,
		"socket", exp.Socket, "readOnly", row.ReadOnly)
	report.Restarted = append(report.Restarted, row.Port)
	return nil
}

// sweepPoints removes the directories of points whose workflow closed without completing
// them: failed points, and running ones, which it marks failed first (a workflow whose
// compensation could not reach the catalog leaves its point running and its files behind).
// It never touches a complete point, a point whose workflow may still run (its
// compensation discards its own files), a directory holding a file an export serves, nor
// a directory the catalog does not know: a catalog restored from an older dump must not
// cost restore points.
func (a *Activities) sweepPoints(ctx context.Context, report *ReconcileReport) error {
	// Directories first, the catalog second: a directory exists only once its point is in
	// the catalog, so a backup starting meanwhile is never mistaken for an unknown one.
	dirs, err := a.layout.PointDirs()
	if err != nil {
		return fmt.Errorf("sweep points: %w", err)
	}
	if len(dirs) == 0 {
		return nil
	}
	points, err := a.store.HubPoints(ctx, a.settings.HubID)
	if err != nil {
		return fmt.Errorf("sweep points: %w", err)
	}
	served, err := a.servedPaths()
	if err != nil {
		return fmt.Errorf("sweep points: %w", err)
	}
	var errs []error
	for dir, id := range dirs {
		p, known := points[id]
		// A deleting point's files are retention's: its directory may hold a kept point's
		// file after a merge.
		if !known || p.Status == catalog.StatusComplete || p.Status == catalog.StatusDeleting {
			continue
		}
		closed, err := a.settings.WorkflowClosed(ctx, p.WorkflowID)
		if err != nil {
			errs = append(errs, fmt.Errorf("sweep point %s: %w", id, err))
			continue
		}
		if !closed {
			continue
		}
		if slices.ContainsFunc(served, func(path string) bool { return filepath.Dir(path) == dir }) {
			continue // its export goes first, with its lease
		}
		log := a.log.With("hub", a.settings.HubID, "point", id, "workflow", p.WorkflowID)
		if p.Status == catalog.StatusRunning {
			err := a.store.FailPoint(ctx, id, "workflow "+p.WorkflowID+" closed without finishing the backup; reconcile removed its files")
			if errors.Is(err, catalog.ErrPointComplete) {
				continue
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("sweep point %s: %w", id, err))
				continue
			}
			log.WarnContext(ctx, "reconcile: point of a closed workflow was still running; marked failed")
			report.Abandoned = append(report.Abandoned, id)
		}
		if err := a.layout.RemovePointDir(dir); err != nil {
			errs = append(errs, fmt.Errorf("sweep point %s: %w", id, err))
			continue
		}
		log.WarnContext(ctx, "reconcile: files of a failed point removed", "dir", dir)
		report.Swept = append(report.Swept, dir)
	}
	slices.Sort(report.Abandoned)
	slices.Sort(report.Swept)
	return errors.Join(errs...)
}

// servedPaths lists the images the live exports of the run dir serve.
func (a *Activities) servedPaths() ([]string, error) {
	ports, err := a.pidFilePorts()
	if err != nil {
		return nil, err
	}
	var paths []string
	for _, port := range ports {
		if exp, err := qemu.Find(a.pidFile(port)); err == nil {
			paths = append(paths, exp.Path)
		}
	}
	return paths, nil
}

// pidFilePorts lists the ports of the export pid files in the run dir.
func (a *Activities) pidFilePorts() ([]int, error) {
	matches, err := filepath.Glob(filepath.Join(a.settings.RunDir, "export-*.pid"))
	if err != nil {
		return nil, err
	}
	var ports []int
	for _, m := range matches {
		digits := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(m), "export-"), ".pid")
		if port, err := strconv.Atoi(digits); err == nil && port > 0 && port <= 65535 {
			ports = append(ports, port)
		}
	}
	return ports, nil
}

// stopVerifiers stops the read-only verification exports a crashed worker left behind and
// removes their directories; those of verifications running in this process stay.
func (a *Activities) stopVerifiers(ctx context.Context) (int, error) {
	dirs, err := filepath.Glob(filepath.Join(a.settings.RunDir, verifyDirPrefix+"*"))
	if err != nil {
		return 0, err
	}
	stopped := 0
	var errs []error
	for _, dir := range dirs {
		// A verification starting after the Glob gets a new name (MkdirTemp), so it is not in dirs.
		a.mu.Lock()
		active := a.verifying[dir]
		a.mu.Unlock()
		if active {
			continue
		}
		if err := qemu.StopPidFile(ctx, filepath.Join(dir, "nbd.pid"), a.settings.StopTimeout); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
			continue
		}
		stopped++
		a.log.InfoContext(ctx, "reconcile: leftover verification export removed", "dir", dir)
	}
	return stopped, errors.Join(errs...)
}
