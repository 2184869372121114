package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/diskferry/diskferry/internal/catalog"
)

func newHubsCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "hubs",
		Short: "Show the hubs: liveness, space, export ports and who waits for them",
		Long: `Show the hubs as the catalog records them: when each hub worker was last seen, its
repository's space, its export port range, the ports leased (to which backup, restore or
mount, for which disk) and its line for ports: the jobs refused ports wait there first come,
first served, and a hub serves nobody behind a job it cannot yet serve. Needs the catalog's
DSN, as diskferry points does.`,
	}
	cmd.AddCommand(newHubsListCommand(), newHubsShowCommand())
	return cmd
}

// hubSummary is one line of hubs list, and the head of hubs show.
type hubSummary struct {
	ID string `json:"id"`
	// LastSeen is absent for a hub only named by points, leases or exports (its worker
	// never ran a version that records itself).
	LastSeen     *time.Time `json:"lastSeen,omitempty"`
	FreeBytes    int64      `json:"freeBytes"`
	UsedBytes    int64      `json:"usedBytes"`
	PendingBytes int64      `json:"pendingBytes"` // what its running backups may still write
	PortFirst    int        `json:"portFirst"`
	PortLast     int        `json:"portLast"`
	Leased       int        `json:"leased"`
	InLine       int        `json:"inLine"`
}

type hubDetail struct {
	hubSummary
	Leases []leaseRow  `json:"leases"`
	Line   []waiterRow `json:"line"`
}

type leaseRow struct {
	Port       int       `json:"port"`
	WorkflowID string    `json:"workflowId"`
	DiskKey    int32     `json:"diskKey"`
	LeasedAt   time.Time `json:"leasedAt"`
}

type waiterRow struct {
	WorkflowID string    `json:"workflowId"`
	Needed     int       `json:"needed"`
	Since      time.Time `json:"since"`
	SeenAt     time.Time `json:"seenAt"`
	// Silent: it has not asked within catalog.PortWaitStale, so it is passed over (its
	// place is kept) until it asks again.
	Silent bool `json:"silent"`
}

func newHubsListCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the hubs with their space, ports leased and jobs in line",
		Args:  cobra.NoArgs,
		RunE: withCatalog(func(cmd *cobra.Command, _ []string, store *catalog.Store) error {
			hubs, err := describeHubs(cmd.Context(), store, time.Now())
			if err != nil {
				return err
			}
			rows := make([]hubSummary, len(hubs))
			for i, h := range hubs {
				rows[i] = h.hubSummary
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), rows)
			}
			return renderHubList(cmd.OutOrStdout(), rows, time.Now())
		}),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func newHubsShowCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "show HUB",
		Short: "Show a hub: its space, every port lease and its line for ports",
		Args:  cobra.ExactArgs(1),
		RunE: withCatalog(func(cmd *cobra.Command, args []string, store *catalog.Store) error {
			hubs, err := describeHubs(cmd.Context(), store, time.Now())
			if err != nil {
				return err
			}
			i := slices.IndexFunc(hubs, func(h hubDetail) bool { return h.ID == args[0] })
			if i < 0 {
				return fmt.Errorf("hub %q is not in the catalog (diskferry hubs list shows the hubs)", args[0])
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), hubs[i])
			}
			return renderHub(cmd.OutOrStdout(), hubs[i], time.Now())
		}),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

