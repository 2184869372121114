package main

import (
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/spf13/cobra"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/limits"
	"github.com/diskferry/diskferry/workflows"
)

func newRestoreCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "restore",
		Short: "Restore a point into a new VM, over its VM, or into a file; watch, list and cancel restores",
		Long: `Restore a restore point (--point, from diskferry points list) or the latest complete point of
a VM (--vm). Each restore is a RestoreWorkflow; one restore at a time per destination object
(new VM name, VM, output file): a second one into the same object is refused while the first runs.`,
	}
	cmd.AddCommand(newRestoreNewVMCommand(), newRestoreInPlaceCommand(), newRestoreFileCommand(),
		newRestoreStatusCommand(), newRestoreListCommand(),
		newCancelCommand("restore", "its cleanup removes a new VM, the exports and a partial file"))
	return cmd
}

// restoreFlags are the flags every restore command has.
type restoreFlags struct {
	in           workflows.RestoreInput
	wait, noWait bool
	asJSON       bool
	hasSite      bool // the destination writes into vCenter through a site's SNA
}

func (r *restoreFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&r.in.Point, "point", "", "restore point ID (diskferry points list)")
	f.StringVar(&r.in.VM, "vm", "", "restore the latest complete point of this VM (name or moref as the catalog knows it)")
	f.Int32SliceVar(&r.in.Disks, "disk", nil, "the point's disk key to restore (repeatable; default every disk)")
	if r.hasSite {
		f.StringVar(&r.in.Site, "site", "", "site whose SNA writes into vCenter (default the point's site)")
		f.IntVar(&r.in.Connections, "connections", 0, "NBD connections per disk (default 4)")
		f.StringVar(&r.in.Bandwidth, "bandwidth", "", "bandwidth the restore's disk writes share, e.g. 50Mbit, 1Gbit, 12.5MB/s (default: the site's limit only)")
	}
	f.BoolVar(&r.wait, "wait", true, "follow the restore with per-disk progress until it ends; the exit code tells the outcome")
	f.BoolVar(&r.noWait, "no-wait", false, "start the restore and return (same as --wait=false)")
	f.BoolVar(&r.asJSON, "json", false, "print JSON for scripts")
	cmd.MarkFlagsMutuallyExclusive("wait", "no-wait")
}

func newRestoreNewVMCommand() *cobra.Command {
	r := &restoreFlags{hasSite: true}
	r.in.Destination = activities.DestinationNewVM
	cmd := &cobra.Command{
		Use:   "new-vm --point P | --vm X [--name N] [placement flags]",
		Short: "Restore a point into a new VM of the source VM's shape, powered off unless --power-on",
		Long: `Create a new VM with the shape the source VM had at the point (CPUs, memory, firmware, guest OS,
disks, networks), write the point's disks into it, read them back and compare, and power it
on only with --power-on. Placement defaults to the source VM's.

The VM is named <vm>-restore-<point> unless --name is given. The workflow ID is
restore-new-vm-<name>; without --name it is restore-new-vm-<point>, or with --vm
restore-new-vm-<vm>-latest.`,
		Example: `  diskferry restore new-vm --point 20261201T225326.952Z-1403d1e8
  diskferry restore new-vm --vm web01 --name web01-test --datastore ds2 --power-on --json`,
		Args: cobra.NoArgs,
		RunE: r.run,
	}
	r.add(cmd)
	f := cmd.Flags()
	f.StringVar(&r.in.Name, "name", "", "the new VM's name (default <vm>-restore-<point>)")
	f.StringVar(&r.in.Folder, "folder", "", "VM folder inventory path (default the source VM's)")
	f.StringVar(&r.in.ResourcePool, "pool", "", "resource pool inventory path (default the source VM's)")
	f.StringVar(&r.in.Host, "host", "", "host inventory path (default the source VM's)")
	f.StringVar(&r.in.Datastore, "datastore", "", "datastore name (default the source VM's)")
	f.BoolVar(&r.in.PowerOn, "power-on", false, "power the VM on once restored and verified")
	return cmd
}

func newRestoreInPlaceCommand() *cobra.Command {
	r := &restoreFlags{hasSite: true}
	r.in.Destination = activities.DestinationInPlace
	cmd := &cobra.Command{
		Use:   "in-place --point P | --vm X [--disk K] [--power-off]",
		Short: "Overwrite the original VM's disks with a point (the VM must be powered off)",
		Long: `Write the point's disks over the disks of the VM it was taken from (found by vCenter instance
UUID and moref), read them back and compare. A powered-on VM is refused unless --power-off
lets the restore power it off first; it is not powered on again. The VM's next backup is full.

The workflow ID is restore-in-place-<vm> with --vm, restore-in-place-<point> with --point.`,
		Example: `  diskferry restore in-place --vm web01 --power-off
  diskferry restore in-place --point 20261201T225326.952Z-1403d1e8 --disk 2000`,
		Args: cobra.NoArgs,
		RunE: r.run,
	}
	r.add(cmd)
	cmd.Flags().BoolVar(&r.in.PowerOff, "power-off", false, "power the VM off first if it is on")
	return cmd
}

