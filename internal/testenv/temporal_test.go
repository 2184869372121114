package testenv

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"
)

func greetWorkflow(ctx workflow.Context, name string) (string, error) {
	return "hello " + name, nil
}

func TestStartTemporalRunsWorkflowAndFindsItBySearchAttribute(t *testing.T) {
	srv := StartTemporal(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	const queue = "testenv-smoke"
	w := worker.New(srv.Client, queue, worker.Options{})
	w.RegisterWorkflowWithOptions(greetWorkflow, workflow.RegisterOptions{Name: "Greet"})
	if err := w.Start(); err != nil {
		t.Fatalf("start worker: %v", err)
	}
	t.Cleanup(w.Stop)

	vmName := fmt.Sprintf("vm-%d", time.Now().UnixNano())
	run, err := srv.Client.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID:        "smoke-" + vmName,
		TaskQueue: queue,
		TypedSearchAttributes: temporal.NewSearchAttributes(
			temporal.NewSearchAttributeKeyKeyword("VMName").ValueSet(vmName),
			temporal.NewSearchAttributeKeyKeyword("BackupStatus").ValueSet("running"),
		),
	}, "Greet", "ferry")
	if err != nil {
		t.Fatalf("start workflow: %v", err)
	}
	var greeting string
	if err := run.Get(ctx, &greeting); err != nil {
		t.Fatalf("workflow result: %v", err)
	}
	if greeting != "hello ferry" {
		t.Fatalf("greeting %q, want %q", greeting, "hello ferry")
	}

	// Visibility is eventually consistent; poll until the query sees the run.
	query := fmt.Sprintf("VMName = '%s' AND BackupStatus = 'running'", vmName)
	for {
		resp, err := srv.Client.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
			Namespace: srv.Namespace,
			Query:     query,
		})
		if err != nil {
			t.Fatalf("list workflows %q: %v", query, err)
		}
		if len(resp.Executions) == 1 && resp.Executions[0].Execution.RunId == run.GetRunID() {
			return
		}
		if len(resp.Executions) > 1 {
			t.Fatalf("query %q matched %d executions, want 1", query, len(resp.Executions))
		}
		select {
		case <-ctx.Done():
			t.Fatalf("workflow %s not found by %q: %v", run.GetID(), query, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
