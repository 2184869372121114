package lab_test

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/workflows"
)

// TestLabTeardownStopsWhatItCaused ends a lab while a backup copies: the lab's teardown
// cancels the backup and stops the hub's export (which a stopped hub leaves running by
// design), so no process serving the lab's files outlives it.
func TestLabTeardownStopsWhatItCaused(t *testing.T) {
	var l *lab.Lab
	var exportPid int
	t.Run("lab", func(t *testing.T) {
		l = startLab(t, lab.Options{Disks: 1, DiskSize: 1 << 30})
		key := l.VC.Disks[0].Key
		fillDisk(t, l, key, 768<<20)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		in := workflows.BackupInput{VM: l.VC.VMName, Site: l.Site}
		run, err := l.Temporal.Client.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
		require.NoError(t, err)
		waitForCopyProgress(ctx, t, l, run.GetID(), key)
		exportPid = exportPID(t, l)
	})
	require.NotZero(t, exportPid)
	require.False(t, alive(exportPid), "the backup's qemu-nbd export (pid %d) outlived the lab", exportPid)
	require.Empty(t, l.DataPlaneProcesses(), "data-plane processes outlived the lab")
}

// alive reports whether pid is a running process (a zombie is not).
func alive(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(stat), ')')
	return i > 0 && i+2 < len(stat) && stat[i+2] != 'Z'
}
