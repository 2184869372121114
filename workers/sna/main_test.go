package main

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/config"
	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/internal/vsphere"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
	"github.com/diskferry/diskferry/workflows"
)

const site = "lab1"

func testConfig(t *testing.T, ts *testenv.TemporalServer, lab *vcsimtest.Lab) config.SNA {
	t.Helper()
	sshd := testenv.StartSSHD(t)
	return config.SNA{
		Temporal:          config.Temporal{Address: ts.HostPort, Namespace: ts.Namespace},
		Site:              site,
		VCenterURL:        lab.URL,
		VCenterUser:       lab.User,
		VCenterPassword:   config.Secret(lab.Password),
		VCenterThumbprint: lab.Thumbprint,
		HubSSHAddr:        sshd.Addr,
		HubSSHUser:        sshd.User,
		SSHKeyFile:        sshd.ClientKeyPath,
		SSHKnownHostsFile: sshd.KnownHostsPath,
		SSHKeepalive:      15 * time.Second,
		Transport:         config.TransportHTTPS,
		CopyConnections:   4,
		CopyRequestSize:   1 << 20,
	}
}

// inspectThroughQueue is a workflow that runs InspectVM on the SNA queue, as BackupWorkflow does.
func inspectThroughQueue(ctx workflow.Context, vm string) (activities.VM, error) {
	ctx = workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		TaskQueue:           activities.SNAQueue(site),
		StartToCloseTimeout: 30 * time.Second,
		RetryPolicy:         &temporal.RetryPolicy{MaximumAttempts: 1},
	})
	var out activities.VM
	err := workflow.ExecuteActivity(ctx, activities.InspectVMName, activities.InspectVMInput{VM: vm}).Get(ctx, &out)
	return out, err
}

// The worker polls its site's queue, serves activities under their contract names, and
// returns cleanly when its context ends.
func TestRunPollsAndStops(t *testing.T) {
	ts := testenv.StartTemporal(t)
	lab := vcsimtest.NewLab(t, vcsimtest.Options{Disks: 2, DiskSize: 8 << 20, CBT: true})
	cfg := testConfig(t, ts, lab)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg, slog.New(slog.NewJSONHandler(io.Discard, nil))) }()

	require.Eventually(t, func() bool {
		resp, err := ts.Client.DescribeTaskQueue(context.Background(), activities.SNAQueue(site), enums.TASK_QUEUE_TYPE_ACTIVITY)
		return err == nil && len(resp.GetPollers()) > 0
	}, 20*time.Second, 100*time.Millisecond, "a poller on %s", activities.SNAQueue(site))

	w := worker.New(ts.Client, "sna-test-workflows", worker.Options{})
	w.RegisterWorkflow(inspectThroughQueue)
	require.NoError(t, w.Start())
	defer w.Stop()
	wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer wcancel()
	run, err := ts.Client.ExecuteWorkflow(wctx, client.StartWorkflowOptions{TaskQueue: "sna-test-workflows"}, inspectThroughQueue, lab.VMPath)
	require.NoError(t, err)
	var vm activities.VM
	require.NoError(t, run.Get(wctx, &vm))
	require.Equal(t, lab.VMMoref, vm.Moref)
	require.Len(t, vm.Disks, 2)

	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("run did not return after cancel")
	}
}

// A vCenter certificate other than the pinned one stops the worker at start with an error
// naming the mismatch.
func TestRunRejectsWrongThumbprint(t *testing.T) {
	ts := testenv.StartTemporal(t)
	lab := vcsimtest.NewLab(t, vcsimtest.Options{Disks: 1, DiskSize: 1 << 20})
	cfg := testConfig(t, ts, lab)
	cfg.VCenterThumbprint = "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33"

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := run(ctx, cfg, slog.New(slog.NewJSONHandler(io.Discard, nil)))
	require.ErrorContains(t, err, "does not match the pinned thumbprint")
	require.NotContains(t, err.Error(), lab.Password)
}

// The sweep removes backup snapshots of closed workflows only: not those of running
// workflows, not anyone else's.
func TestSweepRemovesSnapshotsOfClosedWorkflows(t *testing.T) {
	ts := testenv.StartTemporal(t)
	lab := vcsimtest.NewLab(t, vcsimtest.Options{Disks: 1, DiskSize: 1 << 20})
	ctx := context.Background()
	log := slog.New(slog.NewJSONHandler(io.Discard, nil))
	vc, err := vsphere.Connect(ctx, vsphere.Config{URL: lab.URL, User: lab.User, Password: lab.Password, Thumbprint: lab.Thumbprint, Logger: log})
	require.NoError(t, err)
	t.Cleanup(func() { _ = vc.Close(context.Background()) })
	vm, err := vc.FindVM(ctx, lab.VMMoref)
	require.NoError(t, err)

	// No worker serves this queue, so the workflow stays running.
	running, err := ts.Client.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: "backup-running", TaskQueue: "nobody"}, "BackupWorkflow")
	require.NoError(t, err)
	// A finished earlier run of the same workflow ID left one behind too: only the exact
	// run that made a snapshot keeps it.
	runningSnap := workflows.SnapshotName("backup-running", running.GetRunID())
	for _, name := range []string{runningSnap, workflows.SnapshotName("backup-running", "00000000-0000-4000-8000-000000000001"),
		workflows.SnapshotName("backup-gone", "00000000-0000-4000-8000-000000000002"), "operator-snapshot"} {
		_, err := vc.CreateSnapshot(ctx, vm, name, false)
		require.NoError(t, err)
	}
	names := func() []string {
		snaps, err := vc.ListSnapshots(ctx, vm)
		require.NoError(t, err)
		var out []string
		for _, s := range snaps {
			out = append(out, s.Name)
		}
		return out
	}

	sw := &sweeper{vc: vc, workflows: ts.Client, log: log}
	sw.sweep(ctx)
	require.ElementsMatch(t, []string{runningSnap, "operator-snapshot"}, names())

	require.NoError(t, ts.Client.TerminateWorkflow(ctx, running.GetID(), "", "test"))
	sw.sweep(ctx)
	require.Equal(t, []string{"operator-snapshot"}, names())
}
