package workflows

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	commonpb "go.temporal.io/api/common/v1"
	workflowpb "go.temporal.io/api/workflow/v1"
	"go.temporal.io/sdk/converter"

	"github.com/diskferry/diskferry/activities"
)

func pending(t *testing.T, activityType, activityID string, details any) *workflowpb.PendingActivityInfo {
	t.Helper()
	info := &workflowpb.PendingActivityInfo{ActivityId: activityID, ActivityType: &commonpb.ActivityType{Name: activityType}}
	if details != nil {
		payloads, err := converter.GetDefaultDataConverter().ToPayloads(details)
		require.NoError(t, err)
		info.HeartbeatDetails = payloads
	}
	return info
}

func TestLiveCopiesDecodesCopyHeartbeatsOnly(t *testing.T) {
	live, err := LiveCopies([]*workflowpb.PendingActivityInfo{
		pending(t, activities.CopyDiskName, CopyActivityID(2000), activities.CopyProgress{BytesDone: 5, BytesTotal: 10}),
		pending(t, activities.CopyDiskName, CopyActivityID(2001), nil),                      // not heartbeated yet
		pending(t, activities.VerifyTargetName, "7", activities.CopyProgress{BytesDone: 1}), // not a copy
		pending(t, activities.CopyDiskName, "12", activities.CopyProgress{BytesDone: 1}),    // unknown ID scheme
	}, converter.GetDefaultDataConverter())
	require.NoError(t, err)
	assert.Equal(t, map[int32]activities.CopyProgress{2000: {BytesDone: 5, BytesTotal: 10}}, live)
}

func TestLiveCopiesReportsUndecodableHeartbeat(t *testing.T) {
	_, err := LiveCopies([]*workflowpb.PendingActivityInfo{
		pending(t, activities.CopyDiskName, CopyActivityID(2000), "not a progress"),
	}, converter.GetDefaultDataConverter())
	assert.ErrorContains(t, err, "copy-disk-2000")
}

func TestWithLiveCopiesMergesCopyingDisks(t *testing.T) {
	started := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	p := Progress{Status: StatusCopying, Disks: []DiskProgress{
		{Key: 2000, Phase: PhaseCopying, BytesTotal: 64 * gib, CopyStarted: started},
		{Key: 2001, Phase: PhaseVerifying, BytesDone: gib, BytesTotal: gib, Rate: 42},
	}}
	live := map[int32]activities.CopyProgress{
		2000: {BytesDone: 10 * gib, BytesTotal: 20 * gib},
		2001: {BytesDone: 1, BytesTotal: 2}, // stale: the copy already finished
	}
	merged := p.WithLiveCopies(live, started.Add(10*time.Second))

	assert.Equal(t, 10*gib, merged.Disks[0].BytesDone)
	assert.Equal(t, 20*gib, merged.Disks[0].BytesTotal)
	assert.InDelta(t, float64(gib), merged.Disks[0].Rate, 1)
	assert.Equal(t, p.Disks[1], merged.Disks[1], "a disk past copying keeps what the workflow knows")
	assert.Equal(t, int64(0), p.Disks[0].BytesDone, "the input is not modified")
}

func TestCopyActivityIDRoundTrip(t *testing.T) {
	for _, key := range []int32{0, 204, 2000, 16000} {
		got, ok := copyActivityDisk(CopyActivityID(key))
		assert.True(t, ok)
		assert.Equal(t, key, got)
	}
	_, ok := copyActivityDisk("copy-disk-x")
	assert.False(t, ok)
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1 << 20: "1 MiB", 64 * gib: "64 GiB", 1536 << 20: "1.5 GiB"} {
		assert.Equal(t, want, humanBytes(n))
	}
}
