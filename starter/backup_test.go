package main

import (
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"go.temporal.io/sdk/temporal"
)

func TestBackupFailureSaysWhatFailed(t *testing.T) {
	app := temporal.NewNonRetryableApplicationError("invalid backup input: mode: \"often\" is not one of auto, full, incremental", "BadInput", nil)
	err := backupFailure("backup-web01", fmt.Errorf("workflow execution error: %w", app))
	assert.EqualError(t, err, `backup backup-web01 failed: invalid backup input: mode: "often" is not one of auto, full, incremental`)

	err = backupFailure("backup-web01", fmt.Errorf("workflow execution error: %w", temporal.NewCanceledError()))
	assert.EqualError(t, err, "backup backup-web01 was cancelled; its cleanup has run")

	plain := errors.New("connection lost")
	err = backupFailure("backup-web01", plain)
	assert.ErrorIs(t, err, plain)
	assert.Contains(t, err.Error(), "backup backup-web01 failed")
}
