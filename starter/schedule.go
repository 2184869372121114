package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/workflows"
)

func newScheduleCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "schedule", Short: "Run backups on Temporal Schedules (overlap: skip)"}
	cmd.AddCommand(newScheduleCreateCommand(), newScheduleListCommand(), newScheduleDescribeCommand(),
		newScheduleActionCommand("pause", "Pause a schedule", func(h client.ScheduleHandle, cmd *cobra.Command) error {
			return h.Pause(cmd.Context(), client.SchedulePauseOptions{Note: "paused with diskferry"})
		}),
		newScheduleActionCommand("unpause", "Resume a paused schedule", func(h client.ScheduleHandle, cmd *cobra.Command) error {
			return h.Unpause(cmd.Context(), client.ScheduleUnpauseOptions{Note: "unpaused with diskferry"})
		}),
		newScheduleTriggerCommand(),
		newScheduleActionCommand("delete", "Delete a schedule (running backups go on)", func(h client.ScheduleHandle, cmd *cobra.Command) error {
			return h.Delete(cmd.Context())
		}),
	)
	return cmd
}

// ScheduleID is the ID of a VM's backup schedule, unless the operator names it.
func scheduleID(vm string) string { return "backup-schedule-" + vm }

// backupSchedule builds the schedule of one VM's backups: one action per tick, a tick that
// finds the previous backup still running is skipped.
func backupSchedule(id string, in workflows.BackupInput, cron []string, every time.Duration, paused bool) (client.ScheduleOptions, error) {
	if err := in.Validate(); err != nil {
		return client.ScheduleOptions{}, err
	}
	if (len(cron) == 0) == (every == 0) {
		return client.ScheduleOptions{}, errors.New("schedule: give exactly one of --cron or --every")
	}
	if every < 0 {
		return client.ScheduleOptions{}, fmt.Errorf("schedule: --every %s is negative", every)
	}
	spec := client.ScheduleSpec{CronExpressions: cron}
	if every > 0 {
		spec.Intervals = []client.ScheduleIntervalSpec{{Every: every}}
	}
	attrs := temporal.NewSearchAttributes(workflows.VMNameKey.ValueSet(in.VM), workflows.SiteKey.ValueSet(in.Site))
	return client.ScheduleOptions{
		ID:      id,
		Spec:    spec,
		Overlap: enumspb.SCHEDULE_OVERLAP_POLICY_SKIP,
		Paused:  paused,
		Note:    fmt.Sprintf("diskferry backups of %s at site %s", in.VM, in.Site),
		Action: &client.ScheduleWorkflowAction{
			ID:                    workflows.BackupWorkflowID(in.VM),
			Workflow:              workflows.BackupWorkflowName,
			Args:                  []any{in},
			TaskQueue:             activities.HubQueue,
			TypedSearchAttributes: attrs,
		},
		TypedSearchAttributes: attrs,
	}, nil
}

