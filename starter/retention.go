package main

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/retention"
)

func newRetentionCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "retention",
		Short: "Set and show which restore points each VM keeps",
		Long: `A retention policy says which complete restore points of a VM are kept: the newest N
(--keep-last), plus the newest point of each of the last N days, ISO weeks, months and years
that have points (--daily, --weekly, --monthly, --yearly; UTC), and a bound on the chain a
restore reads through (--max-chain K: at most K incrementals on a full, so no restore reads
more than K+1 files). The newest point is always kept. A VM's own policy wins over the
default of the schedule that backs it up; without either, every point is kept. Policies
live in the catalog: DISKFERRY_DB_DSN or DISKFERRY_DB_DSN_FILE, as for points.

Retention runs after every backup (BackupWorkflow starts it) and on demand (apply). One
retention at a time per VM (workflow retention-<vm>); it does not run while a backup, restore
or mount of the VM's chain runs (it is skipped, and the next backup's run does it).`,
	}
	cmd.AddCommand(newRetentionSetCommand(), newRetentionShowCommand(), newRetentionApplyCommand())
	return cmd
}

// policyFlags are the retention policy's flags, shared by retention set and schedule create.
type policyFlags struct {
	flags  *pflag.FlagSet
	policy retention.Policy
}

var policyFlagNames = []string{"keep-last", "daily", "weekly", "monthly", "yearly", "max-chain"}

func addPolicyFlags(f *pflag.FlagSet) *policyFlags {
	p := &policyFlags{flags: f}
	f.IntVar(&p.policy.KeepLast, "keep-last", 0, "keep the newest N points")
	f.IntVar(&p.policy.Daily, "daily", 0, "keep the newest point of each of the last N days with points (UTC)")
	f.IntVar(&p.policy.Weekly, "weekly", 0, "keep the newest point of each of the last N ISO weeks with points")
	f.IntVar(&p.policy.Monthly, "monthly", 0, "keep the newest point of each of the last N months with points")
	f.IntVar(&p.policy.Yearly, "yearly", 0, "keep the newest point of each of the last N years with points")
	f.IntVar(&p.policy.MaxChain, "max-chain", 0, "at most K incrementals on a full: no restore reads more than K+1 files (0: unbounded)")
	return p
}

// given says whether any policy flag is on the command line.
func (p *policyFlags) given() bool {
	for _, name := range policyFlagNames {
		if p.flags.Changed(name) {
			return true
		}
	}
	return false
}

// validate checks the policy, naming each flag out of bounds.
func (p *policyFlags) validate() error {
	if err := p.policy.Validate(); err != nil {
		return fmt.Errorf("retention policy: %w", err)
	}
	return nil
}

// describePolicy is a policy in words, e.g. "keep last 3, daily 7, chain of at most 3 files".
func describePolicy(p retention.Policy) string {
	var parts []string
	for _, f := range []struct {
		n    int
		name string
	}{{p.KeepLast, "keep last"}, {p.Daily, "daily"}, {p.Weekly, "weekly"}, {p.Monthly, "monthly"}, {p.Yearly, "yearly"}} {
		if f.n > 0 {
			parts = append(parts, f.name+" "+strconv.Itoa(f.n))
		}
	}
	if len(parts) == 0 {
		parts = append(parts, "keep every point")
	}
	if p.MaxChain > 0 {
		parts = append(parts, fmt.Sprintf("chain of at most %d files", p.MaxChain+1))
	}
	return strings.Join(parts, ", ")
}

