package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	commonpb "go.temporal.io/api/common/v1"
	workflowpb "go.temporal.io/api/workflow/v1"
	"go.temporal.io/sdk/converter"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/workflows"
)

// Bad flags of restore, mount and unmount are refused before anything is asked of Temporal
// (none listens here: a command that got past its checks would say it cannot reach it), and
// the message names the flag.
func TestRestoreAndMountFlagsRefused(t *testing.T) {
	t.Setenv("DISKFERRY_TEMPORAL_ADDRESS", "127.0.0.1:1")
	long := strings.Repeat("x", 81)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"restore", "new-vm"}, "--point or --vm is required: the point to restore, or the VM whose latest complete point to restore"},
		{[]string{"restore", "new-vm", "--point", "P", "--vm", "web01"}, "give --point or --vm, not both"},
		{[]string{"restore", "new-vm", "--point", "P", "--disk", "2000", "--disk", "2000"}, "--disk 2000 is given twice"},
		{[]string{"restore", "new-vm", "--point", "P", "--disk", "0"}, "--disk 0 is not a disk key (diskferry points show lists a point's disks)"},
		{[]string{"restore", "new-vm", "--point", "P", "--name", long}, "--name is 81 characters long; vSphere allows 80"},
		{[]string{"restore", "new-vm", "--point", "P", "--name", " web"}, `--name " web" has leading or trailing spaces or control characters`},
		{[]string{"restore", "new-vm", "--point", "P", "--wait", "--no-wait"}, "if any flags in the group [wait no-wait] are set none of the others can be; [no-wait wait] were all set"},
		{[]string{"restore", "in-place", "--vm", "web01", "--connections", "99"}, "--connections 99 is outside 0..16"},
		{[]string{"restore", "in-place", "--vm", "web01", "--bandwidth", "50MB"}, `--bandwidth: "50MB" is not a bandwidth (e.g. 50Mbit, 1Gbit, 12.5MB/s, 800KiB/s)`},
		{[]string{"restore", "new-vm", "--point", "P", "--bandwidth", "100kbit"}, `--bandwidth: bandwidth "100kbit" is below the minimum of 1Mbit`},
		{[]string{"restore", "file", "--point", "P", "--format", "raw", "--output", "/srv/x", "--bandwidth", "50Mbit"}, "unknown flag: --bandwidth"},
		{[]string{"restore", "file", "--point", "P", "--format", "vhd", "--output", "/srv/x"}, `--format "vhd" is not one of raw, qcow2, vmdk`},
		{[]string{"restore", "file", "--point", "P", "--format", "raw", "--output", "srv/x"}, `--output "srv/x" is not a clean absolute path on the hub`},
		{[]string{"restore", "file", "--point", "P", "--format", "raw", "--output", "/srv/../x"}, `--output "/srv/../x" is not a clean absolute path on the hub`},
		{[]string{"restore", "file", "--point", "P", "--format", "raw"}, `required flag(s) "output" not set`},
		{[]string{"mount"}, "--point or --vm is required: the point to mount, or the VM whose latest complete point to mount"},
		{[]string{"mount", "--point", "P", "--vm", "web01"}, "give --point or --vm, not both"},
		{[]string{"mount", "--point", "P", "--ttl", "0s"}, "--ttl 0s is outside 1s..168h0m0s"},
		{[]string{"mount", "--point", "P", "--ttl", "169h"}, "--ttl 169h0m0s is outside 1s..168h0m0s"},
		{[]string{"mount", "--point", "P", "--disk", "-3"}, "--disk -3 is not a disk key (diskferry points show lists a point's disks)"},
		{[]string{"mount", "--point", "P", "--timeout", "0s"}, "--timeout 0s must be positive"},
		{[]string{"unmount", "P", "--timeout", "-1s"}, "--timeout -1s must be positive"},
	} {
		_, err := runCLI(t, c.args...)
		assert.EqualError(t, err, c.want, "%v", c.args)
	}
	// Valid flags get as far as Temporal.
	_, err := runCLI(t, "restore", "file", "--point", "P", "--format", "vmdk", "--output", "/srv/x.vmdk")
	assert.ErrorContains(t, err, "cannot reach Temporal at 127.0.0.1:1")
}

