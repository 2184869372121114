package main

import (
	"bufio"
	"context"
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
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/workflows"
)

// Retention runs: on demand (retention apply), and the deletions an operator asks for
// (points delete, vm forget). Each is a RetentionWorkflow under the VM's retention ID.

func newRetentionApplyCommand() *cobra.Command {
	var in workflows.RetentionInput
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "apply --vm VM [--dry-run]",
		Short: "Apply the VM's retention policy now (or show what it would do)",
		Long: `Decide every point's fate by the VM's policy (or its schedule's default) and remove or merge
the points it does not keep, on the hub that holds the chain. --dry-run only shows the
decisions. Prints per point keep/drop, the reasons and its bytes, then the bytes freed.`,
		Example: `  diskferry retention apply --vm web01 --dry-run
  diskferry retention apply --vm web01 --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := validateRetention(in); err != nil {
				return err
			}
			return withTemporal(func(cmd *cobra.Command, _ []string, c client.Client) error {
				return runRetention(cmd.Context(), c, cmd.OutOrStdout(), in, asJSON)
			})(cmd, args)
		},
	}
	f := cmd.Flags()
	f.StringVar(&in.VM, "vm", "", "VM name or moref as the catalog knows it (required)")
	f.BoolVar(&in.DryRun, "dry-run", false, "only show what retention would do")
	f.BoolVar(&asJSON, "json", false, "print JSON for scripts")
	_ = cmd.MarkFlagRequired("vm")
	return cmd
}

func newPointsDeleteCommand() *cobra.Command {
	var yes, asJSON bool
	cmd := &cobra.Command{
		Use:   "delete POINT [--yes]",
		Short: "Delete a restore point (its chain is merged so no other point breaks)",
		Long: `Delete a restore point: its files are removed, or merged into the points that build on it, so
every other point stays restorable. The run also applies the VM's retention policy. Without
--yes the plan is shown first (a dry run) and must be confirmed. Needs the catalog
(DISKFERRY_DB_DSN) to find the point's VM, and Temporal.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var vm string
			err := readCatalog(cmd, func(ctx context.Context, store *catalog.Store) error {
				p, err := store.GetPoint(ctx, args[0])
				if errors.Is(err, catalog.ErrNotFound) {
					return fmt.Errorf("restore point %q is not in the catalog (diskferry points list shows the points)", args[0])
				}
				if err != nil {
					return err
				}
				v, err := store.GetVM(ctx, p.VMID)
				vm = v.Name
				return err
			})
			if err != nil {
				return err
			}
			in := workflows.RetentionInput{VM: vm, Delete: []string{args[0]}}
			return deleteWithConfirmation(cmd, in, yes, asJSON, fmt.Sprintf("Delete point %s of VM %s", args[0], vm))
		},
	}
	cmd.Flags().BoolVar(&yes, "yes", false, "do not ask for confirmation")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts (with --yes)")
	return cmd
}

func newVMCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "vm", Short: "Manage the VMs the catalog knows"}
	cmd.AddCommand(newVMForgetCommand())
	return cmd
}

