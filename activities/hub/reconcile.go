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

// ReconcileReport says what Reconcile changed, by port.
type ReconcileReport struct {
	Reaped     []catalog.Lease // leases of closed workflows, released
	Stopped    []int           // export processes without a lease, stopped
	Forgotten  []int           // catalog rows whose process was gone, removed
	Registered []int           // live, leased exports missing from the catalog, recorded
	Verifiers  int             // verification exports a crashed worker left, stopped
}

// Reconcile makes the catalog's exports of this hub, the qemu-nbd processes named by the
// pid files in the run dir and the port leases agree again, after a worker restart or a
// workflow that closed without cleaning up: leases of closed workflows are released;
// an export without a lease is stopped; a row whose process is gone is removed; a live
// export holding its lease but missing from the catalog is recorded again.
// Every port is handled even when one fails; the errors come back joined.
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
		// Nothing serves the port: forget the row and the stale pid file qemu-nbd leaves.
		if err := qemu.StopPidFile(ctx, pidFile, a.settings.StopTimeout); err != nil {
			return err
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

	case !recorded || row.PID != exp.PID || row.Path != exp.Path:
		err := a.store.RecordExport(ctx, catalog.Export{
			Hub: hub, Port: port, PID: exp.PID, Path: exp.Path, WorkflowID: lease.WorkflowID, DiskKey: lease.DiskKey,
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
