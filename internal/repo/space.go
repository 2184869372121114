package repo

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"syscall"
)

// Space is the state of the file system holding the repository, in bytes.
type Space struct {
	Total int64 // the file system's size
	Free  int64 // available to the hub worker (what statfs calls available: root's reserve excluded)
	Used  int64 // taken, by the repository and anything else on the file system
}

// Space reads the space of the file system holding the repository root.
func (l Layout) Space() (Space, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(l.Root, &st); err != nil {
		return Space{}, fmt.Errorf("space of repository %s: %w", l.Root, err)
	}
	bsize := int64(st.Bsize)
	return Space{
		Total: int64(st.Blocks) * bsize,
		Free:  int64(st.Bavail) * bsize,
		Used:  int64(st.Blocks-st.Bfree) * bsize,
	}, nil
}

// Margin is the free space a backup must leave in the repository, so that qcow2 metadata,
// manifests and a merge in progress never meet ENOSPC. The zero value is the default: 5 %
// of the file system or 1 GiB, whichever is smaller.
type Margin struct {
	bytes   int64
	percent float64
	set     bool
}

// DefaultMarginCap bounds the default margin.
const DefaultMarginCap = 1 << 30

// ErrInvalidMargin is a margin setting that cannot be read.
var ErrInvalidMargin = errors.New("invalid repository margin")

// ParseMargin reads a margin: "" (the default), a percentage of the file system ("5%",
// 0-50) or a size in bytes with an optional binary unit ("0", "512MiB", "2GiB", "1TiB").
func ParseMargin(s string) (Margin, error) {
	orig := s
	s = strings.TrimSpace(s)
	if s == "" {
		return Margin{}, nil
	}
	if pct, ok := strings.CutSuffix(s, "%"); ok {
		p, err := strconv.ParseFloat(strings.TrimSpace(pct), 64)
		if err != nil || p < 0 || p > 50 {
			return Margin{}, fmt.Errorf("%w: %q is not a percentage of 0-50", ErrInvalidMargin, s)
		}
		return Margin{percent: p, set: true}, nil
	}
	unit := int64(1)
	for _, u := range []struct {
		suffix string
		factor int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}} {
		if rest, ok := strings.CutSuffix(s, u.suffix); ok {
			s, unit = strings.TrimSpace(rest), u.factor
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/unit {
		return Margin{}, fmt.Errorf("%w: %q: want a size such as 2GiB or a percentage such as 5%%", ErrInvalidMargin, orig)
	}
	return Margin{bytes: n * unit, set: true}, nil
}

// Of is the margin on a file system of total bytes.
func (m Margin) Of(total int64) int64 {
	switch {
	case !m.set:
		return min(total/20, DefaultMarginCap)
	case m.percent > 0:
		return int64(float64(total) * m.percent / 100)
	}
	return m.bytes
}

// String shows the margin as it was set.
func (m Margin) String() string {
	switch {
	case !m.set:
		return "5% or 1GiB, whichever is smaller"
	case m.percent > 0:
		return strconv.FormatFloat(m.percent, 'f', -1, 64) + "%"
	}
	return strconv.FormatInt(m.bytes, 10) + " bytes"
}
