package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/workflows"
)

// Bad flags of retention apply, points delete and vm forget are refused before anything is
// asked of Temporal (none listens here) or the catalog (none is configured).
func TestRetentionFlagsRefused(t *testing.T) {
	t.Setenv("DISKFERRY_TEMPORAL_ADDRESS", "127.0.0.1:1")
	t.Setenv("DISKFERRY_DB_DSN", "")
	t.Setenv("DISKFERRY_DB_DSN_FILE", "")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"retention", "apply"}, `required flag(s) "vm" not set`},
		{[]string{"retention", "apply", "--vm", " web01"}, `invalid retention input: vm: " web01" has leading or trailing spaces`},
		{[]string{"retention", "apply", "--vm", "VirtualMachine:42"}, `invalid retention input: vm: "VirtualMachine:42" is not a VM moref (VirtualMachine:vm-<number>)`},
		{[]string{"points", "delete"}, "accepts 1 arg(s), received 0"},
		{[]string{"points", "delete", "P1", "--yes"}, "no catalog configured: set DISKFERRY_DB_DSN or DISKFERRY_DB_DSN_FILE to the hub's catalog DSN"},
		{[]string{"vm", "forget"}, "accepts 1 arg(s), received 0"},
		{[]string{"vm", "forget", "web01"}, "no catalog configured: set DISKFERRY_DB_DSN or DISKFERRY_DB_DSN_FILE to the hub's catalog DSN"},
	} {
		_, err := runCLI(t, c.args...)
		assert.EqualError(t, err, c.want, "%v", c.args)
	}
	_, err := runCLI(t, "retention", "apply", "--vm", "web01", "--dry-run")
	assert.ErrorContains(t, err, "cannot reach Temporal at 127.0.0.1:1")
}

func testOutcome() workflows.RetentionOutcome {
	return workflows.RetentionOutcome{
		Plan: activities.RetentionPlan{
			VMName: "web01", HubID: "hub-1", Policy: activities.RetentionPolicy{KeepLast: 2, Daily: 7, MaxChain: 3}, PolicySource: "schedule backup-schedule-web01",
			Points: []activities.PointDecision{
				{PointID: "P1", Reasons: []string{"not kept by the policy"}, Bytes: 3 << 30},
				{PointID: "P2", Reasons: []string{"deleted by operator"}, Bytes: 1 << 20},
				{PointID: "P3", Keep: true, Flatten: true, Reasons: []string{"last 2", "daily 2026-12-01"}, Bytes: 1 << 30},
				{PointID: "P4", Keep: true, Reasons: []string{"last 2"}, Bytes: 512 << 20},
			},
		},
		Result:   activities.RetentionResult{Deleted: []string{"P1", "P2"}, Flattened: []string{"P3"}, BytesFreed: 3<<30 + 1<<20},
		Duration: 4200 * time.Millisecond,
	}
}

const testPlanTable = `retention of VM web01 on hub hub-1: policy last 2, daily 7, max chain 3 (from schedule backup-schedule-web01)
POINT  DECISION  BYTES      REASONS
P1     drop      3.0 GiB    not kept by the policy
P2     drop      1.0 MiB    deleted by operator
P3     flatten   1.0 GiB    last 2; daily 2026-12-01
P4     keep      512.0 MiB  last 2
`

// The outcome shows every point's fate with its reasons and bytes, then what was done.
func TestPrintRetentionOutcome(t *testing.T) {
	var out bytes.Buffer
	printRetentionOutcome(&out, testOutcome())
	assert.Equal(t, testPlanTable+"deleted 2 point(s) (P1, P2), flattened 1 (P3): 3.0 GiB freed in 4.2s\n", out.String())

	dry := testOutcome()
	dry.DryRun, dry.Result = true, activities.RetentionResult{}
	out.Reset()
	printRetentionOutcome(&out, dry)
	assert.Equal(t, testPlanTable+"dry run: 2 point(s) would be deleted (3.0 GiB), 1 flattened; nothing changed\n", out.String())

	skipped := testOutcome()
	skipped.Skipped, skipped.Result = "backup backup-web01 of VM web01 is running", activities.RetentionResult{}
	out.Reset()
	printRetentionOutcome(&out, skipped)
	assert.Equal(t, testPlanTable+"skipped: backup backup-web01 of VM web01 is running\n", out.String())

	none := workflows.RetentionOutcome{Plan: activities.RetentionPlan{VMName: "web01", HubID: "hub-1", PolicySource: "none",
		Points: []activities.PointDecision{{PointID: "P4", Keep: true, Reasons: []string{"newest"}, Bytes: 1 << 20}}}}
	out.Reset()
	printRetentionOutcome(&out, none)
	assert.Equal(t, `retention of VM web01 on hub hub-1: policy keep everything (from none)
POINT  DECISION  BYTES    REASONS
P4     keep      1.0 MiB  newest
nothing to delete or flatten
`, out.String())
}

