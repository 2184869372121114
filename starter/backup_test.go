package main

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"go.temporal.io/sdk/temporal"
)

func TestRunFailureSaysWhatFailed(t *testing.T) {
	app := temporal.NewNonRetryableApplicationError("invalid backup input: mode: \"often\" is not one of auto, full, incremental", "BadInput", nil)
	err := runFailure("backup", "backup-web01", fmt.Errorf("workflow execution error: %w", app))
	assert.EqualError(t, err, `backup backup-web01 failed: invalid backup input: mode: "often" is not one of auto, full, incremental`)

	err = runFailure("backup", "backup-web01", fmt.Errorf("workflow execution error: %w", temporal.NewCanceledError()))
	assert.EqualError(t, err, "backup backup-web01 was cancelled; its cleanup has run")

	plain := errors.New("connection lost")
	err = runFailure("backup", "backup-web01", plain)
	assert.ErrorIs(t, err, plain)
	assert.Contains(t, err.Error(), "backup backup-web01 failed")
}

// An unknown --status is refused before anything is asked of Temporal (no server here).
func TestBackupListRefusesUnknownStatus(t *testing.T) {
	t.Setenv("DISKFERRY_TEMPORAL_ADDRESS", "127.0.0.1:1")
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs([]string{"backup", "list", "--status", "bogus"})
	err := root.Execute()
	assert.EqualError(t, err, `--status "bogus" is not one of running, copying, verifying, complete, failed, cancelled`)
}

// Every command's help names the variables that point it at Temporal.
func TestHelpListsEnvironment(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"backup", "start", "--help"}, {"schedule", "trigger", "--help"}, {"restore", "file", "--help"}, {"mount", "--help"}, {"unmount", "--help"}} {
		root := newRootCommand()
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetArgs(args)
		assert.NoError(t, root.Execute())
		assert.Contains(t, out.String(), "DISKFERRY_TEMPORAL_ADDRESS", "%v", args)
		assert.Contains(t, out.String(), "DISKFERRY_TEMPORAL_NAMESPACE", "%v", args)
	}
}
