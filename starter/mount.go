package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"

	"github.com/diskferry/diskferry/workflows"
)

// mountPoll is how often mount asks a starting mount whether it serves yet.
const mountPoll = 500 * time.Millisecond

// defaultMountWait bounds how long mount waits for the exports and unmount for the end: each
// step may wait up to workflows.DefaultWorkerWait for its worker.
const defaultMountWait = 5 * time.Minute

func newMountCommand() *cobra.Command {
	var in workflows.MountInput
	var ttl, timeout time.Duration
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "mount --point P | --vm X [--disk K] [--ttl 2h] [--site S]",
		Short: "Serve a point read-only over NBD until unmount, its TTL or a cancel",
		Long: `Start a MountWorkflow that serves the point's disks read-only over NBD (on the hub's loopback
side; with --site also on that site's SNA, through its tunnel), wait until they serve, and
print each disk's URI, the expiry and how to unmount. The mount stays after this command
returns; it ends on diskferry unmount, when its TTL runs out, or on a cancel.

One mount per point: the workflow ID is mount-<point>; with --vm (the VM's latest complete
point, resolved by the workflow) it is mount-<vm>-latest.`,
		Example: `  diskferry mount --point 20261201T225326.952Z-1403d1e8 --disk 2000 --ttl 30m
  nbdinfo 'nbd+unix:///disk-2000?socket=...'      # the URI printed
  diskferry unmount 20261201T225326.952Z-1403d1e8`,
		Args: cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error {
			return validateMount(&in, ttl, timeout)
		},
		RunE: withTemporal(func(cmd *cobra.Command, _ []string, c client.Client) error {
			ctx := cmd.Context()
			id := mountID(in)
			run, err := c.ExecuteWorkflow(ctx, startOnce(id), workflows.MountWorkflowName, in)
			var already *serviceerror.WorkflowExecutionAlreadyStarted
			if errors.As(err, &already) {
				return fmt.Errorf("%s is already mounted (workflow %s): diskferry mount status %s shows its URIs, diskferry unmount %s ends it",
					mountSubject(in), id, id, id)
			}
			if err != nil {
				return fmt.Errorf("start mount %s: %w", id, err)
			}
			info, err := waitMounted(ctx, c, run, timeout)
			if err != nil {
				return err
			}
			return renderMount(cmd.OutOrStdout(), id, run.GetRunID(), info, asJSON)
		}),
	}
	f := cmd.Flags()
	f.StringVar(&in.Point, "point", "", "restore point ID (diskferry points list)")
	f.StringVar(&in.VM, "vm", "", "mount the latest complete point of this VM")
	f.Int32SliceVar(&in.Disks, "disk", nil, "the point's disk key to serve (repeatable; default every disk)")
	f.DurationVar(&ttl, "ttl", workflows.DefaultMountTTL, "end the mount after this long (at most "+workflows.MaxMountTTL.String()+")")
	f.StringVar(&in.Site, "site", "", "also serve the exports on this site's SNA, through its tunnel")
	f.DurationVar(&timeout, "timeout", defaultMountWait, "how long to wait for the exports to serve")
	f.BoolVar(&asJSON, "json", false, "print JSON for scripts")
	cmd.AddCommand(newMountStatusCommand(), newMountListCommand())
	return cmd
}

// validateMount checks the flags, naming the one at fault, and puts the TTL into in.
func validateMount(in *workflows.MountInput, ttl, timeout time.Duration) error {
	if in.Point != "" && in.VM != "" {
		return errors.New("give --point or --vm, not both")
	}
	if in.Point == "" && in.VM == "" {
		return errors.New("--point or --vm is required: the point to mount, or the VM whose latest complete point to mount")
	}
	if err := validateDisks(in.Disks); err != nil {
		return err
	}
	if ttl < time.Second || ttl > workflows.MaxMountTTL {
		return fmt.Errorf("--ttl %s is outside 1s..%s", ttl, workflows.MaxMountTTL)
	}
	if timeout <= 0 {
		return fmt.Errorf("--timeout %s must be positive", timeout)
	}
	in.TTLSeconds = int(ttl / time.Second)
	return nil
}

// mountID is the workflow ID of a mount: its point's, or for "the latest point of VM" the
// VM's with "-latest" (the CLI does not resolve the point).
func mountID(in workflows.MountInput) string {
	if in.Point != "" {
		return workflows.MountWorkflowID(in.Point)
	}
	return workflows.MountWorkflowID(in.VM + "-latest")
}

func mountSubject(in workflows.MountInput) string {
	if in.Point != "" {
		return "point " + in.Point
	}
	return "the latest point of " + in.VM
}

// mountIDOf takes a point or a mount's workflow ID.
func mountIDOf(arg string) string {
	if strings.HasPrefix(arg, workflows.MountWorkflowID("")) {
		return arg
	}
	return workflows.MountWorkflowID(arg)
}

