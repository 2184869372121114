package workflows

import (
	"fmt"
	"strings"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"
)

// Search attributes of a backup run, all Keyword; the server must have them registered
// (`temporal operator search-attribute create` or `server start-dev --search-attribute`).
var (
	VMNameKey       = temporal.NewSearchAttributeKeyKeyword("VMName")
	SiteKey         = temporal.NewSearchAttributeKeyKeyword("Site")
	BackupModeKey   = temporal.NewSearchAttributeKeyKeyword("BackupMode")
	BackupStatusKey = temporal.NewSearchAttributeKeyKeyword("BackupStatus")
)

// SearchAttributeKeys lists the keys to register on a server.
func SearchAttributeKeys() []temporal.SearchAttributeKey {
	return []temporal.SearchAttributeKey{VMNameKey, SiteKey, BackupModeKey, BackupStatusKey}
}

// BackupStatus values, in the order a successful run passes them.
const (
	StatusRunning   = "running"
	StatusCopying   = "copying"
	StatusVerifying = "verifying"
	StatusComplete  = "complete"
	StatusFailed    = "failed"
	StatusCancelled = "cancelled"
)

// jobLog is the run's current details: a title, the current step and the steps so far, so the
// Web UI reads like a job log.
type jobLog struct {
	title   string
	current string
	lines   []string
}

// add appends a line to the log.
func (j *jobLog) add(ctx workflow.Context, format string, args ...any) {
	line := workflow.Now(ctx).UTC().Format("15:04:05") + " " + fmt.Sprintf(format, args...)
	j.lines = append(j.lines, line)
	j.publish(ctx, j.current)
}

// publish sets the current step and refreshes the details.
func (j *jobLog) publish(ctx workflow.Context, current string) {
	j.current = current
	var s strings.Builder
	fmt.Fprintf(&s, "**%s**\n\nNow: %s\n\n", j.title, current)
	for _, l := range j.lines {
		s.WriteString("- " + l + "\n")
	}
	workflow.SetCurrentDetails(ctx, s.String())
}
