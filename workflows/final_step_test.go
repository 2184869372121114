package workflows

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
)

// A finished run's current step (the progress query and the Web UI's "Now:") says it is
// complete, not the last cleanup step it ran.
func TestCompletedRunSaysComplete(t *testing.T) {
	r := newRun(t, activities.ModeFull)
	_, err := r.execute(validInput())
	require.NoError(t, err)
	assert.Equal(t, StatusComplete, r.progress(t).Step)
}
