package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/diskferry/diskferry/workflows"
)

// barWidth is the width of a disk's bar in characters.
const barWidth = 30

// progressView draws one line per disk of a backup or restore on a terminal and redraws them in place
// (the cursor moves back up over the previous frame); elsewhere it prints nothing.
//
// A bar's total is the bytes its copy planned to move (the copied areas: a full copy's
// allocated areas, an incremental's changed areas), the first figure the copy reports. Until
// then the line shows the disk's capacity and phase without a bar, and the total never changes
// afterwards: the workflow later reports bytes read instead, which leave out holes. The rate
// is the bar's bytes per second of copy time: since the copy was scheduled while it runs, over
// the copy's own duration once it finished.
type progressView struct {
	out    io.Writer
	on     bool
	lines  int             // lines of the last frame, to move back over
	totals map[int32]int64 // each disk's bar total, fixed once known
}

func newProgressView(out io.Writer, on bool) *progressView {
	return &progressView{out: out, on: on, totals: map[int32]int64{}}
}

// update draws a frame of p as of now.
func (v *progressView) update(p workflows.Progress, now time.Time) {
	if !v.on || len(p.Disks) == 0 {
		return
	}
	var b strings.Builder
	if v.lines > 0 {
		fmt.Fprintf(&b, "\x1b[%dA", v.lines)
	}
	for _, d := range p.Disks {
		b.WriteString("\r\x1b[2K")
		b.WriteString(v.line(d, now))
		b.WriteByte('\n')
	}
	v.lines = len(p.Disks)
	_, _ = io.WriteString(v.out, b.String())
}

// line renders one disk.
func (v *progressView) line(d workflows.DiskProgress, now time.Time) string {
	head := fmt.Sprintf("disk %d", d.Key)
	if d.Mode != "" { // a backup's full or incremental; a restore has none
		head += " (" + d.Mode + ")"
	}
	total, known := v.totals[d.Key]
	if !known {
		if total, known = plannedTotal(d); known {
			v.totals[d.Key] = total
		}
	}
	if !known {
		return fmt.Sprintf("%s %s, %s disk", head, d.Phase, humanBytes(d.CapacityBytes))
	}
	done := min(d.BytesDone, total)
	var rate float64
	switch d.Phase {
	case workflows.PhaseCopying:
		if secs := now.Sub(d.CopyStarted).Seconds(); !d.CopyStarted.IsZero() && secs > 0 {
			rate = float64(done) / secs
		}
	case workflows.PhaseFailed:
	default: // copied: verifying or done
		done = total
		if secs := d.CopyDuration.Seconds(); secs > 0 {
			rate = float64(total) / secs
		}
	}
	filled := barWidth
	if total > 0 {
		filled = int(int64(barWidth) * done / total)
	}
	bar := strings.Repeat("=", filled) + strings.Repeat(" ", barWidth-filled)
	pct := 100
	if total > 0 {
		pct = int(100 * done / total)
	}
	line := fmt.Sprintf("%s [%s] %3d%% %s / %s", head, bar, pct, humanBytes(done), humanBytes(total))
	if rate > 0 {
		line += fmt.Sprintf(", %s/s", humanBytes(int64(rate)))
	}
	return line + " " + d.Phase
}

// plannedTotal is the bytes the disk's copy planned to move, once the copy reported them.
func plannedTotal(d workflows.DiskProgress) (int64, bool) {
	switch d.Phase {
	case workflows.PhaseWaiting, workflows.PhaseExporting, workflows.PhaseFailed:
		return 0, false
	case workflows.PhaseCopying:
		// Before the copy's first heartbeat the workflow only knows the capacity.
		return d.BytesTotal, d.BytesDone > 0 || d.BytesTotal != d.CapacityBytes
	default: // copied: the workflow's figure is all there is if no heartbeat was seen
		return d.BytesTotal, d.BytesTotal > 0
	}
}