// describeHubs reads every hub with its leases and line.
func describeHubs(ctx context.Context, store *catalog.Store, now time.Time) ([]hubDetail, error) {
	hubs, err := store.ListHubs(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]hubDetail, 0, len(hubs))
	for _, h := range hubs {
		rng := h.Ports
		if rng == (catalog.PortRange{}) {
			// Not recorded by its worker: the allocator falls back to the default range.
			rng = catalog.DefaultPortRange
		}
		ports, err := catalog.NewPorts(store, rng)
		if err != nil {
			return nil, fmt.Errorf("hub %s: %w", h.ID, err)
		}
		leases, err := ports.ListLeases(ctx, h.ID)
		if err != nil {
			return nil, err
		}
		line, err := ports.Line(ctx, h.ID)
		if err != nil {
			return nil, err
		}
		d := hubDetail{
			hubSummary: hubSummary{ID: h.ID, FreeBytes: h.FreeBytes, UsedBytes: h.UsedBytes, PendingBytes: h.PendingBytes,
				PortFirst: rng.First, PortLast: rng.Last, Leased: len(leases), InLine: len(line)},
			Leases: []leaseRow{}, Line: []waiterRow{},
		}
		if !h.LastSeen.IsZero() {
			seen := h.LastSeen
			d.LastSeen = &seen
		}
		for _, l := range leases {
			d.Leases = append(d.Leases, leaseRow{Port: l.Port, WorkflowID: l.WorkflowID, DiskKey: l.DiskKey, LeasedAt: l.LeasedAt})
		}
		for _, w := range line {
			d.Line = append(d.Line, waiterRow{WorkflowID: w.WorkflowID, Needed: w.Needed, Since: w.Since, SeenAt: w.SeenAt, Silent: w.Silent(now)})
		}
		out = append(out, d)
	}
	return out, nil
}

func seenText(seen *time.Time, now time.Time) string {
	if seen == nil {
		return "never"
	}
	return agoText(*seen, now)
}

func agoText(t, now time.Time) string {
	return now.Sub(t).Round(time.Second).String() + " ago"
}

func renderHubList(out io.Writer, rows []hubSummary, now time.Time) error {
	if len(rows) == 0 {
		_, err := fmt.Fprintln(out, "no hubs (a hub worker records itself when it starts)")
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HUB\tSEEN\tFREE\tUSED\tPENDING\tPORTS\tLEASED\tIN LINE")
	for _, r := range rows {
		printf(tw, "%s\t%s\t%s\t%s\t%s\t%d-%d\t%d/%d\t%d\n", r.ID, seenText(r.LastSeen, now), humanBytes(r.FreeBytes),
			humanBytes(r.UsedBytes), humanBytes(r.PendingBytes), r.PortFirst, r.PortLast, r.Leased, r.PortLast-r.PortFirst+1, r.InLine)
	}
	return tw.Flush()
}

func renderHub(out io.Writer, h hubDetail, now time.Time) error {
	printf(out, "hub:     %s\n", h.ID)
	printf(out, "seen:    %s\n", seenText(h.LastSeen, now))
	printf(out, "space:   %s free, %s used, up to %s still to be written by running backups\n",
		humanBytes(h.FreeBytes), humanBytes(h.UsedBytes), humanBytes(h.PendingBytes))
	printf(out, "ports:   %d-%d, %d of %d leased, %d %s in line\n", h.PortFirst, h.PortLast, h.Leased,
		h.PortLast-h.PortFirst+1, h.InLine, plural(h.InLine, "job", "jobs"))
	if len(h.Leases) > 0 {
		fmt.Fprintln(out)
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PORT\tWORKFLOW\tDISK\tLEASED")
		for _, l := range h.Leases {
			printf(tw, "%d\t%s\t%d\t%s\n", l.Port, l.WorkflowID, l.DiskKey, agoText(l.LeasedAt, now))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(h.Line) > 0 {
		fmt.Fprintln(out)
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PLACE\tWORKFLOW\tNEEDS\tWAITING\tLAST ASKED")
		for i, w := range h.Line {
			asked := agoText(w.SeenAt, now)
			if w.Silent {
				asked += " (silent: passed over until it asks again)"
			}
			printf(tw, "%d\t%s\t%d %s\t%s\t%s\n", i+1, w.WorkflowID, w.Needed, plural(w.Needed, "port", "ports"), now.Sub(w.Since).Round(time.Second), asked)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
