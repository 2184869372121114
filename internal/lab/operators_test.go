package lab_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.temporal.io/api/workflowservice/v1"

	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/workflows"
)

// run runs a command with the lab's Temporal address and returns its stdout.
func run(ctx context.Context, t *testing.T, l *lab.Lab, bin string, args ...string) string {
	t.Helper()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(),
		"DISKFERRY_TEMPORAL_ADDRESS="+l.Temporal.HostPort, "DISKFERRY_TEMPORAL_NAMESPACE="+l.Temporal.Namespace,
		"DISKFERRY_DB_DSN="+l.DB.DSN, "DISKFERRY_DB_DSN_FILE=")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "%s %v\nstdout: %s\nstderr: %s\nhub log:\n%s\nsna log:\n%s",
		filepath.Base(bin), args, out, stderr.String(), tail(l.WorkerLog("hub")), tail(l.WorkerLog("sna")))
	return string(out)
}

// TestTemporalCLIStartsAndFindsBackup drives the real temporal binary the way the README
// documents: start a BackupWorkflow with plain JSON input, find it by its VMName search
// attribute, and create a schedule for it.
func TestTemporalCLIStartsAndFindsBackup(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 1, DiskSize: 16 << 20})
	temporal := testenv.ToolPath(t, "temporal")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	addr := "--address=" + l.Temporal.HostPort

	input := fmt.Sprintf(`{"vm":%q,"site":%q}`, l.VC.VMName, l.Site)
	run(ctx, t, l, temporal, "workflow", "start", addr, "--task-queue", "diskferry-hub", "--type", "BackupWorkflow",
		"--workflow-id", "cli-backup-1", "--input", input)
	out := run(ctx, t, l, temporal, "workflow", "result", addr, "--workflow-id", "cli-backup-1", "--output", "json")
	require.Contains(t, out, `"pointId"`)
	require.Contains(t, out, "COMPLETED")

	out = run(ctx, t, l, temporal, "workflow", "query", addr, "--workflow-id", "cli-backup-1", "--type", "progress", "--output", "json")
	require.Contains(t, out, `"status": "complete"`, "the progress query as docs/operations.md shows it")

	out = run(ctx, t, l, temporal, "workflow", "list", addr, "--query", fmt.Sprintf(`VMName=%q`, l.VC.VMName), "--output", "json")
	require.Contains(t, out, "cli-backup-1")
	out = run(ctx, t, l, temporal, "workflow", "list", addr, "--query", `VMName="no-such-vm"`, "--output", "json")
	require.NotContains(t, out, "cli-backup-1")

	run(ctx, t, l, temporal, "schedule", "create", addr, "--schedule-id", "nightly-"+l.VC.VMName,
		"--cron", "0 1 * * *", "--overlap-policy", "Skip", "--task-queue", "diskferry-hub",
		"--type", "BackupWorkflow", "--workflow-id", "backup-"+l.VC.VMName, "--input", input)
	out = run(ctx, t, l, temporal, "schedule", "describe", addr, "--schedule-id", "nightly-"+l.VC.VMName, "--output", "json")
	require.Contains(t, out, "SCHEDULE_OVERLAP_POLICY_SKIP")
	run(ctx, t, l, temporal, "schedule", "delete", addr, "--schedule-id", "nightly-"+l.VC.VMName)
}

