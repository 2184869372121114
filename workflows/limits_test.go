package workflows

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
)

// The job's bandwidth reaches every disk's copy in bytes per second, the same for all of
// them, so the SNA can share one limit among the job's disks.
func TestBackupBandwidthReachesEveryCopy(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	in := validInput()
	in.Bandwidth = "50Mbit"
	_, err := r.execute(in)
	require.NoError(t, err)
	r.fakes.mu.Lock()
	defer r.fakes.mu.Unlock()
	require.Len(t, r.fakes.copyInputs, 2)
	for _, c := range r.fakes.copyInputs {
		assert.Equal(t, int64(6_250_000), c.BandwidthBytesPerSec, "disk %d", c.DiskKey)
	}
}

func TestBackupWithoutBandwidthHasNoJobLimit(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	_, err := r.execute(validInput())
	require.NoError(t, err)
	r.fakes.mu.Lock()
	defer r.fakes.mu.Unlock()
	require.NotEmpty(t, r.fakes.copyInputs)
	for _, c := range r.fakes.copyInputs {
		assert.Zero(t, c.BandwidthBytesPerSec, "disk %d", c.DiskKey)
	}
}

func TestBackupBadBandwidthIsRefused(t *testing.T) {
	for _, bw := range []string{"50", "fast", "50MB", "10kbit", "-1Gbit"} {
		t.Run(bw, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			in := validInput()
			in.Bandwidth = bw
			_, err := r.execute(in)
			var appErr *temporal.ApplicationError
			require.ErrorAs(t, err, &appErr)
			assert.Equal(t, activities.ErrBadInput, appErr.Type())
			assert.True(t, appErr.NonRetryable())
			assert.Contains(t, appErr.Error(), "bandwidth:")
			assert.Empty(t, r.fakes.recorded(), "no activity runs on bad input")
		})
	}
}

func TestBackupInputDecodesBandwidth(t *testing.T) {
	var in BackupInput
	require.NoError(t, in.UnmarshalJSON([]byte(`{"vm":"web01","site":"lab","bandwidth":"1Gbit"}`)))
	require.NoError(t, in.Validate())
	assert.Equal(t, "1Gbit", in.Bandwidth)
	assert.Equal(t, int64(125_000_000), bandwidthBytesPerSec(in.Bandwidth))
}

// A restore's bandwidth reaches every disk's write as a backup's reaches its copies, for
// both destinations that write through an SNA; without it there is no job limit.
func TestRestoreBandwidthReachesEveryWrite(t *testing.T) {
	for _, tc := range []struct {
		name      string
		in        RestoreInput
		bandwidth string
		want      int64
	}{
		{"new-vm", newVMInput(), "50Mbit", 6_250_000},
		{"in-place", inPlaceInput(), "12.5MB/s", 12_500_000},
		{"no limit", newVMInput(), "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			r.fakes.changeVM = func(vm *activities.VM) { vm.PowerState = activities.PowerOff }
			in := tc.in
			in.Bandwidth = tc.bandwidth
			_, err := r.executeRestore(in)
			require.NoError(t, err)
			r.fakes.mu.Lock()
			defer r.fakes.mu.Unlock()
			require.Len(t, r.fakes.writes, 2)
			for _, w := range r.fakes.writes {
				assert.Equal(t, tc.want, w.BandwidthBytesPerSec, "disk %d", w.DiskKey)
			}
		})
	}
}

func TestRestoreInputDecodesBandwidth(t *testing.T) {
	var in RestoreInput
	require.NoError(t, in.UnmarshalJSON([]byte(`{"point":"p1","bandwidth":"1Gbit"}`)))
	require.NoError(t, in.Validate())
	assert.Equal(t, "1Gbit", in.Bandwidth)
}

// A copy waiting for a slot on its SNA heartbeats what it waits for; the run's progress
// (diskferry runs, the e2e tests) shows it in WaitingFor, naming the disk.
func TestWithLiveCopiesShowsCopySlotWait(t *testing.T) {
	p := Progress{WaitingFor: "the SNA of site lab to run CopyDisk", Disks: []DiskProgress{
		{Key: 2000, Phase: PhaseCopying}, {Key: 2001, Phase: PhaseCopying},
	}}
	live := map[int32]activities.CopyProgress{
		2000: {BytesDone: 5, BytesTotal: 10},
		2001: {WaitingFor: "a copy slot on the SNA of site lab"},
	}
	merged := p.WithLiveCopies(live, time.Now())
	assert.Equal(t, "a copy slot on the SNA of site lab (disk 2001)", merged.WaitingFor)
	assert.Equal(t, int64(5), merged.Disks[0].BytesDone)

	delete(live, 2001)
	assert.Equal(t, p.WaitingFor, p.WithLiveCopies(live, time.Now()).WaitingFor, "no copy waits: the run's own text stays")
}
