package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/spf13/cobra"

	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/config"
	"github.com/diskferry/diskferry/internal/repo"
)

func newPointsCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "points",
		Short: "List, show and delete restore points",
		Long: `List and show restore points as the hub's catalog records them (the workflow histories
behind them expire; the catalog does not). Needs the catalog's DSN: DISKFERRY_DB_DSN or
DISKFERRY_DB_DSN_FILE, the same settings as the hub. Deleting a point runs the VM's retention
workflow (Temporal), which merges the chain so no other point breaks.`,
	}
	cmd.AddCommand(newPointsListCommand(), newPointsShowCommand(), newPointsDeleteCommand())
	return cmd
}

func newPointsListCommand() *cobra.Command {
	var vm string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list [--vm VM]",
		Short: "List restore points, newest first",
		Args:  cobra.NoArgs,
		RunE: withCatalog(func(cmd *cobra.Command, _ []string, store *catalog.Store) error {
			points, err := store.FindPoints(cmd.Context(), vm)
			if err != nil {
				return err
			}
			rows := make([]pointSummary, len(points))
			for i, p := range points {
				rows[i] = summarize(p.Point, p.VM)
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), rows)
			}
			return renderPointList(cmd.OutOrStdout(), rows)
		}),
	}
	cmd.Flags().StringVar(&vm, "vm", "", "only the points of the VMs with this name or moref")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func newPointsShowCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "show POINT",
		Short: "Show a restore point: disks, chain, VM configuration, manifests",
		Long: `Show a restore point: its disks (qcow2 path, backing parent, changeId, digest, bytes),
the chain it needs from its full point on, the VM configuration kept for a restore into a
new VM, and whether each disk's block manifest is beside its target (checked only where
the targets are visible, on the hub).`,
		Args: cobra.ExactArgs(1),
		RunE: withCatalog(func(cmd *cobra.Command, args []string, store *catalog.Store) error {
			d, err := describePoint(cmd.Context(), store, args[0])
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), d)
			}
			return renderPoint(cmd.OutOrStdout(), d)
		}),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

// catalogTimeout bounds connecting to the catalog and each command's queries.
const catalogTimeout = 30 * time.Second

// withCatalog turns a command body that reads the catalog into a cobra RunE: it opens the
// catalog named by DISKFERRY_DB_DSN(_FILE) and checks its schema first.
func withCatalog(run func(cmd *cobra.Command, args []string, store *catalog.Store) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		return readCatalog(cmd, func(ctx context.Context, store *catalog.Store) error {
			cmd.SetContext(ctx)
			return run(cmd, args, store)
		})
	}
}

// readCatalog opens the catalog (openCatalog) and runs read with it, all within
// catalogTimeout.
func readCatalog(cmd *cobra.Command, read func(ctx context.Context, store *catalog.Store) error) error {
	ctx, cancel := context.WithTimeout(cmd.Context(), catalogTimeout)
	defer cancel()
	store, err := openCatalog(ctx, cmd)
	if err != nil {
		return err
	}
	defer store.Close()
	return read(ctx, store)
}

// openCatalog opens the catalog named by DISKFERRY_DB_DSN(_FILE) and checks its schema.
func openCatalog(ctx context.Context, cmd *cobra.Command) (*catalog.Store, error) {
	cfg, err := config.LoadCLI()
	if err != nil {
		return nil, err
	}
	if cfg.DBDSN == "" {
		return nil, errors.New("no catalog configured: set DISKFERRY_DB_DSN or DISKFERRY_DB_DSN_FILE to the hub's catalog DSN")
	}
	log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: cfg.LogLevel}))
	// catalog.Open names the server and database on failure, never the DSN's password.
	store, err := catalog.Open(ctx, cfg.DBDSN.Value(), log)
	if err != nil {
		return nil, fmt.Errorf("%w (check DISKFERRY_DB_DSN)", err)
	}
	if err := store.CheckSchema(ctx); err != nil {
		store.Close()
		return nil, err
	}
	return store, nil
}