// The workflow ID names the destination object, so the server refuses a second restore into it.
func TestRestoreWorkflowIDNamesTheTarget(t *testing.T) {
	for _, c := range []struct {
		in   workflows.RestoreInput
		want string
	}{
		{workflows.RestoreInput{Destination: activities.DestinationNewVM, Point: "P1", Name: "web01-test"}, "restore-new-vm-web01-test"},
		{workflows.RestoreInput{Destination: activities.DestinationNewVM, Point: "P1"}, "restore-new-vm-P1"},
		{workflows.RestoreInput{Destination: activities.DestinationNewVM, VM: "web01"}, "restore-new-vm-web01-latest"},
		{workflows.RestoreInput{Destination: activities.DestinationInPlace, VM: "web01"}, "restore-in-place-web01"},
		{workflows.RestoreInput{Destination: activities.DestinationInPlace, Point: "P1"}, "restore-in-place-P1"},
		{workflows.RestoreInput{Destination: activities.DestinationFile, Point: "P1", Output: "/srv/x.vmdk"}, "restore-file-/srv/x.vmdk"},
	} {
		id := workflows.RestoreWorkflowID(c.in.Destination, restoreTarget(c.in))
		assert.Equal(t, c.want, id)
		dest, target := parseRestoreID(id)
		assert.Equal(t, c.in.Destination, dest, id)
		assert.Equal(t, restoreTarget(c.in), target, id)
	}
	dest, target := parseRestoreID("backup-web01")
	assert.Empty(t, dest+target, "not a restore's ID")

	assert.Equal(t, "mount-P1", mountID(workflows.MountInput{Point: "P1"}))
	assert.Equal(t, "mount-web01-latest", mountID(workflows.MountInput{VM: "web01"}))
	assert.Equal(t, "mount-P1", mountIDOf("P1"))
	assert.Equal(t, "mount-web01-latest", mountIDOf("mount-web01-latest"))
}

func TestPrintRestoreResult(t *testing.T) {
	var out bytes.Buffer
	printRestoreResult(&out, "restore-new-vm-web01-test", workflows.RestoreResult{
		PointID: "P1", Destination: activities.DestinationNewVM, VMName: "web01-test", VMMoref: "vm-77", Duration: 61500 * time.Millisecond,
		Disks: []workflows.RestoredDisk{
			{PointKey: 2000, VMKey: 2000, BytesRead: 3 << 20, BytesWritten: 2 << 20, Duration: 1500 * time.Millisecond, Digest: "d1"},
			{PointKey: 2016, VMKey: 2001, BytesRead: 1 << 30, BytesWritten: 1 << 30, Duration: time.Minute},
		},
		Warnings: []string{"network \"VM Network\" is gone;\x1b[2J the NIC is disconnected"},
	})
	assert.Equal(t, `restore restore-new-vm-web01-test complete: point P1, new-vm into VM web01-test (vm-77), 1m1.5s
DISK  INTO       READ     WRITTEN  TIME  DIGEST
2000  disk 2000  3.0 MiB  2.0 MiB  1.5s  d1
2016  disk 2001  1.0 GiB  1.0 GiB  1m0s  -
warning: network "VM Network" is gone;`+"\uFFFD"+`[2J the NIC is disconnected
`, out.String())

	out.Reset()
	printRestoreResult(&out, "restore-file-/srv/x.vmdk", workflows.RestoreResult{
		PointID: "P1", Destination: activities.DestinationFile, Duration: 2 * time.Second,
		Disks: []workflows.RestoredDisk{{PointKey: 2000, Output: "/srv/x.vmdk", BytesRead: 1 << 20, BytesWritten: 512 << 10, Duration: time.Second}},
	})
	assert.Equal(t, `restore restore-file-/srv/x.vmdk complete: point P1, file, 2s
DISK  INTO         READ     WRITTEN    TIME  DIGEST
2000  /srv/x.vmdk  1.0 MiB  512.0 KiB  1s    -
`, out.String())
}

func TestRenderMount(t *testing.T) {
	expires := time.Date(2026, 12, 2, 3, 0, 0, 0, time.Local)
	info := workflows.MountInfo{PointID: "P1", HubID: "hub-1", Site: "lab", Status: workflows.MountMounted, Expires: expires,
		Disks: []workflows.MountedDisk{
			{Key: 2000, Port: 10809, URI: "nbd+unix:///disk-2000?socket=/run/diskferry/10809.sock", SiteURI: "nbd+unix:///disk-2000?socket=/run/diskferry-sna/10809.sock"},
			{Key: 2001, Port: 10810, URI: "nbd+unix:///disk-2001?socket=/run/diskferry/10810.sock"},
		}}
	var out bytes.Buffer
	require.NoError(t, renderMount(&out, "mount-P1", "run-1", info, false))
	assert.Equal(t, `point P1 mounted on hub hub-1 (workflow mount-P1) until 2026-12-02 03:00:00
DISK  URI (hub)                                               URI (SNA of lab)
2000  nbd+unix:///disk-2000?socket=/run/diskferry/10809.sock  nbd+unix:///disk-2000?socket=/run/diskferry-sna/10809.sock
2001  nbd+unix:///disk-2001?socket=/run/diskferry/10810.sock  -
read-only; look with: nbdinfo 'URI', or guestfish --ro -a 'URI' where installed
end it with: diskferry unmount mount-P1
`, out.String())

	out.Reset()
	require.NoError(t, renderMount(&out, "mount-P1", "run-1", info, true))
	assert.JSONEq(t, `{"workflowId":"mount-P1","runId":"run-1","pointId":"P1","hubId":"hub-1","site":"lab","status":"mounted",
		"expires":"`+expires.Format(time.RFC3339Nano)+`","disks":[
		{"key":2000,"port":10809,"uri":"nbd+unix:///disk-2000?socket=/run/diskferry/10809.sock","siteUri":"nbd+unix:///disk-2000?socket=/run/diskferry-sna/10809.sock"},
		{"key":2001,"port":10810,"uri":"nbd+unix:///disk-2001?socket=/run/diskferry/10810.sock"}]}`, out.String())

	out.Reset()
	require.NoError(t, renderMount(&out, "mount-P2", "", workflows.MountInfo{PointID: "P2", HubID: "hub-1", Status: workflows.MountEnded, Ended: "ttl"}, false))
	assert.Equal(t, "point P2 ended on hub hub-1 (workflow mount-P2)\nended: ttl\n", out.String(), "an ended mount offers neither URIs nor unmount")
}

