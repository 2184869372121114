// Package retention decides which restore points a policy keeps. It is pure: the caller
// loads the points from the catalog and carries out the decisions.
package retention

import (
	"errors"
	"fmt"
	"time"
)

// Policy is what a VM keeps. Zero counts are unused; all zero keeps everything. The newest
// point is always kept.
type Policy struct {
	KeepLast int `json:"keepLast"` // the newest N points
	// GFS: the newest point of each of the last N UTC days / ISO weeks / months / years that
	// have points.
	Daily   int `json:"daily"`
	Weekly  int `json:"weekly"`
	Monthly int `json:"monthly"`
	Yearly  int `json:"yearly"`
	// MaxChain: no kept point's restore reads more than MaxChain+1 files; a deeper point is
	// flattened (made full). 0: unbounded.
	MaxChain int `json:"maxChain"`
}

// Bounds of a policy: a count above them is a typo, not an intent (MaxCount daily points
// are 27 years).
const (
	MaxCount = 10000
	MaxChain = 1000
)

// ErrInvalid is a policy with a negative or absurd field.
var ErrInvalid = errors.New("invalid retention policy")

// Validate checks every field and names each one out of bounds.
func (p Policy) Validate() error {
	var errs []error
	for _, f := range []struct {
		name  string
		value int
		max   int
	}{
		{"keep-last", p.KeepLast, MaxCount}, {"daily", p.Daily, MaxCount}, {"weekly", p.Weekly, MaxCount},
		{"monthly", p.Monthly, MaxCount}, {"yearly", p.Yearly, MaxCount}, {"max-chain", p.MaxChain, MaxChain},
	} {
		if f.value < 0 || f.value > f.max {
			errs = append(errs, fmt.Errorf("%w: %s %d is not 0-%d", ErrInvalid, f.name, f.value, f.max))
		}
	}
	return errors.Join(errs...)
}

// KeepsAll says the policy removes nothing by itself (MaxChain may still flatten).
func (p Policy) KeepsAll() bool {
	return p.KeepLast == 0 && p.Daily == 0 && p.Weekly == 0 && p.Monthly == 0 && p.Yearly == 0
}

// Point is one complete restore point, as Select needs it.
type Point struct {
	ID         string
	FinishedAt time.Time
	// Parent is the point this one builds on ("" for a full point). A point whose parent is
	// not among the points given counts as full.
	Parent string
	// Delete: the operator deletes the point; it goes whatever the policy says, the newest
	// too.
	Delete bool
}

// Decision is one point's fate and why.
type Decision struct {
	ID      string
	Keep    bool
	Reasons []string // why kept; "not kept by the policy" otherwise
	// Flatten: the point is kept and must be made full so that its restore reads at most
	// MaxChain+1 files once the points not kept are merged away.
	Flatten bool
}

// Reasons Select gives.
const (
	ReasonNewest   = "newest"
	ReasonAll      = "no policy"
	ReasonNotKept  = "not kept by the policy"
	ReasonDeleted  = "deleted by operator"
	ReasonMaxChain = "chain longer than %d files"
	reasonKeepLast = "last %d"
	reasonDaily    = "daily %s"
	reasonWeekly   = "weekly %s"
	reasonMonthly  = "monthly %s"
	reasonYearly   = "yearly %s"
)

// Period layouts of GFS reasons.
const (
	dayLayout   = "2006-01-02"
	monthLayout = "2006-01"
	yearLayout  = "2006"
)

