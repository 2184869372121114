//go:build record

// The recorder rewrites testdata/*.json; it is built only with -tags record, so a normal
// test run never touches the recorded histories.

package workflows

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/api/temporalproto"
	"go.temporal.io/sdk/client"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/testenv"
)

// TestRecordHistories runs the recorded scenarios on a real Temporal dev server, with the fake
// activities on real workers under the contract's names and queues, and writes their
// histories to testdata. Run it after an intended, versioned change of the workflow:
//
//	go test -tags record ./workflows -run TestRecordHistories
func TestRecordHistories(t *testing.T) {
	srv := testenv.StartTemporal(t)
	scenarios := []struct {
		file    string
		mode    string
		prepare func(f *fakeActivities, cancel func())
		wantErr bool
	}{
		{file: "backup_full.json", mode: activities.ModeFull},
		{file: "backup_incremental.json", mode: activities.ModeIncremental},
		{file: "backup_copy_failure.json", mode: activities.ModeFull, wantErr: true,
			prepare: func(f *fakeActivities, _ func()) { f.fail["CopyDisk 2001"] = injected("CopyDisk 2001") }},
		{file: "backup_cancel_during_copy.json", mode: activities.ModeFull, wantErr: true,
			prepare: func(f *fakeActivities, cancel func()) { f.blockAt, f.onBlock = "CopyDisk 2001", cancel }},
	}
	for _, sc := range scenarios {
		t.Run(sc.file, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			in := validInput()
			in.Mode = sc.mode
			opts := StartBackupOptions(in)
			f := newFakeActivities(sc.mode)
			t.Cleanup(func() { close(f.release) })
			if sc.prepare != nil {
				sc.prepare(f, func() {
					go func() {
						if err := srv.Client.CancelWorkflow(ctx, opts.ID, ""); err != nil {
							t.Errorf("cancel %s: %v", opts.ID, err)
						}
					}()
				})
			}
			startWorkers(t, srv.Client, f)

			run, err := srv.Client.ExecuteWorkflow(ctx, opts, BackupWorkflowName, in)
			require.NoError(t, err)
			var res BackupResult
			err = run.Get(ctx, &res)
			if sc.wantErr {
				require.Error(t, err)
			} else {
				require.NoError(t, err)
				require.Equal(t, "p1", res.PointID)
			}
			writeHistory(ctx, t, srv.Client, run, historyPath(sc.file))
		})
	}
}

func writeHistory(ctx context.Context, t *testing.T, c client.Client, run client.WorkflowRun, path string) {
	t.Helper()
	var hist historypb.History
	iter := c.GetWorkflowHistory(ctx, run.GetID(), run.GetRunID(), false, 0)
	for iter.HasNext() {
		event, err := iter.Next()
		require.NoError(t, err)
		hist.Events = append(hist.Events, event)
	}
	data, err := temporalproto.CustomJSONMarshalOptions{Indent: "  "}.Marshal(&hist)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, append(data, '\n'), 0o644))
	t.Logf("recorded %d events into %s", len(hist.Events), path)
}
