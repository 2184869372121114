package workflows

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
)

// A copy waiting on the SNA for a copy slot tells its run (CopyWaitSignal): the job log says
// what each disk waits for, and no longer once the copy runs.
func TestBackupJobLogSaysWhatACopyWaitsFor(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.blockAt = label(activities.CopyDiskName, 2001)
	const what = "a copy slot on the SNA of site lab"
	var waiting, cleared string
	r.env.RegisterDelayedCallback(func() {
		r.env.SignalWorkflow(activities.CopyWaitSignal, activities.CopyWait{DiskKey: 2001, WaitingFor: what})
	}, time.Second)
	r.env.RegisterDelayedCallback(func() {
		waiting = r.details(t)
		r.env.SignalWorkflow(activities.CopyWaitSignal, activities.CopyWait{DiskKey: 2001})
	}, 2*time.Second)
	r.env.RegisterDelayedCallback(func() {
		cleared = r.details(t)
		r.env.CancelWorkflow()
	}, 3*time.Second)
	_, err := r.execute(validInput())
	require.Error(t, err, "cancelled while disk 2001's copy ran")

	assert.Contains(t, waiting, "Waiting for: "+what+" (disk 2001)")
	assert.NotContains(t, cleared, what, "cleared once the copy runs")
	assert.Contains(t, cleared, "**Backup of", "the job log is still there")
}