func newVMForgetCommand() *cobra.Command {
	var yes, asJSON bool
	cmd := &cobra.Command{
		Use:   "forget VM [--yes]",
		Short: "Delete every restore point of a VM",
		Long: `Delete every complete restore point of a VM (name or moref): their files are removed from the
hub and the points from the catalog. The plan is shown first and must be confirmed, unless
--yes. A name several VMs share is refused: give the moref. Needs the catalog
(DISKFERRY_DB_DSN) and Temporal.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var in workflows.RetentionInput
			err := readCatalog(cmd, func(ctx context.Context, store *catalog.Store) error {
				points, err := store.FindPoints(ctx, args[0])
				if err != nil {
					return err
				}
				in, err = forgetInput(args[0], points)
				return err
			})
			if err != nil {
				return err
			}
			return deleteWithConfirmation(cmd, in, yes, asJSON,
				fmt.Sprintf("Delete all %d point(s) of VM %s", len(in.Delete), in.VM))
		},
	}
	cmd.Flags().BoolVar(&yes, "yes", false, "do not ask for confirmation")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts (with --yes)")
	return cmd
}

// forgetInput is the retention run that deletes every complete point of one VM.
func forgetInput(vm string, points []catalog.PointOfVM) (workflows.RetentionInput, error) {
	in := workflows.RetentionInput{}
	var morefs []string
	for _, p := range points {
		if !slices.Contains(morefs, p.VM.Moref) {
			morefs = append(morefs, p.VM.Moref)
		}
		in.VM = p.VM.Name
		if p.Status == catalog.StatusComplete {
			in.Delete = append(in.Delete, p.ID)
		}
	}
	switch {
	case len(morefs) > 1:
		return in, fmt.Errorf("%d VMs are named %s (morefs %s): give the moref of the one to forget", len(morefs), vm, strings.Join(morefs, ", "))
	case len(in.Delete) == 0:
		return in, fmt.Errorf("VM %s has no complete restore point in the catalog (diskferry points list --vm %s)", vm, vm)
	}
	return in, nil
}

// deleteWithConfirmation runs a retention that deletes points (found in the catalog before
// Temporal is dialled): without yes, a dry run shows the plan and the operator confirms it first.
func deleteWithConfirmation(cmd *cobra.Command, in workflows.RetentionInput, yes, asJSON bool, question string) error {
	if err := validateRetention(in); err != nil {
		return err
	}
	if asJSON && !yes {
		return errors.New("--json needs --yes: a confirmation cannot be asked for")
	}
	ctx, out := cmd.Context(), cmd.OutOrStdout()
	c, err := dialTemporal(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	if !yes {
		plan := in
		plan.DryRun = true
		if err := runRetention(ctx, c, out, plan, false); err != nil {
			return err
		}
		ok, err := confirm(cmd.InOrStdin(), out, question+"?")
		if err != nil {
			return err
		}
		if !ok {
			return errors.New("not confirmed; nothing deleted")
		}
	}
	return runRetention(ctx, c, out, in, asJSON)
}

// confirm asks a yes/no question; only "y" or "yes" confirms. No answer at all (end of input)
// is an error naming --yes.
func confirm(in io.Reader, out io.Writer, question string) (bool, error) {
	printf(out, "%s [y/N] ", question)
	answer, err := bufio.NewReader(in).ReadString('\n')
	if err != nil && (!errors.Is(err, io.EOF) || answer == "") {
		return false, errors.New("no answer to the confirmation (pass --yes to run without one)")
	}
	switch strings.ToLower(strings.TrimSpace(answer)) {
	case "y", "yes":
		return true, nil
	}
	return false, nil
}

// validateRetention checks what the CLI can tell before starting the run, with the
// workflow's own rules.
func validateRetention(in workflows.RetentionInput) error {
	var appErr *temporal.ApplicationError
	if err := in.Validate(); errors.As(err, &appErr) {
		return errors.New(appErr.Message())
	}
	return nil
}

// runRetention starts the VM's retention run, follows it and prints its outcome; a run that
// was skipped (the chain was busy) is an error after the outcome.
func runRetention(ctx context.Context, c client.Client, out io.Writer, in workflows.RetentionInput, asJSON bool) error {
	id := workflows.RetentionWorkflowID(in.VM)
	run, err := c.ExecuteWorkflow(ctx, startOnce(id), workflows.RetentionWorkflowName, in)
	var already *serviceerror.WorkflowExecutionAlreadyStarted
	if errors.As(err, &already) {
		return fmt.Errorf("a retention of VM %s is already running (workflow %s); try again when it ends", in.VM, id)
	}
	if err != nil {
		return fmt.Errorf("start retention %s: %w", id, err)
	}
	var outcome workflows.RetentionOutcome
	if err := followRun(ctx, c, run, out, asJSON, "retention", func(out io.Writer, _ string, o workflows.RetentionOutcome) {
		outcome = o
		printRetentionOutcome(out, o)
	}); err != nil {
		return err
	}
	// --json printed the outcome without showing it here.
	if asJSON {
		if err := run.Get(ctx, &outcome); err != nil {
			return err
		}
	}
	if outcome.Skipped != "" {
		return fmt.Errorf("retention of VM %s skipped, nothing changed: %s", in.VM, outcome.Skipped)
	}
	return nil
}

// printRetentionOutcome prints the plan per point and what applying it did.
func printRetentionOutcome(out io.Writer, o workflows.RetentionOutcome) {
	p := o.Plan
	printf(out, "retention of VM %s on hub %s: policy %s (from %s)\n", orDash(p.VMName), orDash(p.HubID),
		workflows.DescribePolicy(p.Policy), orDash(p.PolicySource))
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "POINT\tDECISION\tBYTES\tREASONS")
	var dropped, flattened int
	var dropBytes int64
	for _, d := range p.Points {
		decision := "keep"
		switch {
		case !d.Keep:
			decision = "drop"
			dropped++
			dropBytes += d.Bytes
		case d.Flatten:
			decision = "flatten"
			flattened++
		}
		printf(tw, "%s\t%s\t%s\t%s\n", d.PointID, decision, humanBytes(d.Bytes), strings.Join(d.Reasons, "; "))
	}
	_ = tw.Flush()
	switch {
	case o.Skipped != "":
		printf(out, "skipped: %s\n", o.Skipped)
	case o.DryRun:
		printf(out, "dry run: %d point(s) would be deleted (%s), %d flattened; nothing changed\n", dropped, humanBytes(dropBytes), flattened)
	case dropped+flattened == 0:
		printf(out, "nothing to delete or flatten\n")
	default:
		r := o.Result
		printf(out, "deleted %d point(s)%s, flattened %d%s: %s freed in %s\n", len(r.Deleted), listed(r.Deleted),
			len(r.Flattened), listed(r.Flattened), humanBytes(r.BytesFreed), o.Duration.Round(time.Millisecond))
	}
}

// listed is " (a, b)" for a non-empty list.
func listed(ids []string) string {
	if len(ids) == 0 {
		return ""
	}
	return " (" + strings.Join(ids, ", ") + ")"
}