// Only y or yes confirms; no answer at all is an error that names --yes.
func TestConfirm(t *testing.T) {
	for answer, want := range map[string]bool{"y\n": true, "YES\n": true, " yes \n": true, "yes": true, "n\n": false, "\n": false, "yep\n": false} {
		var out bytes.Buffer
		ok, err := confirm(strings.NewReader(answer), &out, "Delete point P1 of VM web01?")
		require.NoError(t, err, "%q", answer)
		assert.Equal(t, want, ok, "%q", answer)
		assert.Equal(t, "Delete point P1 of VM web01? [y/N] ", out.String())
	}
	_, err := confirm(strings.NewReader(""), &bytes.Buffer{}, "Delete?")
	assert.EqualError(t, err, "no answer to the confirmation (pass --yes to run without one)")
}

// vm forget deletes the complete points of one VM, by its catalog name; a name several VMs
// share is refused, and so is a VM without a complete point.
func TestForgetInput(t *testing.T) {
	web := catalog.VM{ID: 1, Moref: "vm-42", Name: "web01"}
	point := func(id, status string, vm catalog.VM) catalog.PointOfVM {
		return catalog.PointOfVM{Point: catalog.Point{ID: id, Status: status, VMID: vm.ID}, VM: vm}
	}
	in, err := forgetInput("vm-42", []catalog.PointOfVM{
		point("P3", catalog.StatusComplete, web), point("P2", "failed", web), point("P1", catalog.StatusComplete, web),
	})
	require.NoError(t, err)
	assert.Equal(t, workflows.RetentionInput{VM: "web01", Delete: []string{"P3", "P1"}}, in)

	other := catalog.VM{ID: 2, Moref: "vm-7", Name: "web01"}
	_, err = forgetInput("web01", []catalog.PointOfVM{point("P1", catalog.StatusComplete, web), point("P9", catalog.StatusComplete, other)})
	assert.EqualError(t, err, "2 VMs are named web01 (morefs vm-42, vm-7): give the moref of the one to forget")

	_, err = forgetInput("web01", []catalog.PointOfVM{point("P2", "failed", web)})
	assert.EqualError(t, err, "VM web01 has no complete restore point in the catalog (diskferry points list --vm web01)")
	_, err = forgetInput("web02", nil)
	assert.EqualError(t, err, "VM web02 has no complete restore point in the catalog (diskferry points list --vm web02)")
}

// A backup's result names the retention it started, and a retention it could not start is
// a warning.
func TestPrintBackupResultNamesRetention(t *testing.T) {
	var out bytes.Buffer
	printResult(&out, "backup-web01", workflows.BackupResult{PointID: "P1", HubID: "hub-1", VMName: "web01", Mode: "full",
		Duration: time.Second, Retention: "retention-web01"})
	assert.Equal(t, `backup backup-web01 complete: point P1 on hub hub-1, full, 1s
DISK  MODE  READ  WRITTEN  ZEROED  TIME  PATH
retention: retention-web01 reviews the points of VM web01 (diskferry retention apply --vm web01 --dry-run shows its plan)
`, out.String())
	out.Reset()
	printResult(&out, "backup-web01", workflows.BackupResult{PointID: "P1", HubID: "hub-1", VMName: "web01", Mode: "full",
		Duration: time.Second, Warnings: []string{"retention of VM web01 not started (...): boom"}})
	assert.Contains(t, out.String(), "warning: retention of VM web01 not started (...): boom\n")
	assert.NotContains(t, out.String(), "retention: ")
}
