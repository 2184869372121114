// Package limits holds the SNA's copy limits: a bandwidth syntax ("50Mbit", "12.5MB/s"), a
// token bucket that paces a copy's data writes (per site and per job), and the slots that
// cap how many disk copies one SNA runs at once.
package limits

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// MinRate is the smallest bandwidth limit accepted, in bytes per second (1 Mbit/s): below
// it a disk copy would not end in any useful time (one 2 MiB request already takes 17 s).
const MinRate = 125_000

// rateUnits are the accepted suffixes, longest first where one ends another ("Mbit/s"
// before "bit/s"). Bit units are decimal (network convention); byte units are decimal
// (KB, MB, GB) or binary (KiB, MiB, GiB) as written. Byte units need "/s" so a rate is
// never mistaken for a size.
var rateUnits = []struct {
	suffix string
	bytes  float64 // bytes per second of one unit
}{
	{"Gbit/s", 1e9 / 8}, {"Mbit/s", 1e6 / 8}, {"kbit/s", 1e3 / 8}, {"Kbit/s", 1e3 / 8}, {"bit/s", 1.0 / 8},
	{"Gbps", 1e9 / 8}, {"Mbps", 1e6 / 8}, {"kbps", 1e3 / 8}, {"Kbps", 1e3 / 8}, {"bps", 1.0 / 8},
	{"Gbit", 1e9 / 8}, {"Mbit", 1e6 / 8}, {"kbit", 1e3 / 8}, {"Kbit", 1e3 / 8}, {"bit", 1.0 / 8},
	{"GiB/s", 1 << 30}, {"MiB/s", 1 << 20}, {"KiB/s", 1 << 10},
	{"GB/s", 1e9}, {"MB/s", 1e6}, {"KB/s", 1e3}, {"kB/s", 1e3}, {"B/s", 1},
}

// ParseRate reads a bandwidth such as "50Mbit", "1Gbit", "200Mbit/s", "12.5MB/s" or
// "800KiB/s" and returns it in bytes per second; "" means no limit (0). Anything else,
// or a rate below MinRate, is an error saying what is accepted.
func ParseRate(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, nil
	}
	for _, u := range rateUnits {
		num, ok := strings.CutSuffix(s, u.suffix)
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
		if err != nil || math.IsNaN(v) || math.IsInf(v, 0) || v <= 0 {
			break
		}
		perSec := v * u.bytes
		if perSec >= math.MaxInt64/2 {
			return 0, fmt.Errorf("bandwidth %q is too large", s)
		}
		if perSec < MinRate {
			return 0, fmt.Errorf("bandwidth %q is below the minimum of 1Mbit", s)
		}
		return int64(math.Round(perSec)), nil
	}
	return 0, fmt.Errorf("%q is not a bandwidth (e.g. 50Mbit, 1Gbit, 12.5MB/s, 800KiB/s)", s)
}

// FormatRate renders bytes per second for logs and messages: "50Mbit/s (6.25MB/s)";
// 0 is "unlimited".
func FormatRate(bytesPerSec int64) string {
	if bytesPerSec <= 0 {
		return "unlimited"
	}
	bits := float64(bytesPerSec) * 8
	return fmt.Sprintf("%sbit/s (%sB/s)", decimal(bits), decimal(float64(bytesPerSec)))
}

// decimal writes v with a decimal prefix and at most three decimals.
func decimal(v float64) string {
	for _, p := range []struct {
		prefix string
		factor float64
	}{{"G", 1e9}, {"M", 1e6}, {"k", 1e3}} {
		if v >= p.factor {
			return strconv.FormatFloat(math.Round(v/p.factor*1000)/1000, 'f', -1, 64) + p.prefix
		}
	}
	return strconv.FormatFloat(v, 'f', 0, 64)
}