func newScheduleCreateCommand() *cobra.Command {
	var in workflows.BackupInput
	var id string
	var cron []string
	var every time.Duration
	var paused bool
	var policy *policyFlags
	cmd := &cobra.Command{
		Use:   "create --vm VM --site SITE (--cron EXPR | --every DURATION) [retention flags]",
		Short: "Create a backup schedule for one VM",
		Long: `Create a backup schedule for one VM. The retention flags (--keep-last, --daily, --weekly,
--monthly, --yearly, --max-chain; see diskferry retention) store the schedule's default
retention policy in the catalog (DISKFERRY_DB_DSN or DISKFERRY_DB_DSN_FILE): it applies to
the VM unless the VM has a policy of its own.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if id == "" {
				id = scheduleID(in.VM)
			}
			opts, err := backupSchedule(id, in, cron, every, paused)
			if err != nil {
				return err
			}
			// The catalog is checked before the schedule exists, so a policy that cannot be
			// stored does not leave a schedule behind without it.
			var store *catalog.Store
			if policy.given() {
				if err := policy.validate(); err != nil {
					return err
				}
				ctx, cancel := context.WithTimeout(cmd.Context(), catalogTimeout)
				defer cancel()
				if store, err = openCatalog(ctx, cmd); err != nil {
					return err
				}
				defer store.Close()
			}
			c, err := dialTemporal(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			if _, err := c.ScheduleClient().Create(cmd.Context(), opts); err != nil {
				return fmt.Errorf("create schedule %s: %w", id, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created schedule %s\n", id)
			if store == nil {
				return nil
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), catalogTimeout)
			defer cancel()
			if err := store.SetSchedulePolicy(ctx, id, policy.policy); err != nil {
				return fmt.Errorf("schedule %s was created, but its retention policy was not stored (set it with diskferry retention set --schedule %s): %w", id, id, err)
			}
			printf(cmd.OutOrStdout(), "default retention of schedule %s: %s\n", id, describePolicy(policy.policy))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&id, "id", "", "schedule ID (default backup-schedule-<vm>)")
	f.StringVar(&in.VM, "vm", "", "VM inventory path, name or moref (required)")
	f.StringVar(&in.Site, "site", "", "source site (required)")
	f.StringVar(&in.Mode, "mode", "auto", "auto, full or incremental")
	f.BoolVar(&in.Quiesce, "quiesce", false, "quiesce the guest file systems")
	f.StringArrayVar(&cron, "cron", nil, `cron expression, e.g. "0 1 * * *" (repeatable)`)
	f.DurationVar(&every, "every", 0, "interval, e.g. 24h")
	f.BoolVar(&paused, "paused", false, "create the schedule paused")
	policy = addPolicyFlags(f)
	_ = cmd.MarkFlagRequired("vm")
	_ = cmd.MarkFlagRequired("site")
	return cmd
}

func newScheduleListCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List schedules",
		Args:  cobra.NoArgs,
		RunE: withTemporal(func(cmd *cobra.Command, _ []string, c client.Client) error {
			it, err := c.ScheduleClient().List(cmd.Context(), client.ScheduleListOptions{PageSize: 100})
			if err != nil {
				return fmt.Errorf("list schedules: %w", err)
			}
			type row struct {
				ID     string      `json:"id"`
				Paused bool        `json:"paused"`
				Next   []time.Time `json:"next"`
				Note   string      `json:"note"`
			}
			var rows []row
			for it.HasNext() {
				e, err := it.Next()
				if err != nil {
					return fmt.Errorf("list schedules: %w", err)
				}
				rows = append(rows, row{ID: e.ID, Paused: e.Paused, Next: e.NextActionTimes, Note: e.Note})
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, rows)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tPAUSED\tNEXT\tNOTE")
			for _, r := range rows {
				next := "-"
				if len(r.Next) > 0 {
					next = r.Next[0].Local().Format(time.DateTime)
				}
				fmt.Fprintf(tw, "%s\t%t\t%s\t%s\n", r.ID, r.Paused, next, r.Note)
			}
			return tw.Flush()
		}),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func newScheduleDescribeCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "describe SCHEDULE-ID",
		Short: "Show a schedule: spec, state, recent and next runs",
		Args:  cobra.ExactArgs(1),
		RunE: withTemporal(func(cmd *cobra.Command, args []string, c client.Client) error {
			d, err := c.ScheduleClient().GetHandle(cmd.Context(), args[0]).Describe(cmd.Context())
			if err != nil {
				return fmt.Errorf("describe schedule %s: %w", args[0], err)
			}
			type recent struct {
				WorkflowID string    `json:"workflowId"`
				At         time.Time `json:"at"`
			}
			view := struct {
				ID       string      `json:"id"`
				Paused   bool        `json:"paused"`
				Note     string      `json:"note"`
				Cron     []string    `json:"cron,omitempty"`
				Every    []string    `json:"every,omitempty"`
				Next     []time.Time `json:"next"`
				Recent   []recent    `json:"recent"`
				Actions  int         `json:"actions"`
				Overlaps int         `json:"skippedOverlaps"`
			}{ID: args[0], Paused: d.Schedule.State.Paused, Note: d.Schedule.State.Note,
				Next: d.Info.NextActionTimes, Actions: d.Info.NumActions, Overlaps: d.Info.NumActionsSkippedOverlap}
			view.Cron = append(view.Cron, d.Schedule.Spec.CronExpressions...)
			for _, iv := range d.Schedule.Spec.Intervals {
				view.Every = append(view.Every, iv.Every.String())
			}
			for _, r := range d.Info.RecentActions {
				if r.StartWorkflowResult != nil {
					view.Recent = append(view.Recent, recent{WorkflowID: r.StartWorkflowResult.WorkflowID, At: r.ActualTime})
				}
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, view)
			}
			fmt.Fprintf(out, "schedule %s: paused=%t actions=%d skipped-overlaps=%d\n", view.ID, view.Paused, view.Actions, view.Overlaps)
			if view.Note != "" {
				fmt.Fprintf(out, "note: %s\n", view.Note)
			}
			for _, e := range view.Every {
				fmt.Fprintf(out, "every %s\n", e)
			}
			for _, n := range view.Next {
				fmt.Fprintf(out, "next: %s\n", n.Local().Format(time.DateTime))
			}
			for _, r := range view.Recent {
				fmt.Fprintf(out, "ran: %s %s\n", r.At.Local().Format(time.DateTime), r.WorkflowID)
			}
			return nil
		}),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func newScheduleActionCommand(name, short string, act func(client.ScheduleHandle, *cobra.Command) error) *cobra.Command {
	return &cobra.Command{
		Use:   name + " SCHEDULE-ID",
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: withTemporal(func(cmd *cobra.Command, args []string, c client.Client) error {
			if err := act(c.ScheduleClient().GetHandle(cmd.Context(), args[0]), cmd); err != nil {
				return fmt.Errorf("%s schedule %s: %w", name, args[0], err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: done for %s\n", name, args[0])
			return nil
		}),
	}
}

// triggerOutcomeWait bounds how long trigger waits for the schedule to record what it did.
const triggerOutcomeWait = 30 * time.Second

func newScheduleTriggerCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "trigger SCHEDULE-ID",
		Short: "Start a backup now; skipped (exit status 1) while the schedule's previous backup runs",
		Args:  cobra.ExactArgs(1),
		RunE: withTemporal(func(cmd *cobra.Command, args []string, c client.Client) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), triggerOutcomeWait)
			defer cancel()
			h := c.ScheduleClient().GetHandle(ctx, args[0])
			started, err := triggerSchedule(ctx, h)
			if err != nil {
				return fmt.Errorf("trigger schedule %s: %w", args[0], err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "trigger: schedule %s started backup %s\n", args[0], started)
			return nil
		}),
	}
}

// errTriggerSkipped says the overlap policy skipped a trigger.
var errTriggerSkipped = errors.New("skipped")

// triggerSchedule triggers one action with overlap policy skip and waits until the schedule
// counts it as taken or skipped (the server takes a trigger asynchronously). It returns the
// ID of the backup it started.
func triggerSchedule(ctx context.Context, h client.ScheduleHandle) (string, error) {
	before, err := h.Describe(ctx)
	if err != nil {
		return "", err
	}
	if err := h.Trigger(ctx, client.ScheduleTriggerOptions{Overlap: enumspb.SCHEDULE_OVERLAP_POLICY_SKIP}); err != nil {
		return "", err
	}
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("the schedule recorded no start or skip of the trigger in %s (see schedule describe): %w", triggerOutcomeWait, ctx.Err())
		case <-tick.C:
		}
		now, err := h.Describe(ctx)
		if err != nil {
			return "", err
		}
		if now.Info.NumActionsSkippedOverlap > before.Info.NumActionsSkippedOverlap {
			var running []string
			for _, w := range now.Info.RunningWorkflows {
				running = append(running, w.WorkflowID)
			}
			return "", fmt.Errorf("%w: backup %s of this schedule is still running (overlap policy skip)", errTriggerSkipped, strings.Join(running, ", "))
		}
		if now.Info.NumActions > before.Info.NumActions {
			recent := now.Info.RecentActions
			if len(recent) > 0 && recent[len(recent)-1].StartWorkflowResult != nil {
				return recent[len(recent)-1].StartWorkflowResult.WorkflowID, nil
			}
			return "", errors.New("the schedule took the action but lists no started workflow")
		}
	}
}
