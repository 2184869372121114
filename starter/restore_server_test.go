package main

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/workflows"
)

// Points the fake workflows treat specially.
const (
	holdPoint   = "hold"   // the restore runs until cancelled
	badPoint    = "bad"    // the restore fails as a bad input does
	slowPoint   = "slow"   // the mount never serves
	brokenPoint = "broken" // the mount fails
)

// fakeRestore stands in for RestoreWorkflow under its registered name: it answers the
// progress query and returns a result made of its input.
func fakeRestore(ctx workflow.Context, in workflows.RestoreInput) (workflows.RestoreResult, error) {
	p := workflows.Progress{VM: "web01", Site: "lab", Status: workflows.StatusCopying, Step: "writing disks",
		PointID: in.Point, HubID: "hub-1", Mode: in.Destination}
	for _, k := range in.Disks {
		p.Disks = append(p.Disks, workflows.DiskProgress{Key: k, Phase: workflows.PhaseCopying, CapacityBytes: 1 << 30, BytesTotal: 1 << 30})
	}
	if err := workflow.SetQueryHandler(ctx, workflows.ProgressQueryName, func() (workflows.Progress, error) { return p, nil }); err != nil {
		return workflows.RestoreResult{}, err
	}
	switch in.Point {
	case holdPoint:
		return workflows.RestoreResult{}, workflow.Await(ctx, func() bool { return false })
	case badPoint:
		return workflows.RestoreResult{}, temporal.NewNonRetryableApplicationError(
			"invalid restore input: disks: point bad has no disk 2002 (it has 2000, 2001)", activities.ErrBadInput, nil)
	}
	res := workflows.RestoreResult{PointID: in.Point, Destination: in.Destination, VMName: in.Name, Duration: 3 * time.Second}
	if in.Destination == activities.DestinationNewVM {
		res.VMMoref = "vm-77"
	}
	for i, k := range in.Disks {
		d := workflows.RestoredDisk{PointKey: k, BytesRead: 1 << 20, BytesWritten: 1 << 20, Duration: time.Second, Digest: "d"}
		if in.Destination == activities.DestinationFile {
			d.Output = in.Output
		} else {
			d.VMKey = 3000 + int32(i)
		}
		res.Disks = append(res.Disks, d)
	}
	p.Status, p.Step = workflows.StatusComplete, "done"
	for i := range p.Disks {
		p.Disks[i].Phase, p.Disks[i].BytesDone = workflows.PhaseDone, p.Disks[i].BytesTotal
	}
	return res, nil
}

// fakeMount stands in for MountWorkflow: it answers the mount query, serves at once (made-up
// URIs) and ends on the unmount signal or its TTL.
func fakeMount(ctx workflow.Context, in workflows.MountInput) (workflows.MountInfo, error) {
	info := workflows.MountInfo{PointID: in.Point, HubID: "hub-1", Site: in.Site, Status: workflows.MountPreparing}
	if err := workflow.SetQueryHandler(ctx, workflows.MountQueryName, func() (workflows.MountInfo, error) { return info, nil }); err != nil {
		return info, err
	}
	unmount := workflow.GetSignalChannel(ctx, workflows.UnmountSignalName)
	switch in.Point {
	case slowPoint:
		unmount.Receive(ctx, nil)
		info.Status, info.Ended = workflows.MountEnded, "unmount"
		return info, nil
	case brokenPoint:
		info.Status, info.Error = workflows.MountFailed, "point broken is not in the catalog"
		return info, temporal.NewNonRetryableApplicationError(info.Error, activities.ErrNotFound, nil)
	}
	info.Status = workflows.MountMounted
	info.Expires = workflow.Now(ctx).Add(time.Duration(in.TTLSeconds) * time.Second)
	for i, k := range in.Disks {
		d := workflows.MountedDisk{Key: k, Port: 10809 + i, URI: "nbd+unix:///disk-" + itoa(k) + "?socket=/run/hub/" + itoa(k) + ".sock"}
		if in.Site != "" {
			d.SiteURI = "nbd+unix:///disk-" + itoa(k) + "?socket=/run/sna/" + itoa(k) + ".sock"
		}
		info.Disks = append(info.Disks, d)
	}
	sel := workflow.NewSelector(ctx)
	sel.AddReceive(unmount, func(c workflow.ReceiveChannel, _ bool) { c.Receive(ctx, nil); info.Ended = "unmount" })
	sel.AddFuture(workflow.NewTimer(ctx, time.Duration(in.TTLSeconds)*time.Second), func(workflow.Future) { info.Ended = "ttl" })
	sel.Select(ctx)
	info.Status = workflows.MountEnded
	return info, nil
}

