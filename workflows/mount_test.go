package workflows

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
)

// mountForward are the calls that set up a mount of both disks, without a site.
var mountForward = []string{"ResolvePoint", "AllocatePorts", "StartExport 2000", "StartExport 2001"}

// mountTeardown are the calls that end it.
var mountTeardown = []string{"StopExport 2001", "StopExport 2000", "ReleasePorts"}

func (r *run) executeMount(in MountInput) (MountInfo, error) {
	r.env.SetStartWorkflowOptions(client.StartWorkflowOptions{ID: MountWorkflowID(testPointID), TaskQueue: activities.HubQueue})
	r.env.ExecuteWorkflow(MountWorkflowName, in)
	if !r.env.IsWorkflowCompleted() {
		return MountInfo{}, errors.New("workflow did not complete")
	}
	if err := r.env.GetWorkflowError(); err != nil {
		return MountInfo{}, err
	}
	var info MountInfo
	err := r.env.GetWorkflowResult(&info)
	return info, err
}

func (r *run) mountInfo(t *testing.T) MountInfo {
	t.Helper()
	v, err := r.env.QueryWorkflow(MountQueryName)
	require.NoError(t, err)
	var info MountInfo
	require.NoError(t, v.Get(&info))
	return info
}

// whileMounted runs fn once the mount serves (a minute into it, as the test clock goes).
func (r *run) whileMounted(t *testing.T, fn func(MountInfo)) {
	r.env.RegisterDelayedCallback(func() { fn(r.mountInfo(t)) }, time.Minute)
}

func TestMountEndsOnUnmount(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	var mounted MountInfo
	r.whileMounted(t, func(info MountInfo) {
		mounted = info
		assert.Equal(t, mountForward, r.fakes.recorded(), "nothing torn down while mounted")
		r.env.SignalWorkflow(UnmountSignalName, nil)
	})
	info, err := r.executeMount(MountInput{Point: testPointID})
	require.NoError(t, err)

	assert.Equal(t, MountMounted, mounted.Status)
	assert.Equal(t, []MountedDisk{
		{Key: 2000, Port: testPort(2000), URI: "nbd+unix:///disk-2000?socket=" + testExportSocket(testPort(2000))},
		{Key: 2001, Port: testPort(2001), URI: "nbd+unix:///disk-2001?socket=" + testExportSocket(testPort(2001))},
	}, mounted.Disks)
	assert.Equal(t, testPointID, mounted.PointID)
	assert.Equal(t, testHubID, mounted.HubID)
	assert.False(t, mounted.Expires.IsZero())
	for _, e := range r.fakes.exports {
		assert.True(t, e.ReadOnly)
		assert.Equal(t, MountWorkflowID(testPointID), e.WorkflowID)
	}

	assert.Equal(t, append(mountForward, mountTeardown...), r.fakes.recorded())
	assert.Equal(t, EndedUnmount, info.Ended)
	assert.Equal(t, MountEnded, info.Status)
	assert.Equal(t, info, r.mountInfo(t), "the query gives the result")
	assert.Equal(t, MountEnded, r.attrs[BackupStatusKey.GetName()])
	assert.Equal(t, "web01", r.attrs[VMNameKey.GetName()])
}

// Without an unmount the mount ends when its TTL expires, not before.
func TestMountEndsOnTTL(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	start := r.env.Now()
	info, err := r.executeMount(MountInput{Point: testPointID, TTLSeconds: 3 * 3600})
	require.NoError(t, err)
	assert.Equal(t, EndedTTL, info.Ended)
	assert.GreaterOrEqual(t, r.env.Now().Sub(start), 3*time.Hour)
	assert.Equal(t, info.Expires, start.Add(3*time.Hour).UTC(), "expires TTL after it mounted")
	assert.Equal(t, append(mountForward, mountTeardown...), r.fakes.recorded())
}

func TestMountDefaultTTL(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	start := r.env.Now()
	info, err := r.executeMount(MountInput{VM: "web01"})
	require.NoError(t, err)
	assert.Equal(t, EndedTTL, info.Ended)
	assert.Equal(t, start.Add(DefaultMountTTL).UTC(), info.Expires)
	assert.Equal(t, []activities.ResolvePointInput{{VM: "web01"}}, r.fakes.resolves)
}

// A cancel ends the mount cancelled, after everything it held is released.
func TestMountEndsOnCancel(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.whileMounted(t, func(MountInfo) { r.env.CancelWorkflow() })
	_, err := r.executeMount(MountInput{Point: testPointID, Site: testSite})
	var canceled *temporal.CanceledError
	require.ErrorAs(t, err, &canceled)
	assert.Equal(t, append(append(mountForward, "EnsureTunnel", "DropTunnel"), mountTeardown...), r.fakes.recorded())
	info := r.mountInfo(t)
	assert.Equal(t, EndedCancel, info.Ended)
	assert.Equal(t, MountEnded, info.Status)
}