// pointSummary is one line of points list, and the head of points show.
type pointSummary struct {
	ID            string     `json:"id"`
	VM            string     `json:"vm"`
	VMMoref       string     `json:"vmMoref"`
	VCenter       string     `json:"vcenterInstanceUuid"`
	Status        string     `json:"status"`
	Mode          string     `json:"mode"`
	ParentID      string     `json:"parentId,omitempty"`
	Site          string     `json:"site"`
	Hub           string     `json:"hub"`
	WorkflowID    string     `json:"workflowId"`
	StartedAt     time.Time  `json:"startedAt"`
	FinishedAt    *time.Time `json:"finishedAt,omitempty"` // absent while running
	DiskCount     int        `json:"diskCount"`
	CapacityBytes int64      `json:"capacityBytes"` // of the point's disks together
	BytesWritten  int64      `json:"bytesWritten"`
	// AllocatedBytes is what the point's files take on the hub (0 for points committed
	// before it was recorded, and for failed points, whose files are gone).
	AllocatedBytes int64 `json:"allocatedBytes"`
}

func summarize(p catalog.Point, vm catalog.VM) pointSummary {
	s := pointSummary{
		ID: p.ID, VM: vm.Name, VMMoref: vm.Moref, VCenter: vm.InstanceUUID, Status: p.Status, Mode: p.Mode,
		ParentID: p.ParentID, Site: p.Site, Hub: p.Hub, WorkflowID: p.WorkflowID, StartedAt: p.StartedAt,
		DiskCount: len(p.Disks), BytesWritten: p.BytesWritten,
	}
	if !p.FinishedAt.IsZero() {
		finished := p.FinishedAt
		s.FinishedAt = &finished
	}
	for _, d := range p.Disks {
		s.CapacityBytes += d.CapacityBytes
		s.AllocatedBytes += d.AllocatedBytes
	}
	return s
}

// pointDetail is what points show prints.
type pointDetail struct {
	pointSummary
	RunID     string        `json:"runId"`
	Error     string        `json:"error,omitempty"`
	BytesRead int64         `json:"bytesRead"`
	Disks     []diskDetail  `json:"disks"`
	Chain     []chainMember `json:"chain"` // from the full point to this one
	// VMConfig is the VM's shape at backup time; null: not captured (a point from before
	// diskferry kept it).
	VMConfig *catalog.VMConfig `json:"vmConfig"`
}

type diskDetail struct {
	Key           int32  `json:"key"`
	CapacityBytes int64  `json:"capacityBytes"`
	Path          string `json:"path"`
	ParentPath    string `json:"parentPath,omitempty"`
	Mode          string `json:"mode"`
	Reason        string `json:"reason,omitempty"`
	ChangeID      string `json:"changeId"`
	Digest        string `json:"digest"`
	BytesRead     int64  `json:"bytesRead"`
	BytesWritten  int64  `json:"bytesWritten"`
	BytesZeroed   int64  `json:"bytesZeroed"`
	Manifest      string `json:"manifest"`      // its block manifest's path
	ManifestState string `json:"manifestState"` // present|missing|unknown (the target is not on this host)
}

type chainMember struct {
	ID        string    `json:"id"`
	Mode      string    `json:"mode"`
	Status    string    `json:"status"`
	StartedAt time.Time `json:"startedAt"`
}

// Manifest states.
const (
	manifestPresent = "present"
	manifestMissing = "missing"
	manifestUnknown = "unknown"
)