func newRetentionSetCommand() *cobra.Command {
	var vm, schedule string
	var flags *policyFlags
	cmd := &cobra.Command{
		Use:   "set (--vm VM | --schedule SCHEDULE-ID) [--keep-last N] [--daily N] [--weekly N] [--monthly N] [--yearly N] [--max-chain K]",
		Short: "Set a VM's retention policy, or the default of a schedule's VMs",
		Long: `Set a VM's own retention policy (the VM is known to the catalog after its first backup), or
the default policy of the VMs a schedule backs up. The policy replaces the previous one
whole: a flag not given is 0 (unused). No count at all keeps every point. Retention applies
the policy after each backup and with diskferry retention apply.`,
		Args: cobra.NoArgs,
		RunE: withCatalog(func(cmd *cobra.Command, _ []string, store *catalog.Store) error {
			if (vm == "") == (schedule == "") {
				return errors.New("retention set: give exactly one of --vm or --schedule")
			}
			if err := flags.validate(); err != nil {
				return err
			}
			ctx := cmd.Context()
			if schedule != "" {
				if err := store.SetSchedulePolicy(ctx, schedule, flags.policy); err != nil {
					return err
				}
				printf(cmd.OutOrStdout(), "default retention of schedule %s: %s\n", schedule, describePolicy(flags.policy))
				return nil
			}
			found, err := findCatalogVM(cmd, store, vm)
			if err != nil {
				return err
			}
			if err := store.SetVMPolicy(ctx, found.ID, flags.policy); err != nil {
				return err
			}
			printf(cmd.OutOrStdout(), "retention of VM %s (%s): %s\n", found.Name, found.Moref, describePolicy(flags.policy))
			return nil
		}),
	}
	cmd.Flags().StringVar(&vm, "vm", "", "the VM (name or moref) whose own policy is set")
	cmd.Flags().StringVar(&schedule, "schedule", "", "the schedule ID whose default policy is set")
	flags = addPolicyFlags(cmd.Flags())
	return cmd
}

// findCatalogVM finds the one VM of the catalog with the name or moref.
func findCatalogVM(cmd *cobra.Command, store *catalog.Store, name string) (catalog.VM, error) {
	vms, err := store.FindVMs(cmd.Context(), name)
	if err != nil {
		return catalog.VM{}, err
	}
	switch len(vms) {
	case 0:
		return catalog.VM{}, fmt.Errorf("no VM %q in the catalog (a VM is known after its first backup; a schedule's default policy covers it until then)", name)
	case 1:
		return vms[0], nil
	}
	named := make([]string, len(vms))
	for i, v := range vms {
		named[i] = fmt.Sprintf("%s %s of vCenter %s", v.Name, v.Moref, v.InstanceUUID)
	}
	return catalog.VM{}, fmt.Errorf("%q names %d VMs (%s); give the moref", name, len(vms), strings.Join(named, ", "))
}

// policyRow is one line of retention show.
type policyRow struct {
	Scope     string           `json:"scope"` // vm|schedule
	VM        string           `json:"vm,omitempty"`
	VMMoref   string           `json:"vmMoref,omitempty"`
	VCenter   string           `json:"vcenterInstanceUuid,omitempty"`
	Schedule  string           `json:"schedule,omitempty"`
	Policy    retention.Policy `json:"policy"`
	Summary   string           `json:"summary"`
	UpdatedAt time.Time        `json:"updatedAt"`
}

func newRetentionShowCommand() *cobra.Command {
	var vm string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "show [--vm VM] [--json]",
		Short: "Show the retention policies: VMs' own and schedules' defaults",
		Args:  cobra.NoArgs,
		RunE: withCatalog(func(cmd *cobra.Command, _ []string, store *catalog.Store) error {
			entries, err := store.ListPolicies(cmd.Context(), vm)
			if err != nil {
				return err
			}
			rows := make([]policyRow, 0, len(entries))
			for _, e := range entries {
				r := policyRow{Scope: "schedule", Schedule: e.ScheduleID, Policy: e.Policy, Summary: describePolicy(e.Policy), UpdatedAt: e.UpdatedAt}
				if e.VM != nil {
					r.Scope, r.VM, r.VMMoref, r.VCenter = "vm", e.VM.Name, e.VM.Moref, e.VM.InstanceUUID
				}
				rows = append(rows, r)
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), rows)
			}
			return renderPolicies(cmd.OutOrStdout(), rows, vm)
		}),
	}
	cmd.Flags().StringVar(&vm, "vm", "", "only the policy of the VMs with this name or moref")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func renderPolicies(out io.Writer, rows []policyRow, vm string) error {
	if len(rows) == 0 {
		if vm != "" {
			printf(out, "VM %s has no retention policy of its own: its schedule's default applies, else every point is kept\n", vm)
			return nil
		}
		_, err := fmt.Fprintln(out, "no retention policies: every point is kept")
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SCOPE\tNAME\tKEEP-LAST\tDAILY\tWEEKLY\tMONTHLY\tYEARLY\tMAX-CHAIN\tUPDATED")
	for _, r := range rows {
		name := r.Schedule
		if r.Scope == "vm" {
			name = r.VM + " (" + r.VMMoref + ")"
		}
		p := r.Policy
		printf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\n", r.Scope, name, p.KeepLast, p.Daily, p.Weekly, p.Monthly, p.Yearly,
			p.MaxChain, localTime(r.UpdatedAt))
	}
	return tw.Flush()
}