// With a site the exports are forwarded to its SNA, and the mount gives their URIs there.
func TestMountForwardsToSite(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	var mounted MountInfo
	r.whileMounted(t, func(info MountInfo) {
		mounted = info
		r.env.SignalWorkflow(UnmountSignalName, nil)
	})
	_, err := r.executeMount(MountInput{Point: testPointID, Disks: []int32{2001}, Site: testSite})
	require.NoError(t, err)
	require.Len(t, mounted.Disks, 1)
	assert.Equal(t, "nbd+unix:///disk-2001?socket="+testForwardSocket(testPort(2001)), mounted.Disks[0].SiteURI)
	assert.Equal(t, testSite, mounted.Site)
	assert.Equal(t, []string{"ResolvePoint", "AllocatePorts", "StartExport 2001", "EnsureTunnel", "DropTunnel", "StopExport 2001", "ReleasePorts"},
		r.fakes.recorded())
}

// An unmount sent while the mount is still being prepared ends it once it serves.
func TestMountUnmountWhilePreparing(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.before = map[string]func(){"AllocatePorts": func() { r.env.SignalWorkflow(UnmountSignalName, nil) }}
	info, err := r.executeMount(MountInput{Point: testPointID})
	require.NoError(t, err)
	assert.Equal(t, EndedUnmount, info.Ended)
	assert.Equal(t, append(mountForward, mountTeardown...), r.fakes.recorded())
}

// A step that fails while preparing releases what the mount holds.
func TestMountFailureReleasesEverything(t *testing.T) {
	for step, undos := range map[string][]string{
		"ResolvePoint":     nil,
		"StartExport 2001": {"StopExport 2001", "StopExport 2000", "ReleasePorts"},
		"EnsureTunnel":     {"DropTunnel", "StopExport 2001", "StopExport 2000", "ReleasePorts"},
	} {
		t.Run(step, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			r.fakes.fail[step] = injected(step)
			_, err := r.executeMount(MountInput{Point: testPointID, Site: testSite})
			require.ErrorContains(t, err, "injected failure at "+step)
			forward := append(mountForward, "EnsureTunnel")
			assert.Equal(t, append(until(t, forward, step), undos...), r.fakes.recorded())
			info := r.mountInfo(t)
			assert.Equal(t, MountFailed, info.Status)
			assert.Equal(t, EndedError, info.Ended)
			assert.Contains(t, info.Error, "injected failure at "+step)
		})
	}
}

// A teardown step that fails still releases the rest, and the mount ends failed.
func TestMountTeardownFailureReleasesTheRest(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.fail["StopExport 2001"] = injected("StopExport 2001")
	r.whileMounted(t, func(MountInfo) { r.env.SignalWorkflow(UnmountSignalName, nil) })
	_, err := r.executeMount(MountInput{Point: testPointID})
	require.ErrorContains(t, err, "injected failure at StopExport 2001")
	assert.Equal(t, append(mountForward, mountTeardown...), r.fakes.recorded())
	info := r.mountInfo(t)
	assert.Equal(t, MountFailed, info.Status)
	assert.Equal(t, EndedUnmount, info.Ended)
}

func TestMountBadInput(t *testing.T) {
	for _, tc := range []struct {
		in   MountInput
		want string
	}{
		{MountInput{}, "point: required"},
		{MountInput{Point: "p1", TTLSeconds: 8 * 24 * 3600}, "ttlSeconds: 691200 is outside 0..604800"},
		{MountInput{Point: "p1", TTLSeconds: -1}, "ttlSeconds: -1 is outside"},
		{MountInput{Point: "p1", Disks: []int32{1, 1}}, "disks: key 1 listed twice"},
		{MountInput{Point: "p1", Site: "a b"}, "site: \"a b\" is not a valid site name"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			r := newRun(t, activities.ModeFull)
			_, err := r.executeMount(tc.in)
			var appErr *temporal.ApplicationError
			require.ErrorAs(t, err, &appErr)
			assert.Equal(t, activities.ErrBadInput, appErr.Type())
			assert.Contains(t, err.Error(), "invalid mount input: "+tc.want)
			assert.Empty(t, r.fakes.recorded())
			assert.Equal(t, MountFailed, r.mountInfo(t).Status)
		})
	}
}

// A cancel while the mount is being prepared releases what it holds and ends it cancelled.
func TestMountCancelWhilePreparing(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	r.fakes.blockAt = "StartExport 2001"
	r.fakes.onBlock = r.env.CancelWorkflow
	_, err := r.executeMount(MountInput{Point: testPointID})
	var canceled *temporal.CanceledError
	require.ErrorAs(t, err, &canceled)
	assert.Equal(t, append(mountForward, mountTeardown...), r.fakes.recorded())
	info := r.mountInfo(t)
	assert.Equal(t, MountEnded, info.Status)
	assert.Equal(t, EndedCancel, info.Ended)
	assert.Len(t, info.Disks, 1, "disk 2001 never served")
}
