package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/workflows"
)

// frame renders p into a fresh buffer and returns the frame's lines without the escapes that
// clear them; up is the number of lines the frame first moved the cursor back.
func frame(t *testing.T, v *progressView, out *bytes.Buffer, p workflows.Progress, now time.Time) (lines []string, up string) {
	t.Helper()
	out.Reset()
	v.update(p, now)
	s := out.String()
	if i := strings.Index(s, "\r"); i > 0 {
		up, s = s[:i], s[i:]
	}
	require.True(t, strings.HasSuffix(s, "\n"), "a frame ends its last line: %q", s)
	for _, l := range strings.Split(strings.TrimSuffix(s, "\n"), "\n") {
		require.True(t, strings.HasPrefix(l, "\r\x1b[2K"), "every line is cleared before it is drawn: %q", l)
		lines = append(lines, strings.TrimPrefix(l, "\r\x1b[2K"))
	}
	return lines, up
}

// Two disks copy at once: each frame draws one line per disk, moving back over the previous
// frame; a bar's total is the copy's planned bytes from its first report to the end (not the
// capacity before, nor the bytes read after); the final rate is those bytes over the copy time.
func TestProgressViewOneLinePerDisk(t *testing.T) {
	const mib = 1 << 20
	var out bytes.Buffer
	v := newProgressView(&out, true)
	t0 := time.Date(2026, 1, 1, 1, 0, 0, 0, time.UTC)
	disk := func(key int32, phase string, done, total int64) workflows.DiskProgress {
		return workflows.DiskProgress{Key: key, Mode: "full", Phase: phase, CapacityBytes: 64 * mib, BytesDone: done, BytesTotal: total}
	}

	lines, up := frame(t, v, &out, workflows.Progress{Disks: []workflows.DiskProgress{
		disk(2000, workflows.PhaseWaiting, 0, 64*mib), disk(2001, workflows.PhaseWaiting, 0, 64*mib),
	}}, t0)
	assert.Empty(t, up, "nothing to move back over yet")
	assert.Equal(t, []string{"disk 2000 (full) waiting, 64.0 MiB disk", "disk 2001 (full) waiting, 64.0 MiB disk"}, lines)

	// Disk 2000 reported 10 of its 26 MiB after 2 s; disk 2001 has not reported yet.
	a := disk(2000, workflows.PhaseCopying, 10*mib, 26*mib)
	a.CopyStarted = t0
	b := disk(2001, workflows.PhaseCopying, 0, 64*mib)
	b.CopyStarted = t0
	lines, up = frame(t, v, &out, workflows.Progress{Disks: []workflows.DiskProgress{a, b}}, t0.Add(2*time.Second))
	assert.Equal(t, "\x1b[2A", up, "the frame redraws the two lines of the previous one")
	require.Len(t, lines, 2)
	assert.Equal(t, "disk 2000 (full) ["+strings.Repeat("=", 11)+strings.Repeat(" ", 19)+"]  38% 10.0 MiB / 26.0 MiB, 5.0 MiB/s copying", lines[0])
	assert.Equal(t, "disk 2001 (full) copying, 64.0 MiB disk", lines[1])

	// Disk 2000 is copied: the workflow now says 20 MiB read (holes left out) in 1 s of copy.
	a = disk(2000, workflows.PhaseVerifying, 20*mib, 20*mib)
	a.CopyStarted, a.CopyDuration = t0, time.Second
	b = disk(2001, workflows.PhaseCopying, 8*mib, 32*mib)
	b.CopyStarted = t0
	lines, up = frame(t, v, &out, workflows.Progress{Disks: []workflows.DiskProgress{a, b}}, t0.Add(4*time.Second))
	assert.Equal(t, "\x1b[2A", up)
	require.Len(t, lines, 2)
	assert.Equal(t, "disk 2000 (full) ["+strings.Repeat("=", 30)+"] 100% 26.0 MiB / 26.0 MiB, 26.0 MiB/s verifying", lines[0])
	assert.Equal(t, "disk 2001 (full) ["+strings.Repeat("=", 7)+strings.Repeat(" ", 23)+"]  25% 8.0 MiB / 32.0 MiB, 2.0 MiB/s copying", lines[1])
}

func TestProgressViewOffPrintsNothing(t *testing.T) {
	var out bytes.Buffer
	newProgressView(&out, false).update(workflows.Progress{Disks: []workflows.DiskProgress{{Key: 2000, Phase: workflows.PhaseCopying}}}, time.Now())
	assert.Empty(t, out.String())
}