// startFakeWorkflows starts a dev server with the fakes registered under the real workflows'
// names on the hub queue, and points the CLI at it.
func startFakeWorkflows(t *testing.T) client.Client {
	t.Helper()
	srv := testenv.StartTemporal(t)
	w := worker.New(srv.Client, activities.HubQueue, worker.Options{})
	w.RegisterWorkflowWithOptions(fakeRestore, workflow.RegisterOptions{Name: workflows.RestoreWorkflowName})
	w.RegisterWorkflowWithOptions(fakeMount, workflow.RegisterOptions{Name: workflows.MountWorkflowName})
	w.RegisterWorkflowWithOptions(fakeRetention, workflow.RegisterOptions{Name: workflows.RetentionWorkflowName})
	require.NoError(t, w.Start())
	t.Cleanup(w.Stop)
	t.Setenv("DISKFERRY_TEMPORAL_ADDRESS", srv.HostPort)
	t.Setenv("DISKFERRY_TEMPORAL_NAMESPACE", srv.Namespace)
	return srv.Client
}

// startedWith returns the run's workflow type, task queue and its input as the JSON the
// server holds.
func startedWith(t *testing.T, c client.Client, id string) (wfType, queue, input string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	it := c.GetWorkflowHistory(ctx, id, "", false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
	ev, err := it.Next()
	require.NoError(t, err)
	attrs := ev.GetWorkflowExecutionStartedEventAttributes()
	require.NotNil(t, attrs, "the first event of %s starts it", id)
	payloads := attrs.GetInput().GetPayloads()
	require.Len(t, payloads, 1)
	return attrs.GetWorkflowType().GetName(), attrs.GetTaskQueue().GetName(), string(payloads[0].GetData())
}

// The restore commands start RestoreWorkflow on the hub queue under the destination's ID
// with the flags as plain JSON, follow it to its result, refuse a second restore into the
// same target, and show, list and cancel restores.
func TestRestoreCommandsOnServer(t *testing.T) {
	c := startFakeWorkflows(t)

	out, err := runCLI(t, "restore", "new-vm", "--point", "P1", "--disk", "2000", "--disk", "2001", "--name", "web01-test",
		"--folder", "/dc/vm/restored", "--pool", "/dc/host/c1/Resources", "--datastore", "ds2", "--power-on", "--site", "lab", "--bandwidth", "50Mbit", "--json")
	require.NoError(t, err, out)
	var res workflows.RestoreResult
	require.NoError(t, json.Unmarshal([]byte(out), &res), out)
	assert.Equal(t, "web01-test", res.VMName)
	assert.Equal(t, "vm-77", res.VMMoref)
	assert.Len(t, res.Disks, 2)
	wfType, queue, input := startedWith(t, c, "restore-new-vm-web01-test")
	assert.Equal(t, workflows.RestoreWorkflowName, wfType)
	assert.Equal(t, activities.HubQueue, queue)
	assert.JSONEq(t, `{"point":"P1","destination":"new-vm","disks":[2000,2001],"site":"lab","name":"web01-test",
		"folder":"/dc/vm/restored","resourcePool":"/dc/host/c1/Resources","datastore":"ds2","powerOn":true,"bandwidth":"50Mbit"}`, input)

	out, err = runCLI(t, "restore", "file", "--point", "P1", "--disk", "2000", "--format", "vmdk", "--output", "/srv/web01.vmdk")
	require.NoError(t, err, out)
	assert.Equal(t, `restore restore-file-/srv/web01.vmdk complete: point P1, file, 3s
DISK  INTO             READ     WRITTEN  TIME  DIGEST
2000  /srv/web01.vmdk  1.0 MiB  1.0 MiB  1s    d
`, out)
	_, _, input = startedWith(t, c, "restore-file-/srv/web01.vmdk")
	assert.JSONEq(t, `{"point":"P1","destination":"file","disks":[2000],"format":"vmdk","output":"/srv/web01.vmdk"}`, input)

	_, err = runCLI(t, "restore", "in-place", "--point", badPoint, "--disk", "2002")
	assert.EqualError(t, err, "restore restore-in-place-bad failed: invalid restore input: disks: point bad has no disk 2002 (it has 2000, 2001)")

	out, err = runCLI(t, "restore", "in-place", "--vm", "web01", "--point", holdPoint)
	assert.EqualError(t, err, "give --point or --vm, not both", out)
	out, err = runCLI(t, "restore", "in-place", "--point", holdPoint, "--disk", "2000", "--power-off", "--bandwidth", "1Gbit", "--no-wait", "--json")
	require.NoError(t, err, out)
	var started map[string]string
	require.NoError(t, json.Unmarshal([]byte(out), &started), out)
	assert.Equal(t, "restore-in-place-hold", started["workflowId"])
	_, _, input = startedWith(t, c, "restore-in-place-hold")
	assert.JSONEq(t, `{"point":"hold","destination":"in-place","disks":[2000],"powerOff":true,"bandwidth":"1Gbit"}`, input)

	_, err = runCLI(t, "restore", "in-place", "--point", holdPoint)
	assert.EqualError(t, err, "a restore into in-place hold is already running (workflow restore-in-place-hold); watch it with: diskferry restore status restore-in-place-hold")

	out, err = runCLI(t, "restore", "status", "restore-in-place-hold")
	require.NoError(t, err, out)
	assert.Equal(t, `restore restore-in-place-hold (in-place) of web01: copying, writing disks
point hold on hub hub-1, site lab
DISK  MODE  PHASE    DONE  TOTAL    RATE
2000  -     copying  0 B   1.0 GiB  0 B/s
`, out)

	require.Eventually(t, func() bool {
		out, err := runCLI(t, "restore", "list", "--json")
		require.NoError(t, err, out)
		var rows []restoreRow
		require.NoError(t, json.Unmarshal([]byte(out), &rows), out)
		return len(rows) == 4 && rows[0].WorkflowID == "restore-in-place-hold" && rows[0].State == "running" &&
			rows[0].Destination == activities.DestinationInPlace && rows[0].Target == holdPoint
	}, time.Minute, 200*time.Millisecond, "visibility lists the four restores, the running one first")

	out, err = runCLI(t, "restore", "cancel", "restore-in-place-hold")
	require.NoError(t, err, out)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var canceled *temporal.CanceledError
	require.ErrorAs(t, c.GetWorkflow(ctx, "restore-in-place-hold", "").Get(ctx, nil), &canceled)
}

// mount starts MountWorkflow under mount-<point> (mount-<vm>-latest), waits until the mount
// query says mounted and prints the URIs; a second mount of the point is refused; a mount
// that does not serve in time, or fails, says so; unmount signals it and reports its end.
func TestMountCommandsOnServer(t *testing.T) {
	c := startFakeWorkflows(t)

	out, err := runCLI(t, "mount", "--point", "P1", "--disk", "2000", "--disk", "2001", "--ttl", "30m", "--site", "lab")
	require.NoError(t, err, out)
	assert.Regexp(t, `^point P1 mounted on hub hub-1 \(workflow mount-P1\) until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d
DISK  URI \(hub\)                                        URI \(SNA of lab\)
2000  nbd\+unix:///disk-2000\?socket=/run/hub/2000.sock  nbd\+unix:///disk-2000\?socket=/run/sna/2000.sock
2001  nbd\+unix:///disk-2001\?socket=/run/hub/2001.sock  nbd\+unix:///disk-2001\?socket=/run/sna/2001.sock
read-only; look with: nbdinfo 'URI', or guestfish --ro -a 'URI' where installed
end it with: diskferry unmount mount-P1
$`, out)
	wfType, queue, input := startedWith(t, c, "mount-P1")
	assert.Equal(t, workflows.MountWorkflowName, wfType)
	assert.Equal(t, activities.HubQueue, queue)
	assert.JSONEq(t, `{"point":"P1","disks":[2000,2001],"ttlSeconds":1800,"site":"lab"}`, input)

	_, err = runCLI(t, "mount", "--point", "P1")
	assert.EqualError(t, err, "point P1 is already mounted (workflow mount-P1): diskferry mount status mount-P1 shows its URIs, diskferry unmount mount-P1 ends it")

	out, err = runCLI(t, "mount", "--vm", "web01", "--disk", "2000", "--json")
	require.NoError(t, err, out)
	var view mountView
	require.NoError(t, json.Unmarshal([]byte(out), &view), out)
	assert.Equal(t, "mount-web01-latest", view.WorkflowID)
	assert.Equal(t, workflows.MountMounted, view.Status)
	_, _, input = startedWith(t, c, "mount-web01-latest")
	assert.JSONEq(t, `{"vm":"web01","disks":[2000],"ttlSeconds":7200}`, input, "the default TTL is two hours")

	out, err = runCLI(t, "mount", "status", "P1", "--json")
	require.NoError(t, err, out)
	require.NoError(t, json.Unmarshal([]byte(out), &view), out)
	assert.Equal(t, "mount-P1", view.WorkflowID)
	assert.Len(t, view.Disks, 2)

	require.Eventually(t, func() bool {
		out, err := runCLI(t, "mount", "list", "--json")
		require.NoError(t, err, out)
		var rows []mountRow
		require.NoError(t, json.Unmarshal([]byte(out), &rows), out)
		return len(rows) == 2 && rows[0].WorkflowID == "mount-web01-latest" && rows[1].WorkflowID == "mount-P1" &&
			rows[1].PointID == "P1" && rows[1].Status == workflows.MountMounted && rows[1].Disks == 2
	}, time.Minute, 200*time.Millisecond, "visibility lists the two open mounts, each with its query's status")

	out, err = runCLI(t, "unmount", "P1")
	require.NoError(t, err, out)
	assert.Equal(t, "mount mount-P1 of point P1 ended: unmount\n", out)
	_, err = runCLI(t, "unmount", "P1")
	assert.EqualError(t, err, "no open mount mount-P1 (diskferry mount list shows the open mounts)")
	out, err = runCLI(t, "unmount", "mount-web01-latest")
	require.NoError(t, err, out)
	assert.Equal(t, "mount mount-web01-latest of point - ended: unmount\n", out)

	_, err = runCLI(t, "mount", "--point", slowPoint, "--timeout", "1s")
	// On a busy machine the first answer of the query may come after the second.
	require.Error(t, err)
	assert.Regexp(t, `^mount mount-slow does not serve after 1s \(--timeout\): (status preparing|it has not answered yet \(query mount mount-slow: .*\)); `+
		`no step pending; it goes on: diskferry unmount mount-slow ends it$`, err.Error())
	out, err = runCLI(t, "unmount", slowPoint)
	require.NoError(t, err, out)

	_, err = runCLI(t, "mount", "--point", brokenPoint)
	assert.EqualError(t, err, "mount mount-broken failed: point broken is not in the catalog")
}