func newRestoreFileCommand() *cobra.Command {
	r := &restoreFlags{}
	r.in.Destination = activities.DestinationFile
	cmd := &cobra.Command{
		Use:   "file --point P | --vm X [--disk K] --format raw|qcow2|vmdk --output PATH",
		Short: "Write a point's disk to a file on the hub: raw, standalone qcow2 or streamOptimized vmdk",
		Long: `Write one disk of a point (or every disk) to a file on the hub and compare it with the point.
--output is an absolute path on the hub: the file for one disk, which must not exist, or an
existing directory for several (files named disk-<key>.<format>). The workflow ID is
restore-file-<output>.`,
		Example: `  diskferry restore file --point 20261201T225326.952Z-1403d1e8 --disk 2000 --format vmdk --output /srv/web01.vmdk`,
		Args:    cobra.NoArgs,
		RunE:    r.run,
	}
	r.add(cmd)
	f := cmd.Flags()
	f.StringVar(&r.in.Format, "format", "", "raw, qcow2 or vmdk (required)")
	f.StringVar(&r.in.Output, "output", "", "absolute path on the hub (required)")
	_ = cmd.MarkFlagRequired("format")
	_ = cmd.MarkFlagRequired("output")
	return cmd
}

// maxVMName is vSphere's limit on a VM's name, in characters.
const maxVMName = 80

var fileFormats = []string{activities.FormatRaw, activities.FormatQCOW2, activities.FormatVMDK}

// validateRestore checks what the CLI can tell without the catalog and names the flag; the
// workflow checks the rest (the point, its disks, the placement).
func validateRestore(in workflows.RestoreInput) error {
	if in.Point != "" && in.VM != "" {
		return errors.New("give --point or --vm, not both")
	}
	if in.Point == "" && in.VM == "" {
		return errors.New("--point or --vm is required: the point to restore, or the VM whose latest complete point to restore")
	}
	if err := validateDisks(in.Disks); err != nil {
		return err
	}
	if in.Connections < 0 || in.Connections > workflows.MaxConnections {
		return fmt.Errorf("--connections %d is outside 0..%d", in.Connections, workflows.MaxConnections)
	}
	if _, err := limits.ParseRate(in.Bandwidth); err != nil {
		return fmt.Errorf("--bandwidth: %w", err)
	}
	switch in.Destination {
	case activities.DestinationNewVM:
		if in.Name != "" {
			switch {
			case strings.TrimSpace(in.Name) != in.Name || strings.ContainsFunc(in.Name, unicode.IsControl):
				return fmt.Errorf("--name %q has leading or trailing spaces or control characters", in.Name)
			case utf8.RuneCountInString(in.Name) > maxVMName:
				return fmt.Errorf("--name is %d characters long; vSphere allows %d", utf8.RuneCountInString(in.Name), maxVMName)
			}
		}
	case activities.DestinationFile:
		if !slices.Contains(fileFormats, in.Format) {
			return fmt.Errorf("--format %q is not one of %s", in.Format, strings.Join(fileFormats, ", "))
		}
		if !path.IsAbs(in.Output) || path.Clean(in.Output) != in.Output {
			return fmt.Errorf("--output %q is not a clean absolute path on the hub", in.Output)
		}
	}
	return nil
}

func validateDisks(keys []int32) error {
	seen := make(map[int32]bool, len(keys))
	for _, k := range keys {
		if k <= 0 {
			return fmt.Errorf("--disk %d is not a disk key (diskferry points show lists a point's disks)", k)
		}
		if seen[k] {
			return fmt.Errorf("--disk %d is given twice", k)
		}
		seen[k] = true
	}
	return nil
}

// restoreTarget is the destination object in the restore's workflow ID: the new VM's name,
// the VM written in place, or the output file. A default name is computed by the workflow
// from the point, so without --name the point (or "<vm>-latest") stands for it.
func restoreTarget(in workflows.RestoreInput) string {
	pointRef := in.Point
	if pointRef == "" {
		pointRef = in.VM + "-latest"
	}
	switch in.Destination {
	case activities.DestinationFile:
		return in.Output
	case activities.DestinationInPlace:
		if in.VM != "" {
			return in.VM
		}
		return in.Point
	}
	if in.Name != "" {
		return in.Name
	}
	return pointRef
}

