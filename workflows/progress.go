package workflows

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	workflowpb "go.temporal.io/api/workflow/v1"
	"go.temporal.io/sdk/converter"

	"github.com/diskferry/diskferry/activities"
)

// ProgressQueryName is the query that returns a run's Progress.
const ProgressQueryName = "progress"

// Disk phases in Progress.
const (
	PhaseWaiting   = "waiting"   // planned, nothing done yet
	PhaseExporting = "exporting" // port, target and export being set up on the hub
	PhaseCopying   = "copying"   // CopyDisk scheduled or running
	PhaseVerifying = "verifying" // export stopped, target being verified
	PhaseDone      = "done"      // verified
	PhaseFailed    = "failed"    // the run failed or was cancelled; the disk is not kept
)

// Progress is what the progress query returns: everything the workflow itself knows. Bytes of
// a copy in flight live only in the CopyDisk heartbeats, which the workflow cannot see; a
// client adds them with LiveCopies and WithLiveCopies from DescribeWorkflowExecution.
type Progress struct {
	VM     string `json:"vm"`
	Site   string `json:"site"`
	Status string `json:"status"` // BackupStatus value
	Step   string `json:"step"`   // what the run is doing now
	// WaitingFor names the worker and task queue the current step waits for.
	WaitingFor string         `json:"waitingFor,omitempty"`
	PointID    string         `json:"pointId,omitempty"`
	HubID      string         `json:"hubId,omitempty"`
	Mode       string         `json:"mode"`
	Started    time.Time      `json:"started"`
	Disks      []DiskProgress `json:"disks"`
	Error      string         `json:"error,omitempty"`
	UndoErrors []string       `json:"undoErrors,omitempty"`
}

// DiskProgress is one disk of a run.
type DiskProgress struct {
	Key           int32         `json:"key"`
	Mode          string        `json:"mode"`
	Phase         string        `json:"phase"`
	CapacityBytes int64         `json:"capacityBytes"`
	BytesDone     int64         `json:"bytesDone"`
	BytesTotal    int64         `json:"bytesTotal"`
	Rate          float64       `json:"rate"` // bytes per second of the copy
	CopyStarted   time.Time     `json:"copyStarted,omitzero"`
	CopyDuration  time.Duration `json:"copyDuration,omitempty"`
}

func (p *Progress) disk(key int32) *DiskProgress {
	for i := range p.Disks {
		if p.Disks[i].Key == key {
			return &p.Disks[i]
		}
	}
	return nil
}

func (p *Progress) clone() Progress {
	c := *p
	c.Disks = slices.Clone(p.Disks)
	c.UndoErrors = slices.Clone(p.UndoErrors)
	return c
}

// copyActivityPrefix starts the activity ID of each CopyDisk, so a client can tell which disk
// a pending activity copies.
const copyActivityPrefix = "copy-disk-"

// CopyActivityID is the activity ID of the CopyDisk of one disk.
func CopyActivityID(key int32) string { return copyActivityPrefix + strconv.FormatInt(int64(key), 10) }

// copyActivityDisk returns the disk key of a CopyDisk activity ID.
func copyActivityDisk(activityID string) (int32, bool) {
	rest, ok := strings.CutPrefix(activityID, copyActivityPrefix)
	if !ok {
		return 0, false
	}
	key, err := strconv.ParseInt(rest, 10, 32)
	return int32(key), err == nil
}

// LiveCopies decodes the last heartbeat of each pending CopyDisk (backup) or WriteDisk
// (restore; its activity ID is CopyActivityID of the point's disk key) activity of a run, as listed
// by DescribeWorkflowExecution, keyed by disk. Activities that have not heartbeated yet are
// left out.
func LiveCopies(pending []*workflowpb.PendingActivityInfo, dc converter.DataConverter) (map[int32]activities.CopyProgress, error) {
	live := make(map[int32]activities.CopyProgress)
	for _, a := range pending {
		name := a.GetActivityType().GetName()
		if (name != activities.CopyDiskName && name != activities.WriteDiskName) || len(a.GetHeartbeatDetails().GetPayloads()) == 0 {
			continue
		}
		key, ok := copyActivityDisk(a.GetActivityId())
		if !ok {
			continue
		}
		var cp activities.CopyProgress
		if err := dc.FromPayloads(a.GetHeartbeatDetails(), &cp); err != nil {
			return nil, fmt.Errorf("decode heartbeat of %s: %w", a.GetActivityId(), err)
		}
		live[key] = cp
	}
	return live, nil
}

// WithLiveCopies returns p with the bytes of copies still in flight taken from their
// heartbeats; rate is measured since the workflow scheduled the copy. A copy that waits on
// the SNA before it starts (for a copy slot) says so in WaitingFor, naming its disk.
func (p Progress) WithLiveCopies(live map[int32]activities.CopyProgress, now time.Time) Progress {
	p = p.clone()
	var waits []string
	for i := range p.Disks {
		d := &p.Disks[i]
		cp, ok := live[d.Key]
		if !ok || d.Phase != PhaseCopying {
			continue
		}
		if cp.WaitingFor != "" {
			waits = append(waits, fmt.Sprintf("%s (disk %d)", cp.WaitingFor, d.Key))
		}
		d.BytesDone, d.BytesTotal = cp.BytesDone, cp.BytesTotal
		if elapsed := now.Sub(d.CopyStarted).Seconds(); !d.CopyStarted.IsZero() && elapsed > 0 {
			d.Rate = float64(cp.BytesDone) / elapsed
		}
	}
	if len(waits) > 0 {
		p.WaitingFor = strings.Join(waits, "; ")
	}
	return p
}