func describePoint(ctx context.Context, store *catalog.Store, id string) (pointDetail, error) {
	p, err := store.GetPoint(ctx, id)
	if errors.Is(err, catalog.ErrNotFound) {
		return pointDetail{}, fmt.Errorf("restore point %q is not in the catalog (diskferry points list shows the points)", id)
	}
	if err != nil {
		return pointDetail{}, err
	}
	vm, err := store.GetVM(ctx, p.VMID)
	if err != nil {
		return pointDetail{}, fmt.Errorf("VM of point %s: %w", p.ID, err)
	}
	chain, err := store.ChainOf(ctx, p.ID)
	if err != nil {
		return pointDetail{}, err
	}
	d := pointDetail{pointSummary: summarize(p, vm), RunID: p.RunID, Error: p.Error, BytesRead: p.BytesRead,
		Disks: []diskDetail{}, VMConfig: p.VMConfig}
	for _, disk := range p.Disks {
		manifest := repo.ManifestPath(disk.Path)
		d.Disks = append(d.Disks, diskDetail{
			Key: disk.Key, CapacityBytes: disk.CapacityBytes, Path: disk.Path, ParentPath: disk.ParentPath,
			Mode: disk.Mode, Reason: disk.Reason, ChangeID: disk.ChangeID, Digest: disk.Digest,
			BytesRead: disk.BytesRead, BytesWritten: disk.BytesWritten, BytesZeroed: disk.BytesZeroed,
			Manifest: manifest, ManifestState: manifestState(disk.Path, manifest),
		})
	}
	for _, c := range chain {
		d.Chain = append(d.Chain, chainMember{ID: c.ID, Mode: c.Mode, Status: c.Status, StartedAt: c.StartedAt})
	}
	return d, nil
}

// manifestState says whether a target's manifest is beside it; where the target itself is
// not visible (the command runs off the hub) nothing can be told.
func manifestState(target, manifest string) string {
	if _, err := os.Stat(target); err != nil {
		return manifestUnknown
	}
	_, err := os.Stat(manifest)
	switch {
	case err == nil:
		return manifestPresent
	case errors.Is(err, fs.ErrNotExist):
		return manifestMissing
	}
	return manifestUnknown
}

func localTime(t time.Time) string { return t.Local().Format(time.DateTime) }

func finishedText(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return localTime(*t)
}

func renderPointList(out io.Writer, rows []pointSummary) error {
	if len(rows) == 0 {
		_, err := fmt.Fprintln(out, "no restore points")
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "POINT\tVM\tSTATUS\tMODE\tSTARTED\tFINISHED\tDISKS\tSIZE\tWRITTEN\tALLOCATED")
	type usage struct {
		name, moref string
		points      int
		bytes       int64
	}
	var vms []*usage
	byVM := map[string]*usage{}
	for _, r := range rows {
		printf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", r.ID, r.VM, r.Status, r.Mode,
			localTime(r.StartedAt), finishedText(r.FinishedAt), r.DiskCount, humanBytes(r.CapacityBytes), humanBytes(r.BytesWritten),
			humanBytes(r.AllocatedBytes))
		key := r.VCenter + "/" + r.VMMoref
		u, ok := byVM[key]
		if !ok {
			u = &usage{name: r.VM, moref: r.VMMoref}
			byVM[key] = u
			vms = append(vms, u)
		}
		u.points++
		u.bytes += r.AllocatedBytes
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(out, "\nAllocated per VM:")
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	var total int64
	for _, u := range vms {
		printf(tw, "  %s (%s)\t%s\tin %s\n", u.name, u.moref, humanBytes(u.bytes), countOf(u.points, "point"))
		total += u.bytes
	}
	if len(vms) > 1 {
		printf(tw, "  all VMs\t%s\tin %s\n", humanBytes(total), countOf(len(rows), "point"))
	}
	return tw.Flush()
}

