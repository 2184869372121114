package lab_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/converter"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/workflows"
)

// TestCopySlotWaitShowsInCurrentDetails backs up a 2-disk VM through an SNA with one copy
// slot and a 4 Mbit site limit, so one disk's copy waits seconds for the other's: while it
// waits, the run's Current Details (the Web UI's job log) say which disk waits for a copy
// slot on which SNA; the history holds the copy's signals (waiting, then running); the backup
// completes and its job log no longer says it waits.
func TestCopySlotWaitShowsInCurrentDetails(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 2, DiskSize: 16 << 20,
		SNAEnv: []string{"DISKFERRY_MAX_COPIES=1", "DISKFERRY_SITE_BANDWIDTH=4Mbit"}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	in := workflows.BackupInput{VM: l.VC.VMName, Site: l.Site}
	run, err := l.Temporal.Client.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
	require.NoError(t, err)

	want := "Waiting for: a copy slot on the SNA of site " + l.Site + " (disk "
	var details string
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(details, want) {
		select {
		case <-ctx.Done():
			t.Fatalf("the job log never said %q; last:\n%s\nsna log:\n%s", want, details, tail(l.WorkerLog("sna")))
		case <-tick.C:
		}
		details = currentDetails(ctx, t, l, run.GetID(), run.GetRunID())
		require.Less(t, strings.Count(details, " copied: "), 2, "both copies ended before one was seen waiting:\n%s", details)
	}

	var res workflows.BackupResult
	require.NoError(t, getResult(ctx, run, &res))
	require.NotEmpty(t, res.PointID)
	final := currentDetails(ctx, t, l, run.GetID(), run.GetRunID())
	require.NotContains(t, final, "a copy slot", "the job log still says a copy waits")

	var waits []activities.CopyWait
	history := l.Temporal.Client.GetWorkflowHistory(ctx, run.GetID(), run.GetRunID(), false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
	for history.HasNext() {
		ev, err := history.Next()
		require.NoError(t, err)
		if a := ev.GetWorkflowExecutionSignaledEventAttributes(); a != nil && a.GetSignalName() == activities.CopyWaitSignal {
			var w activities.CopyWait
			require.NoError(t, converter.GetDefaultDataConverter().FromPayloads(a.GetInput(), &w))
			waits = append(waits, w)
		}
	}
	require.Len(t, waits, 2, "one copy waited, then ran: %+v", waits)
	require.Equal(t, "a copy slot on the SNA of site "+l.Site, waits[0].WaitingFor)
	require.Equal(t, activities.CopyWait{DiskKey: waits[0].DiskKey}, waits[1], "the same disk's copy runs")
}
