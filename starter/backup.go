package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"

	"github.com/diskferry/diskferry/workflows"
)

func newBackupCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "backup", Short: "Start, watch, list and cancel backups"}
	cmd.AddCommand(newBackupStartCommand(), newBackupStatusCommand(), newBackupListCommand(), newCancelCommand("backup", "its cleanup removes the snapshot, exports and partial files"))
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
			return followRun(ctx, c, run, out, asJSON, "backup", printResult)
		},
	}
	f := cmd.Flags()
	f.StringVar(&in.VM, "vm", "", "VM inventory path, name or moref (required)")
	f.StringVar(&in.Site, "site", "", "source site whose SNA reaches the VM (required)")
	f.StringVar(&in.Mode, "mode", "auto", "auto, full or incremental")
	f.BoolVar(&in.Quiesce, "quiesce", false, "quiesce the guest file systems for the snapshot")
	f.Int32SliceVar(&in.Disks, "disk", nil, "disk key to back up (repeatable; default every disk)")
	f.IntVar(&in.Connections, "connections", 0, "NBD connections per disk copy (default 4)")
	f.StringVar(&in.Bandwidth, "bandwidth", "", "bandwidth the backup's disk copies share, e.g. 50Mbit, 1Gbit, 12.5MB/s (default: the site's limit only)")
	f.BoolVar(&wait, "wait", false, "follow the backup with progress bars until it ends; the exit code tells the outcome")
	f.BoolVar(&asJSON, "json", false, "print JSON for scripts")
	_ = cmd.MarkFlagRequired("vm")
	_ = cmd.MarkFlagRequired("site")
	return cmd
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
	if r.Retention != "" {
		fmt.Fprintf(out, "retention: %s reviews the points of VM %s (diskferry retention apply --vm %s --dry-run shows its plan)\n",
			r.Retention, r.VMName, r.VMName)
	}
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
			printf(out, "backup %s of %s (site %s): %s, %s\n", args[0], p.VM, p.Site, p.Status, p.Step)
			if p.PointID != "" {
				printf(out, "point %s on hub %s, mode %s\n", p.PointID, p.HubID, p.Mode)
			}
			return renderProgressDetail(out, p)
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
			runs, err := listRuns(ctx, c, query, limit)
			if err != nil {
				return fmt.Errorf("list backups: %w", err)
			}
			rows := make([]backupRow, len(runs))
			for i, r := range runs {
				rows[i] = backupRow{runRow: r.runRow, VM: r.keyword("VMName"), Site: r.keyword("Site"),
					Mode: r.keyword("BackupMode"), Status: r.keyword("BackupStatus")}
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
	runRow
	VM     string `json:"vm"`
	Site   string `json:"site"`
	Mode   string `json:"mode"`
	Status string `json:"status"` // BackupStatus search attribute
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