func TestRenderRestoreAndMountLists(t *testing.T) {
	start := time.Date(2026, 12, 2, 1, 0, 0, 0, time.Local)
	var out bytes.Buffer
	require.NoError(t, renderRestoreList(&out, []restoreRow{
		{runRow: runRow{WorkflowID: "restore-file-/srv/x.vmdk", State: "completed", Start: start, End: start.Add(time.Minute)}, Destination: "file", Target: "/srv/x.vmdk"},
		{runRow: runRow{WorkflowID: "restore-new-vm-P1", State: "running", Start: start}, Destination: "new-vm", Target: "P1"},
	}))
	assert.Equal(t, `WORKFLOW ID               DESTINATION  TARGET       STATE      STARTED              ENDED
restore-file-/srv/x.vmdk  file         /srv/x.vmdk  completed  2026-12-02 01:00:00  2026-12-02 01:01:00
restore-new-vm-P1         new-vm       P1           running    2026-12-02 01:00:00  -
`, out.String())

	out.Reset()
	require.NoError(t, renderMountList(&out, []mountRow{
		{runRow: runRow{WorkflowID: "mount-P1", State: "running", Start: start}, PointID: "P1", Status: "mounted", Expires: start.Add(2 * time.Hour), Disks: 2},
		{runRow: runRow{WorkflowID: "mount-P0", State: "completed", Start: start, End: start.Add(time.Hour)}},
	}))
	assert.Equal(t, `WORKFLOW ID  POINT  STATUS   DISKS  EXPIRES              STATE      STARTED
mount-P1     P1     mounted  2      2026-12-02 03:00:00  running    2026-12-02 01:00:00
mount-P0     -      -        0      -                    completed  2026-12-02 01:00:00
`, out.String())

	out.Reset()
	require.NoError(t, renderRestoreList(&out, nil))
	require.NoError(t, renderMountList(&out, nil))
	assert.Equal(t, "no restores\nno mounts\n", out.String())
}

// A file restore's bar comes from the percentage RestoreFile heartbeats, for the disk its
// activity ID names, while that disk copies.
func TestFileRestoreProgressFromHeartbeat(t *testing.T) {
	beat := func(percent float64) *commonpb.Payloads {
		p, err := converter.GetDefaultDataConverter().ToPayloads(activities.RestoreFileProgress{Percent: percent})
		require.NoError(t, err)
		return p
	}
	pending := []*workflowpb.PendingActivityInfo{
		{ActivityId: workflows.CopyActivityID(2000), ActivityType: &commonpb.ActivityType{Name: activities.RestoreFileName}, HeartbeatDetails: beat(25)},
		{ActivityId: workflows.CopyActivityID(2001), ActivityType: &commonpb.ActivityType{Name: activities.RestoreFileName}, HeartbeatDetails: beat(50)},
		{ActivityId: workflows.CopyActivityID(2002), ActivityType: &commonpb.ActivityType{Name: activities.RestoreFileName}},
	}
	p := workflows.Progress{Disks: []workflows.DiskProgress{
		{Key: 2000, Phase: workflows.PhaseCopying, CapacityBytes: 1 << 30},
		{Key: 2001, Phase: workflows.PhaseDone, CapacityBytes: 1 << 30, BytesDone: 7, BytesTotal: 7},
		{Key: 2002, Phase: workflows.PhaseCopying, CapacityBytes: 1 << 30},
	}}
	require.NoError(t, withFileRestores(&p, pending))
	assert.Equal(t, [][2]int64{{256 << 20, 1 << 30}, {7, 7}, {0, 0}}, [][2]int64{
		{p.Disks[0].BytesDone, p.Disks[0].BytesTotal}, {p.Disks[1].BytesDone, p.Disks[1].BytesTotal}, {p.Disks[2].BytesDone, p.Disks[2].BytesTotal}},
		"25% of disk 2000; disk 2001 is done already; disk 2002 has not reported")
}