func renderPoint(out io.Writer, d pointDetail) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	line := func(label, format string, args ...any) {
		printf(tw, "%s\t"+format+"\n", append([]any{label}, args...)...)
	}
	line("Point", "%s", d.ID)
	line("VM", "%s (%s, vCenter %s)", d.VM, d.VMMoref, d.VCenter)
	line("Status", "%s", d.Status)
	if d.ParentID != "" {
		line("Mode", "%s on %s", d.Mode, d.ParentID)
	} else {
		line("Mode", "%s", d.Mode)
	}
	if d.Error != "" {
		line("Error", "%s", d.Error)
	}
	line("Site, hub", "%s, %s", d.Site, d.Hub)
	line("Workflow", "%s (run %s)", d.WorkflowID, d.RunID)
	line("Started", "%s", localTime(d.StartedAt))
	line("Finished", "%s", finishedText(d.FinishedAt))
	line("Size", "%s in %d disks; read %s, written %s", humanBytes(d.CapacityBytes), d.DiskCount, humanBytes(d.BytesRead), humanBytes(d.BytesWritten))
	if err := tw.Flush(); err != nil {
		return err
	}

	fmt.Fprintln(out, "\nDisks:")
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  KEY\tCAPACITY\tMODE\tPATH\tPARENT\tCHANGEID\tDIGEST\tWRITTEN\tMANIFEST")
	for _, k := range d.Disks {
		printf(tw, "  %d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.Key, humanBytes(k.CapacityBytes), k.Mode, k.Path,
			orDash(k.ParentPath), orDash(k.ChangeID), orDash(k.Digest), humanBytes(k.BytesWritten), k.ManifestState)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, k := range d.Disks {
		if k.Reason != "" {
			printf(out, "  disk %d copied in full: %s\n", k.Key, k.Reason)
		}
	}

	fmt.Fprintln(out, "\nChain (full point first):")
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	for _, c := range d.Chain {
		printf(tw, "  %s\t%s\t%s\t%s\n", c.ID, c.Mode, c.Status, localTime(c.StartedAt))
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	return renderVMConfig(out, d.VMConfig)
}

func renderVMConfig(out io.Writer, c *catalog.VMConfig) error {
	if c == nil {
		_, err := fmt.Fprintln(out, "\nVM configuration: not captured (the point is older than diskferry's keeping it)")
		return err
	}
	printf(out, "\nVM configuration: %d CPUs (%d cores per socket), %d MiB memory, firmware %s, guest %s\n",
		c.NumCPUs, c.CoresPerSocket, c.MemoryMB, orDash(c.Firmware), orDash(c.GuestID))
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  DISK\tCAPACITY\tCONTROLLER\tBUS\tUNIT\tPROVISIONING")
	for _, d := range c.Disks {
		printf(tw, "  %d\t%s\t%s\t%d\t%d\t%s\n", d.Key, humanBytes(d.CapacityBytes), d.ControllerType, d.BusNumber, d.UnitNumber,
			orValue(d.Provisioning, "unknown"))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(c.NICs) == 0 {
		_, err := fmt.Fprintln(out, "  no network adapters")
		return err
	}
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  NIC\tADAPTER\tNETWORK\tKIND\tMAC\tMAC TYPE")
	for _, n := range c.NICs {
		printf(tw, "  %d\t%s\t%s\t%s\t%s\t%s\n", n.Key, n.AdapterType, orDash(n.Network), orDash(n.NetworkKind),
			orDash(n.MACAddress), orDash(n.AddressType))
	}
	return tw.Flush()
}

// printf is fmt.Fprintf with the control characters of string arguments (names and messages
// from vCenter, users and errors) shown as U+FFFD: they cannot break a table or drive the
// terminal.
func printf(w io.Writer, format string, args ...any) {
	for i, a := range args {
		if s, ok := a.(string); ok {
			args[i] = strings.Map(func(r rune) rune {
				if unicode.IsControl(r) {
					return unicode.ReplacementChar
				}
				return r
			}, s)
		}
	}
	fmt.Fprintf(w, format, args...)
}

// countOf is "1 point", "2 points".
func countOf(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

func orDash(s string) string { return orValue(s, "-") }

func orValue(s, fallback string) string {
	if strings.TrimSpace(s) == "" {
		return fallback
	}
	return s
}