func (r *restoreFlags) run(cmd *cobra.Command, _ []string) error {
	if err := validateRestore(r.in); err != nil {
		return err
	}
	ctx := cmd.Context()
	c, err := dialTemporal(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	id := workflows.RestoreWorkflowID(r.in.Destination, restoreTarget(r.in))
	run, err := c.ExecuteWorkflow(ctx, startOnce(id), workflows.RestoreWorkflowName, r.in)
	var already *serviceerror.WorkflowExecutionAlreadyStarted
	if errors.As(err, &already) {
		return fmt.Errorf("a restore into %s %s is already running (workflow %s); watch it with: diskferry restore status %s",
			r.in.Destination, restoreTarget(r.in), id, id)
	}
	if err != nil {
		return fmt.Errorf("start restore %s: %w", id, err)
	}
	out := cmd.OutOrStdout()
	if r.noWait || !r.wait {
		if r.asJSON {
			return writeJSON(out, map[string]string{"workflowId": run.GetID(), "runId": run.GetRunID()})
		}
		fmt.Fprintf(out, "started restore %s (run %s); watch it with: diskferry restore status %s\n", run.GetID(), run.GetRunID(), run.GetID())
		return nil
	}
	return followRun(ctx, c, run, out, r.asJSON, "restore", printRestoreResult)
}

func printRestoreResult(out io.Writer, id string, r workflows.RestoreResult) {
	printf(out, "restore %s complete: point %s, %s", id, r.PointID, r.Destination)
	if r.VMName != "" {
		printf(out, " into VM %s (%s)", r.VMName, orDash(r.VMMoref))
	}
	printf(out, ", %s\n", r.Duration.Round(time.Millisecond))
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DISK\tINTO\tREAD\tWRITTEN\tTIME\tDIGEST")
	for _, d := range r.Disks {
		into := d.Output
		if into == "" {
			into = fmt.Sprintf("disk %d", d.VMKey)
		}
		printf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", d.PointKey, into, humanBytes(d.BytesRead), humanBytes(d.BytesWritten),
			d.Duration.Round(time.Millisecond), orDash(d.Digest))
	}
	_ = tw.Flush()
	for _, w := range r.Warnings {
		printf(out, "warning: %s\n", w)
	}
}

func newRestoreStatusCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status WORKFLOW-ID",
		Short: "Show a restore's state and per-disk progress",
		Args:  cobra.ExactArgs(1),
		RunE: withTemporal(func(cmd *cobra.Command, args []string, c client.Client) error {
			p, err := liveProgress(cmd.Context(), c, args[0], "")
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, p)
			}
			printf(out, "restore %s (%s) of %s: %s, %s\n", args[0], orDash(p.Mode), orDash(p.VM), p.Status, p.Step)
			if p.PointID != "" {
				printf(out, "point %s on hub %s, site %s\n", p.PointID, orDash(p.HubID), orDash(p.Site))
			}
			return renderProgressDetail(out, p)
		}),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

// restoreRow is one restore in restore list.
type restoreRow struct {
	runRow
	Destination string `json:"destination"`
	Target      string `json:"target"` // new VM name (or point), VM, or output file
}

// restoreDestinations are the destinations, for reading a restore's workflow ID back.
var restoreDestinations = []string{activities.DestinationNewVM, activities.DestinationInPlace, activities.DestinationFile}

// parseRestoreID splits a workflow ID made by RestoreWorkflowID.
func parseRestoreID(id string) (destination, target string) {
	for _, d := range restoreDestinations {
		if t, ok := strings.CutPrefix(id, workflows.RestoreWorkflowID(d, "")); ok {
			return d, t
		}
	}
	return "", ""
}

func newRestoreListCommand() *cobra.Command {
	var limit int
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List restores, newest first (from Temporal visibility)",
		Args:  cobra.NoArgs,
		RunE: withTemporal(func(cmd *cobra.Command, _ []string, c client.Client) error {
			runs, err := listRuns(cmd.Context(), c, fmt.Sprintf("WorkflowType = %q", workflows.RestoreWorkflowName), limit)
			if err != nil {
				return fmt.Errorf("list restores: %w", err)
			}
			rows := make([]restoreRow, len(runs))
			for i, r := range runs {
				rows[i].runRow = r.runRow
				rows[i].Destination, rows[i].Target = parseRestoreID(r.WorkflowID)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, rows)
			}
			return renderRestoreList(out, rows)
		}),
	}
	cmd.Flags().IntVar(&limit, "limit", 50, "at most this many rows")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func renderRestoreList(out io.Writer, rows []restoreRow) error {
	if len(rows) == 0 {
		_, err := fmt.Fprintln(out, "no restores")
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKFLOW ID\tDESTINATION\tTARGET\tSTATE\tSTARTED\tENDED")
	for _, r := range rows {
		ended := "-"
		if !r.End.IsZero() {
			ended = localTime(r.End)
		}
		printf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.WorkflowID, orDash(r.Destination), orDash(r.Target), r.State, localTime(r.Start), ended)
	}
	return tw.Flush()
}