// Select decides for points, oldest first (by finish time; ties keep the given order), which
// the policy keeps, and which kept points must be flattened. The newest point is kept unless
// the operator deletes it; a deleted point goes whatever the policy says. The result is in
// the order given.
func Select(points []Point, policy Policy) ([]Decision, error) {
	if err := policy.Validate(); err != nil {
		return nil, err
	}
	out := make([]Decision, len(points))
	seen := make(map[string]bool, len(points))
	for i, p := range points {
		if seen[p.ID] {
			return nil, fmt.Errorf("point %s is given twice", p.ID)
		}
		seen[p.ID] = true
		if i > 0 && p.FinishedAt.Before(points[i-1].FinishedAt) {
			return nil, fmt.Errorf("points are not oldest first: %s finished before %s", p.ID, points[i-1].ID)
		}
		out[i].ID = p.ID
	}
	if len(points) == 0 {
		return out, nil
	}
	keep := func(i int, reason string) {
		out[i].Keep = true
		out[i].Reasons = append(out[i].Reasons, reason)
	}
	last := len(points) - 1
	keep(last, ReasonNewest)
	if policy.KeepsAll() {
		for i := range last {
			keep(i, ReasonAll)
		}
	}
	for i := last; i >= 0 && i > last-policy.KeepLast; i-- {
		keep(i, fmt.Sprintf(reasonKeepLast, policy.KeepLast))
	}
	for _, g := range []struct {
		count  int
		period func(time.Time) string
		reason string
	}{
		{policy.Daily, func(t time.Time) string { return t.Format(dayLayout) }, reasonDaily},
		{policy.Weekly, isoWeek, reasonWeekly},
		{policy.Monthly, func(t time.Time) string { return t.Format(monthLayout) }, reasonMonthly},
		{policy.Yearly, func(t time.Time) string { return t.Format(yearLayout) }, reasonYearly},
	} {
		periods := 0
		prev := ""
		// Newest first: the first point met in a period is its newest.
		for i := last; i >= 0 && g.count > 0; i-- {
			period := g.period(points[i].FinishedAt.UTC())
			if period == prev {
				continue
			}
			prev = period
			if periods == g.count {
				break
			}
			periods++
			keep(i, fmt.Sprintf(g.reason, period))
		}
	}
	for i, p := range points {
		switch {
		case p.Delete:
			out[i] = Decision{ID: p.ID, Reasons: []string{ReasonDeleted}}
		case !out[i].Keep:
			out[i].Reasons = []string{ReasonNotKept}
		}
	}
	if policy.MaxChain > 0 {
		markFlatten(points, out, policy.MaxChain)
	}
	return out, nil
}

// isoWeek names a UTC time's ISO 8601 week, e.g. 2026-W49.
func isoWeek(t time.Time) string {
	y, w := t.ISOWeek()
	return fmt.Sprintf("%d-W%02d", y, w)
}

// markFlatten bounds the chains of the kept points. Dropping a point merges its data into
// its child, so a kept point's restore reads one file per kept point from its full base
// (or the nearest flattened one) to itself: depth counts kept ancestors only. Walking
// oldest first, a kept point whose depth would exceed maxChain+1 is flattened and starts a
// new chain.
func markFlatten(points []Point, out []Decision, maxChain int) {
	index := make(map[string]int, len(points))
	depth := make([]int, len(points)) // files a restore of a kept point reads, after the merges
	for i, p := range points {
		index[p.ID] = i
	}
	// keptDepth is the depth a child of point i builds on: i's own if kept, else that of
	// i's nearest kept ancestor (a dropped point's data moves into its child).
	keptDepth := func(i int) int {
		for {
			if out[i].Keep {
				return depth[i]
			}
			parent, ok := index[points[i].Parent]
			if !ok || parent >= i {
				return 0
			}
			i = parent
		}
	}
	for i, p := range points {
		if !out[i].Keep {
			continue
		}
		d := 1 // a full point's own file
		if parent, ok := index[p.Parent]; ok && parent < i {
			d = keptDepth(parent) + 1
		}
		if d > maxChain+1 {
			out[i].Flatten = true
			out[i].Reasons = append(out[i].Reasons, fmt.Sprintf(ReasonMaxChain, maxChain+1))
			d = 1
		}
		depth[i] = d
	}
}