// TestDiskferryCLI drives the diskferry binary: a waited backup with its JSON result, the
// refusal of a second concurrent backup, list and status, and the schedule commands.
func TestDiskferryCLI(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 2, DiskSize: 16 << 20})
	cli := lab.Build(t, t.TempDir(), "./starter", "diskferry")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	out := run(ctx, t, l, cli, "backup", "start", "--vm", l.VC.VMName, "--site", l.Site, "--wait", "--json")
	var res workflows.BackupResult
	require.NoError(t, json.Unmarshal([]byte(out), &res), out)
	require.NotEmpty(t, res.PointID)
	require.Len(t, res.Disks, 2)

	out = run(ctx, t, l, cli, "backup", "list", "--vm", l.VC.VMName, "--json")
	require.Contains(t, out, workflows.BackupWorkflowID(l.VC.VMName))
	require.Contains(t, out, `"status": "complete"`)
	out = run(ctx, t, l, cli, "backup", "status", workflows.BackupWorkflowID(l.VC.VMName))
	require.Contains(t, out, ": complete, complete\n", "status and current step of a finished backup")
	require.Contains(t, out, res.PointID)

	// The catalog's view of the point: the VM's shape as vcsim holds it, a manifest beside
	// each target (the hub's repository is on this host).
	out = run(ctx, t, l, cli, "points", "show", res.PointID, "--json")
	var shown struct {
		Status string `json:"status"`
		Disks  []struct {
			ManifestState string `json:"manifestState"`
		} `json:"disks"`
		VMConfig *struct {
			NumCPUs  int32  `json:"numCpus"`
			MemoryMB int32  `json:"memoryMb"`
			GuestID  string `json:"guestId"`
			Disks    []struct {
				ControllerType string `json:"controllerType"`
			} `json:"disks"`
		} `json:"vmConfig"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &shown), out)
	require.Equal(t, "complete", shown.Status)
	require.Len(t, shown.Disks, 2)
	for _, d := range shown.Disks {
		require.Equal(t, "present", d.ManifestState)
	}
	require.NotNil(t, shown.VMConfig, "the VM configuration is captured")
	require.Equal(t, int32(1), shown.VMConfig.NumCPUs)
	require.Equal(t, int32(256), shown.VMConfig.MemoryMB)
	require.Equal(t, "otherLinux64Guest", shown.VMConfig.GuestID)
	require.Len(t, shown.VMConfig.Disks, 2)
	require.Equal(t, "pvscsi", shown.VMConfig.Disks[0].ControllerType)
	require.Contains(t, run(ctx, t, l, cli, "points", "list", "--vm", l.VC.VMName), res.PointID)

	// A VM vCenter does not know fails at once with an error naming it and the step.
	missing := exec.CommandContext(ctx, cli, "backup", "start", "--vm", "no-such-vm", "--site", l.Site, "--wait")
	missing.Env = append(os.Environ(), "DISKFERRY_TEMPORAL_ADDRESS="+l.Temporal.HostPort)
	msg, err := missing.CombinedOutput()
	require.Error(t, err, "the exit code reports the failed backup")
	require.Contains(t, string(msg), `backup backup-no-such-vm failed in InspectVM: find VM "no-such-vm": not found`)

	// Bad input is refused before anything starts, naming the field.
	bad := exec.CommandContext(ctx, cli, "backup", "start", "--vm", l.VC.VMName, "--site", l.Site, "--mode", "sometimes")
	bad.Env = append(os.Environ(), "DISKFERRY_TEMPORAL_ADDRESS="+l.Temporal.HostPort)
	msg, err = bad.CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(msg), "mode")

	id := "sched-" + l.VC.VMName
	run(ctx, t, l, cli, "schedule", "create", "--id", id, "--vm", l.VC.VMName, "--site", l.Site, "--every", "24h", "--paused")
	out = run(ctx, t, l, cli, "schedule", "describe", id, "--json")
	require.Contains(t, out, `"paused": true`)
	run(ctx, t, l, cli, "schedule", "unpause", id)
	out = run(ctx, t, l, cli, "schedule", "describe", id, "--json")
	require.Contains(t, out, `"paused": false`)

	// With the SNA stopped the triggered backup cannot get past its first step, so a second
	// trigger finds it running and the overlap policy skips it.
	l.StopWorker("sna")
	out = run(ctx, t, l, cli, "schedule", "trigger", id)
	started, ok := strings.CutPrefix(strings.TrimSpace(out), "trigger: schedule "+id+" started backup ")
	require.True(t, ok, out)
	skip := exec.CommandContext(ctx, cli, "schedule", "trigger", id)
	skip.Env = append(os.Environ(), "DISKFERRY_TEMPORAL_ADDRESS="+l.Temporal.HostPort)
	msg, err = skip.CombinedOutput()
	require.Error(t, err, "a skipped trigger is not a success: %s", msg)
	require.Contains(t, string(msg), "trigger schedule "+id+": skipped: backup "+started+" of this schedule is still running")
	out = run(ctx, t, l, cli, "schedule", "describe", id, "--json")
	require.Contains(t, out, `"skippedOverlaps": 1`)
	require.Contains(t, out, started)
	// Meanwhile the status says what the backup waits for.
	waiting := "waiting for: the SNA of site " + l.Site + " to run InspectVM"
	require.Eventually(t, func() bool {
		return strings.Contains(run(ctx, t, l, cli, "backup", "status", started), waiting)
	}, time.Minute, 200*time.Millisecond, "backup status names the worker the backup waits for")

	// The triggered backup completes once the SNA is back; none is left running.
	l.StartWorker("sna")
	var scheduled workflows.BackupResult
	require.NoError(t, l.Temporal.Client.GetWorkflow(ctx, started, "").Get(ctx, &scheduled))
	require.NotEmpty(t, scheduled.PointID)
	out = run(ctx, t, l, cli, "schedule", "list")
	require.Contains(t, out, id)
	run(ctx, t, l, cli, "schedule", "delete", id)
	require.NotContains(t, run(ctx, t, l, cli, "schedule", "list"), id)
}

// TestWebUIShowsBackup loads the dev server's Web UI in headless Chromium and finds a
// backup by its VMName search attribute, while a backup of another VM stays out of that
// list; it leaves a screenshot for docs/.
func TestWebUIShowsBackup(t *testing.T) {
	chromium := testenv.RequireCommand(t, "chromium")
	uiPort := testenv.FreePort(t)
	l := startLab(t, lab.Options{Disks: 1, DiskSize: 16 << 20, UIPort: uiPort})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	in := workflows.BackupInput{VM: l.VC.VMName, Site: l.Site}
	wf, err := l.Temporal.Client.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
	require.NoError(t, err)
	require.NoError(t, wf.Get(ctx, nil))
	// A backup of a VM vCenter does not know: it fails, but carries its VMName too.
	otherIn := workflows.BackupInput{VM: "other-vm", Site: l.Site}
	other, err := l.Temporal.Client.ExecuteWorkflow(ctx, workflows.StartBackupOptions(otherIn), workflows.BackupWorkflowName, otherIn)
	require.NoError(t, err)
	require.Error(t, other.Get(ctx, nil))
	all, err := l.Temporal.Client.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{Query: `VMName="other-vm"`})
	require.NoError(t, err)
	require.Len(t, all.GetExecutions(), 1, "visibility knows the other backup by its VMName")

	page := fmt.Sprintf("http://127.0.0.1:%d/namespaces/default/workflows?query=%s", uiPort,
		url.QueryEscape(fmt.Sprintf(`VMName=%q`, l.VC.VMName)))
	shot := filepath.Join(t.TempDir(), "webui.png")
	var dom string
	require.Eventually(t, func() bool {
		cmd := exec.CommandContext(ctx, chromium, "--headless", "--no-sandbox", "--disable-gpu",
			"--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
			"--user-data-dir="+t.TempDir(), "--window-size=1400,900", "--virtual-time-budget=15000",
			"--screenshot="+shot, "--dump-dom", page)
		out, _ := cmd.Output()
		dom = string(out)
		return strings.Contains(dom, wf.GetID())
	}, 2*time.Minute, time.Second, "the Web UI never listed %s", wf.GetID())
	require.NotContains(t, dom, other.GetID(), "the VMName filter lets another VM's backup through")
	st, err := os.Stat(shot)
	require.NoError(t, err)
	require.Greater(t, st.Size(), int64(10_000), "screenshot is too small to show anything")
	if dst := os.Getenv("DISKFERRY_SCREENSHOT"); dst != "" {
		data, err := os.ReadFile(shot)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(dst, data, 0o644))
	}
}
