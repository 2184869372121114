package workflows

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"unicode"

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

// jobLog is the run's current details: a title, the current step, the worker it waits for
// and the steps so far, so the Web UI reads like a job log. The Web UI renders the details as
// markdown, and VM names, paths and error messages come from users and vCenter: every piece
// of text is escaped, only the log's own layout is markup.
type jobLog struct {
	title   string
	current string
	waiting string
	// copyWaits is what each disk's copy waits for on the SNA (CopyWaitSignal), by disk key.
	copyWaits map[int32]string
	lines     []string
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
	workflow.SetCurrentDetails(ctx, j.render())
}

func (j *jobLog) render() string {
	var s strings.Builder
	fmt.Fprintf(&s, "**%s**\n\nNow: %s\n\n", escapeMarkdown(j.title), escapeMarkdown(j.current))
	if j.waiting != "" {
		fmt.Fprintf(&s, "Waiting for: %s\n\n", escapeMarkdown(j.waiting))
	}
	for _, key := range slices.Sorted(maps.Keys(j.copyWaits)) {
		fmt.Fprintf(&s, "Waiting for: %s (disk %d)\n\n", escapeMarkdown(j.copyWaits[key]), key)
	}
	for _, l := range j.lines {
		s.WriteString("- " + escapeMarkdown(l) + "\n")
	}
	return s.String()
}

// markdownSpecial are the characters that start inline markup: emphasis, code, links and
// images, raw HTML and entities, strikethrough, table cells, e-mail autolinks. Block markup
// (headings, lists) needs a line start, and every line of the log starts with its own text.
const markdownSpecial = "\\`*_[]<>&~|@!"

// escapeMarkdown makes untrusted text render as itself: markdownSpecial characters are
// backslash-escaped, and so are the ':' of "://" and the '.' of "www." that GitHub-flavoured
// markdown would turn into links; line breaks and other control characters become spaces.
func escapeMarkdown(s string) string {
	var b strings.Builder
	b.Grow(len(s) + len(s)/8)
	for i, r := range s {
		switch {
		case unicode.IsControl(r):
			b.WriteByte(' ')
		case strings.ContainsRune(markdownSpecial, r),
			r == ':' && strings.HasPrefix(s[i+1:], "/"),
			r == '.' && i >= 3 && strings.EqualFold(s[i-3:i], "www"):
			b.WriteByte('\\')
			b.WriteRune(r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}