func queryMount(ctx context.Context, c client.Client, id, runID string) (workflows.MountInfo, error) {
	var info workflows.MountInfo
	v, err := c.QueryWorkflow(ctx, id, runID, workflows.MountQueryName)
	if err != nil {
		return info, fmt.Errorf("query mount %s: %w", id, err)
	}
	if err := v.Get(&info); err != nil {
		return info, fmt.Errorf("decode mount %s: %w", id, err)
	}
	return info, nil
}

// waitMounted asks the mount query until it says mounted or failed, the run closes, or
// timeout runs out.
func waitMounted(ctx context.Context, c client.Client, run client.WorkflowRun, timeout time.Duration) (workflows.MountInfo, error) {
	id := run.GetID()
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	done := make(chan error, 1)
	var final workflows.MountInfo
	go func() { done <- run.Get(wctx, &final) }()
	tick := time.NewTicker(mountPoll)
	defer tick.Stop()
	// Until the first workflow task registered the query, it fails; its last error says why.
	status, queryErr := "", error(nil)
	for {
		info, err := queryMount(wctx, c, id, run.GetRunID())
		switch {
		case err != nil:
			if status == "" {
				queryErr = err
			}
		case info.Status == workflows.MountMounted:
			return info, nil
		case info.Status == workflows.MountFailed:
			return info, fmt.Errorf("mount %s failed: %s", id, orValue(info.Error, "no reason given"))
		default:
			status, queryErr = orValue(info.Status, "unset"), nil
		}
		select {
		case err := <-done:
			if !waitExpired(wctx, err) {
				if err != nil {
					return final, runFailure("mount", id, err)
				}
				return final, fmt.Errorf("mount %s ended (%s) before it served: %s", id, orDash(final.Ended), orDash(final.Error))
			}
		case <-tick.C:
			continue
		case <-wctx.Done():
		}
		if ctx.Err() != nil {
			return final, fmt.Errorf("stopped waiting for mount %s; it goes on (diskferry mount status %s): %w", id, id, ctx.Err())
		}
		msg := fmt.Sprintf("mount %s does not serve after %s (--timeout): status %s", id, timeout, status)
		if status == "" {
			msg = fmt.Sprintf("mount %s does not serve after %s (--timeout): it has not answered yet (%v)", id, timeout, queryErr)
		}
		dctx, dcancel := context.WithTimeout(ctx, catalogTimeout)
		defer dcancel()
		return final, fmt.Errorf("%s; %s; it goes on: diskferry unmount %s ends it", msg, pendingSteps(dctx, c, id), id)
	}
}

// waitExpired reports whether a wait bounded by wctx ended on its bound: wctx's deadline
// passed, or the server answered DeadlineExceeded for it (gRPC can, just before wctx's own
// timer fires).
func waitExpired(wctx context.Context, err error) bool {
	var deadline *serviceerror.DeadlineExceeded
	return wctx.Err() != nil || errors.Is(err, context.DeadlineExceeded) || errors.As(err, &deadline)
}

// mountView is a mount as mount and mount status print it.
type mountView struct {
	WorkflowID string `json:"workflowId"`
	RunID      string `json:"runId,omitempty"`
	workflows.MountInfo
}

