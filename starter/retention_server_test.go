package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/workflow"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/workflows"
)

// VMs the fake retention treats specially.
const (
	busyVM = "busy" // the chain is in use: the run is skipped
	holdVM = "hold" // the run goes on until cancelled
)

// fakeRetention stands in for RetentionWorkflow: the operator's points are dropped, else P1
// is dropped by the policy; P2 (the newest) is kept. Applying deletes what is dropped.
func fakeRetention(ctx workflow.Context, in workflows.RetentionInput) (workflows.RetentionOutcome, error) {
	p := workflows.Progress{VM: in.VM, Status: workflows.StatusRunning, Step: "planning", Mode: "apply"}
	if err := workflow.SetQueryHandler(ctx, workflows.ProgressQueryName, func() (workflows.Progress, error) { return p, nil }); err != nil {
		return workflows.RetentionOutcome{}, err
	}
	out := workflows.RetentionOutcome{DryRun: in.DryRun, Duration: 2 * time.Second, Plan: activities.RetentionPlan{
		VMName: in.VM, HubID: "hub-1", Policy: activities.RetentionPolicy{KeepLast: 1}, PolicySource: "vm",
	}}
	switch in.VM {
	case busyVM:
		out.Skipped = "backup backup-busy of VM busy is running"
		return out, nil
	case holdVM:
		return out, workflow.Await(ctx, func() bool { return false })
	}
	drop := in.Delete
	reason := "deleted by operator"
	if len(drop) == 0 {
		drop, reason = []string{"P1"}, "not kept by the policy"
	}
	for _, id := range drop {
		out.Plan.Points = append(out.Plan.Points, activities.PointDecision{PointID: id, Reasons: []string{reason}, Bytes: 1 << 30})
	}
	if len(in.Delete) == 0 {
		out.Plan.Points = append(out.Plan.Points, activities.PointDecision{PointID: "P2", Keep: true, Reasons: []string{"last 1"}, Bytes: 1 << 20})
	}
	if !in.DryRun {
		out.Result = activities.RetentionResult{Deleted: drop, BytesFreed: int64(len(drop)) << 30}
	}
	p.Status = workflows.StatusComplete
	return out, nil
}

// runCLIWithInput is runCLI with what the operator types.
func runCLIWithInput(t *testing.T, input string, args ...string) (string, error) {
	t.Helper()
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetIn(strings.NewReader(input))
	root.SetArgs(args)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

// retention apply, points delete and vm forget start RetentionWorkflow on the hub queue
// under the VM's retention ID with plain-JSON input, print its plan and outcome, ask before
// deleting unless --yes, and say when the run was skipped or one is already running.
func TestRetentionCommandsOnServer(t *testing.T) {
	pc := newPointsCatalog(t)
	c := startFakeWorkflows(t)

	out, err := runCLI(t, "retention", "apply", "--vm", "web01", "--dry-run")
	require.NoError(t, err, out)
	assert.Equal(t, `retention of VM web01 on hub hub-1: policy last 1 (from vm)
POINT  DECISION  BYTES    REASONS
P1     drop      1.0 GiB  not kept by the policy
P2     keep      1.0 MiB  last 1
dry run: 1 point(s) would be deleted (1.0 GiB), 0 flattened; nothing changed
`, out)
	wfType, queue, input := startedWith(t, c, "retention-web01")
	assert.Equal(t, workflows.RetentionWorkflowName, wfType)
	assert.Equal(t, activities.HubQueue, queue)
	assert.JSONEq(t, `{"vm":"web01","dryRun":true}`, input)

	out, err = runCLI(t, "retention", "apply", "--vm", "web01", "--json")
	require.NoError(t, err, out)
	var outcome workflows.RetentionOutcome
	require.NoError(t, json.Unmarshal([]byte(out), &outcome), out)
	assert.Equal(t, activities.RetentionResult{Deleted: []string{"P1"}, BytesFreed: 1 << 30}, outcome.Result)

	out, err = runCLI(t, "retention", "apply", "--vm", busyVM)
	assert.EqualError(t, err, "retention of VM busy skipped, nothing changed: backup backup-busy of VM busy is running")
	assert.Contains(t, out, "skipped: backup backup-busy of VM busy is running\n")

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err = c.ExecuteWorkflow(ctx, startOnce(workflows.RetentionWorkflowID(holdVM)), workflows.RetentionWorkflowName, workflows.RetentionInput{VM: holdVM})
	require.NoError(t, err)
	_, err = runCLI(t, "retention", "apply", "--vm", holdVM)
	assert.EqualError(t, err, "a retention of VM hold is already running (workflow retention-hold); try again when it ends")

	out, err = runCLI(t, "points", "delete", pc.incr.ID, "--yes")
	require.NoError(t, err, out)
	assert.True(t, strings.HasSuffix(out, "deleted 1 point(s) ("+pc.incr.ID+"), flattened 0: 1.0 GiB freed in 2s\n"), out)
	_, _, input = startedWith(t, c, "retention-web01")
	assert.JSONEq(t, `{"vm":"web01","delete":["`+pc.incr.ID+`"]}`, input)

	out, err = runCLIWithInput(t, "n\n", "points", "delete", pc.full.ID)
	assert.EqualError(t, err, "not confirmed; nothing deleted")
	assert.Contains(t, out, "dry run: 1 point(s) would be deleted (1.0 GiB), 0 flattened; nothing changed\nDelete point "+pc.full.ID+" of VM web01? [y/N] ")
	_, _, input = startedWith(t, c, "retention-web01")
	assert.JSONEq(t, `{"vm":"web01","delete":["`+pc.full.ID+`"],"dryRun":true}`, input, "only the dry run ran")

	out, err = runCLIWithInput(t, "y\n", "vm", "forget", "vm-42")
	require.NoError(t, err, out)
	assert.Contains(t, out, "Delete all 2 point(s) of VM web01? [y/N] ")
	assert.True(t, strings.HasSuffix(out, "deleted 2 point(s) ("+pc.incr.ID+", "+pc.full.ID+"), flattened 0: 2.0 GiB freed in 2s\n"), out)
	_, _, input = startedWith(t, c, "retention-web01")
	assert.JSONEq(t, `{"vm":"web01","delete":["`+pc.incr.ID+`","`+pc.full.ID+`"]}`, input)

	_, err = runCLI(t, "points", "delete", "nope", "--yes")
	assert.EqualError(t, err, `restore point "nope" is not in the catalog (diskferry points list shows the points)`)
	_, err = runCLI(t, "vm", "forget", "db01", "--yes")
	assert.EqualError(t, err, "VM db01 has no complete restore point in the catalog (diskferry points list --vm db01)")
	_, err = runCLI(t, "points", "delete", pc.full.ID, "--json")
	assert.EqualError(t, err, "--json needs --yes: a confirmation cannot be asked for")
}
