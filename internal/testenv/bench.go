package testenv

import (
	"slices"
	"time"
)

// Median is the middle of the benchmarks' timed rounds (the mean of the middle two for an
// even count); d is left as it was.
func Median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