func renderMount(out io.Writer, id, runID string, info workflows.MountInfo, asJSON bool) error {
	if asJSON {
		return writeJSON(out, mountView{WorkflowID: id, RunID: runID, MountInfo: info})
	}
	printf(out, "point %s %s on hub %s (workflow %s)", orDash(info.PointID), info.Status, orDash(info.HubID), id)
	if !info.Expires.IsZero() {
		printf(out, " until %s", localTime(info.Expires))
	}
	fmt.Fprintln(out)
	if info.Ended != "" {
		printf(out, "ended: %s\n", info.Ended)
	}
	if info.Error != "" {
		printf(out, "error: %s\n", info.Error)
	}
	if len(info.Disks) == 0 {
		return nil
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	if info.Site != "" {
		printf(tw, "DISK\tURI (hub)\tURI (SNA of %s)\n", info.Site)
	} else {
		fmt.Fprintln(tw, "DISK\tURI (hub)")
	}
	for _, d := range info.Disks {
		if info.Site != "" {
			printf(tw, "%d\t%s\t%s\n", d.Key, d.URI, orDash(d.SiteURI))
		} else {
			printf(tw, "%d\t%s\n", d.Key, d.URI)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if info.Status == workflows.MountMounted {
		printf(out, "read-only; look with: nbdinfo 'URI', or guestfish --ro -a 'URI' where installed\nend it with: diskferry unmount %s\n", id)
	}
	return nil
}

func newMountStatusCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status POINT|WORKFLOW-ID",
		Short: "Show a mount: its status, URIs and expiry",
		Args:  cobra.ExactArgs(1),
		RunE: withTemporal(func(cmd *cobra.Command, args []string, c client.Client) error {
			id := mountIDOf(args[0])
			info, err := queryMount(cmd.Context(), c, id, "")
			if err != nil {
				return err
			}
			return renderMount(cmd.OutOrStdout(), id, "", info, asJSON)
		}),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

// mountRow is one mount in mount list.
type mountRow struct {
	runRow
	PointID string    `json:"pointId,omitempty"`
	Status  string    `json:"status,omitempty"` // from the mount query, for open mounts
	Expires time.Time `json:"expires,omitzero"`
	Disks   int       `json:"disks"`
}

func newMountListCommand() *cobra.Command {
	var all bool
	var limit int
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list [--all]",
		Short: "List open mounts (--all: ended ones too), newest first",
		Args:  cobra.NoArgs,
		RunE: withTemporal(func(cmd *cobra.Command, _ []string, c client.Client) error {
			ctx := cmd.Context()
			query := fmt.Sprintf("WorkflowType = %q", workflows.MountWorkflowName)
			if !all {
				query += ` AND ExecutionStatus = "Running"`
			}
			runs, err := listRuns(ctx, c, query, limit)
			if err != nil {
				return fmt.Errorf("list mounts: %w", err)
			}
			rows := make([]mountRow, len(runs))
			for i, r := range runs {
				rows[i].runRow = r.runRow
				if r.End.IsZero() {
					if info, err := queryMount(ctx, c, r.WorkflowID, r.RunID); err == nil {
						rows[i].PointID, rows[i].Status, rows[i].Expires, rows[i].Disks = info.PointID, info.Status, info.Expires, len(info.Disks)
					}
				}
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, rows)
			}
			return renderMountList(out, rows)
		}),
	}
	cmd.Flags().BoolVar(&all, "all", false, "ended mounts too")
	cmd.Flags().IntVar(&limit, "limit", 50, "at most this many rows")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func renderMountList(out io.Writer, rows []mountRow) error {
	if len(rows) == 0 {
		_, err := fmt.Fprintln(out, "no mounts")
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKFLOW ID\tPOINT\tSTATUS\tDISKS\tEXPIRES\tSTATE\tSTARTED")
	for _, r := range rows {
		expires := "-"
		if !r.Expires.IsZero() {
			expires = localTime(r.Expires)
		}
		printf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", r.WorkflowID, orDash(r.PointID), orDash(r.Status), r.Disks, expires, r.State, localTime(r.Start))
	}
	return tw.Flush()
}

func newUnmountCommand() *cobra.Command {
	var timeout time.Duration
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "unmount POINT|WORKFLOW-ID",
		Short: "End a mount: stop its exports and release its ports and forwards",
		Long: `Signal the mount to end and wait until it has stopped its exports and released its ports
(and the site's forwards), then say how it ended. Takes the point a mount was started with,
or the mount's workflow ID (mount-<point>, mount-<vm>-latest).`,
		Args: cobra.ExactArgs(1),
		PreRunE: func(*cobra.Command, []string) error {
			if timeout <= 0 {
				return fmt.Errorf("--timeout %s must be positive", timeout)
			}
			return nil
		},
		RunE: withTemporal(func(cmd *cobra.Command, args []string, c client.Client) error {
			ctx := cmd.Context()
			id := mountIDOf(args[0])
			err := c.SignalWorkflow(ctx, id, "", workflows.UnmountSignalName, nil)
			var notFound *serviceerror.NotFound
			if errors.As(err, &notFound) {
				return fmt.Errorf("no open mount %s (diskferry mount list shows the open mounts)", id)
			}
			if err != nil {
				return fmt.Errorf("signal unmount to %s: %w", id, err)
			}
			wctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			var info workflows.MountInfo
			err = c.GetWorkflow(wctx, id, "").Get(wctx, &info)
			if waitExpired(wctx, err) && ctx.Err() == nil {
				dctx, dcancel := context.WithTimeout(ctx, catalogTimeout)
				defer dcancel()
				return fmt.Errorf("mount %s has not ended %s after the unmount signal (--timeout); %s", id, timeout, pendingSteps(dctx, c, id))
			}
			if err != nil {
				return runFailure("mount", id, err)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, mountView{WorkflowID: id, MountInfo: info})
			}
			printf(out, "mount %s of point %s ended: %s\n", id, orDash(info.PointID), orDash(info.Ended))
			if info.Error != "" {
				printf(out, "error: %s\n", info.Error)
			}
			return nil
		}),
	}
	cmd.Flags().DurationVar(&timeout, "timeout", defaultMountWait, "how long to wait for the mount to end")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}
