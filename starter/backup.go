package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/workflows"
)

func newBackupCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "backup", Short: "Start, watch, list and cancel backups"}
	cmd.AddCommand(newBackupStartCommand(), newBackupStatusCommand(), newBackupListCommand(), newBackupCancelCommand())
	return cmd
}

func newBackupStartCommand() *cobra.Command {
	var in workflows.BackupInput
	var wait, asJSON bool
	cmd := &cobra.Command{
		Use:   "start --vm VM --site SITE",
		Short: "Start a backup of one VM",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := in.Validate(); err != nil {
				return err
			}
			ctx := cmd.Context()
			c, err := dialTemporal(ctx)
			if err != nil {
				return err
			}
			defer c.Close()
			run, err := c.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
			var already *serviceerror.WorkflowExecutionAlreadyStarted
			if errors.As(err, &already) {
				return fmt.Errorf("a backup of %s is already running (workflow %s); watch it with: diskferry backup status %s",
					in.VM, workflows.BackupWorkflowID(in.VM), workflows.BackupWorkflowID(in.VM))
			}
			if err != nil {
				return fmt.Errorf("start backup of %s: %w", in.VM, err)
			}
			out := cmd.OutOrStdout()
			if !wait {
				if asJSON {
					return writeJSON(out, map[string]string{"workflowId": run.GetID(), "runId": run.GetRunID()})
				}
				fmt.Fprintf(out, "started backup %s (run %s)\n", run.GetID(), run.GetRunID())
				return nil
			}
			return waitBackup(ctx, c, run, out, asJSON)
		},
	}
	f := cmd.Flags()
	f.StringVar(&in.VM, "vm", "", "VM inventory path, name or moref (required)")
	f.StringVar(&in.Site, "site", "", "source site whose SNA reaches the VM (required)")
	f.StringVar(&in.Mode, "mode", "auto", "auto, full or incremental")
	f.BoolVar(&in.Quiesce, "quiesce", false, "quiesce the guest file systems for the snapshot")
	f.Int32SliceVar(&in.Disks, "disk", nil, "disk key to back up (repeatable; default every disk)")
	f.IntVar(&in.Connections, "connections", 0, "NBD connections per disk copy (default 4)")
	f.BoolVar(&wait, "wait", false, "follow the backup with progress bars until it ends; the exit code tells the outcome")
	f.BoolVar(&asJSON, "json", false, "print JSON for scripts")
	_ = cmd.MarkFlagRequired("vm")
	_ = cmd.MarkFlagRequired("site")
	return cmd
}

// waitBackup shows per-disk progress until the run ends, then a summary.
func waitBackup(ctx context.Context, c client.Client, run client.WorkflowRun, out io.Writer, asJSON bool) error {
	done := make(chan error, 1)
	var result workflows.BackupResult
	go func() { done <- run.Get(ctx, &result) }()

	view := newProgressView(out, !asJSON && isTerminal(out))
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			// The last frame shows how the disks ended; a closed run still answers the query.
			if p, qerr := liveProgress(ctx, c, run.GetID(), run.GetRunID()); qerr == nil {
				view.update(p, time.Now())
			}
			if err != nil {
				return backupFailure(run.GetID(), err)
			}
			if asJSON {
				return writeJSON(out, result)
			}
			printResult(out, run.GetID(), result)
			return nil
		case <-tick.C:
			p, err := liveProgress(ctx, c, run.GetID(), run.GetRunID())
			if err == nil {
				view.update(p, time.Now())
			}
		}
	}
}

// backupFailure says what failed in operator terms: the step and its own message, not the
// SDK's whole chain of wrappers.
func backupFailure(id string, err error) error {
	var canceled *temporal.CanceledError
	if errors.As(err, &canceled) {
		return fmt.Errorf("backup %s was cancelled; its cleanup has run", id)
	}
	step := ""
	var actErr *temporal.ActivityError
	if errors.As(err, &actErr) {
		step = " in " + actErr.ActivityType().GetName()
	}
	var appErr *temporal.ApplicationError
	if errors.As(err, &appErr) {
		return fmt.Errorf("backup %s failed%s: %s", id, step, appErr.Message())
	}
	return fmt.Errorf("backup %s failed%s: %w", id, step, err)
}

// liveProgress is the workflow's progress query plus the bytes of copies in flight from
// their heartbeats.
func liveProgress(ctx context.Context, c client.Client, id, runID string) (workflows.Progress, error) {
	var p workflows.Progress
	v, err := c.QueryWorkflow(ctx, id, runID, workflows.ProgressQueryName)
	if err != nil {
		return p, fmt.Errorf("query progress of %s: %w", id, err)
	}
	if err := v.Get(&p); err != nil {
		return p, fmt.Errorf("decode progress of %s: %w", id, err)
	}
	desc, err := c.DescribeWorkflow(ctx, id, runID)
	if err != nil {
		return p, fmt.Errorf("describe %s: %w", id, err)
	}
	live, err := workflows.LiveCopies(desc.RawResponse.GetPendingActivities(), converter.GetDefaultDataConverter())
	if err != nil {
		return p, err
	}
	return p.WithLiveCopies(live, time.Now()), nil
}

func printResult(out io.Writer, id string, r workflows.BackupResult) {
	fmt.Fprintf(out, "backup %s complete: point %s on hub %s, %s, %s\n", id, r.PointID, r.HubID, r.Mode, r.Duration.Round(time.Millisecond))
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DISK\tMODE\tREAD\tWRITTEN\tZEROED\tTIME\tPATH")
	for _, d := range r.Disks {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", d.Key, d.Mode, humanBytes(d.BytesRead), humanBytes(d.BytesWritten),
			humanBytes(d.BytesZeroed), d.Duration.Round(time.Millisecond), d.Path)
	}
	_ = tw.Flush()
	for _, w := range r.Warnings {
		fmt.Fprintf(out, "warning: %s\n", w)
	}
}

func newBackupStatusCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status WORKFLOW-ID",
		Short: "Show a backup's state and per-disk progress",
		Args:  cobra.ExactArgs(1),
		RunE: withTemporal(func(cmd *cobra.Command, args []string, c client.Client) error {
			ctx := cmd.Context()
			p, err := liveProgress(ctx, c, args[0], "")
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, p)
			}
			fmt.Fprintf(out, "backup %s of %s (site %s): %s, %s\n", args[0], p.VM, p.Site, p.Status, p.Step)
			if p.WaitingFor != "" {
				fmt.Fprintf(out, "waiting for: %s\n", p.WaitingFor)
			}
			if p.PointID != "" {
				fmt.Fprintf(out, "point %s on hub %s, mode %s\n", p.PointID, p.HubID, p.Mode)
			}
			if p.Error != "" {
				fmt.Fprintf(out, "error: %s\n", p.Error)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "DISK\tMODE\tPHASE\tDONE\tTOTAL\tRATE")
			for _, d := range p.Disks {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s/s\n", d.Key, d.Mode, d.Phase, humanBytes(d.BytesDone), humanBytes(d.BytesTotal), humanBytes(int64(d.Rate)))
			}
			return tw.Flush()
		}),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func newBackupListCommand() *cobra.Command {
	var vm, status string
	var limit int
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list [--vm NAME] [--status STATUS]",
		Short: "List backups, newest first (from Temporal visibility)",
		Args:  cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error {
			if status != "" && !slices.Contains(backupStatuses, status) {
				return fmt.Errorf("--status %q is not one of %s", status, strings.Join(backupStatuses, ", "))
			}
			return nil
		},
		RunE: withTemporal(func(cmd *cobra.Command, _ []string, c client.Client) error {
			ctx := cmd.Context()
			query := fmt.Sprintf("WorkflowType = %q", workflows.BackupWorkflowName)
			if vm != "" {
				query += fmt.Sprintf(" AND VMName = %q", vm)
			}
			if status != "" {
				query += fmt.Sprintf(" AND BackupStatus = %q", status)
			}
			resp, err := c.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{Query: query, PageSize: int32(limit)})
			if err != nil {
				return fmt.Errorf("list backups: %w", err)
			}
			rows := make([]backupRow, 0, len(resp.GetExecutions()))
			for _, e := range resp.GetExecutions() {
				r := backupRow{
					WorkflowID: e.GetExecution().GetWorkflowId(), RunID: e.GetExecution().GetRunId(),
					State: strings.ToLower(strings.TrimPrefix(e.GetStatus().String(), "WORKFLOW_EXECUTION_STATUS_")),
					Start: e.GetStartTime().AsTime(),
				}
				if e.GetStatus() != enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING {
					r.End = e.GetCloseTime().AsTime()
				}
				fields := e.GetSearchAttributes().GetIndexedFields()
				dc := converter.GetDefaultDataConverter()
				for name, dst := range map[string]*string{"VMName": &r.VM, "Site": &r.Site, "BackupMode": &r.Mode, "BackupStatus": &r.Status} {
					if p, ok := fields[name]; ok {
						_ = dc.FromPayload(p, dst)
					}
				}
				rows = append(rows, r)
				if len(rows) >= limit {
					break
				}
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, rows)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "WORKFLOW ID\tVM\tSITE\tMODE\tSTATUS\tSTATE\tSTARTED")
			for _, r := range rows {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.WorkflowID, r.VM, r.Site, r.Mode, r.Status, r.State, r.Start.Local().Format(time.DateTime))
			}
			return tw.Flush()
		}),
	}
	f := cmd.Flags()
	f.StringVar(&vm, "vm", "", "only backups of this VM name")
	f.StringVar(&status, "status", "", "only backups in this status ("+strings.Join(backupStatuses, ", ")+")")
	f.IntVar(&limit, "limit", 50, "at most this many rows")
	f.BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

// backupStatuses are the values of the BackupStatus search attribute.
var backupStatuses = []string{workflows.StatusRunning, workflows.StatusCopying, workflows.StatusVerifying,
	workflows.StatusComplete, workflows.StatusFailed, workflows.StatusCancelled}

type backupRow struct {
	WorkflowID string    `json:"workflowId"`
	RunID      string    `json:"runId"`
	VM         string    `json:"vm"`
	Site       string    `json:"site"`
	Mode       string    `json:"mode"`
	Status     string    `json:"status"` // BackupStatus search attribute
	State      string    `json:"state"`  // Temporal execution status
	Start      time.Time `json:"start"`
	End        time.Time `json:"end,omitzero"`
}

func newBackupCancelCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "cancel WORKFLOW-ID",
		Short: "Cancel a running backup; its cleanup removes the snapshot, exports and partial files",
		Args:  cobra.ExactArgs(1),
		RunE: withTemporal(func(cmd *cobra.Command, args []string, c client.Client) error {
			ctx := cmd.Context()
			if err := c.CancelWorkflow(ctx, args[0], ""); err != nil {
				return fmt.Errorf("cancel %s: %w", args[0], err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "cancel requested for %s; cleanup runs before it closes\n", args[0])
			return nil
		}),
	}
}

func writeJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
