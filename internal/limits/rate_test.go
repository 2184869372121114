package limits_test

import (
	"strings"
	"testing"

	"github.com/diskferry/diskferry/internal/limits"
)

func TestParseRate(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{
		{"", 0},
		{"50Mbit", 6_250_000},
		{"50Mbit/s", 6_250_000},
		{"50Mbps", 6_250_000},
		{" 200Mbit ", 25_000_000},
		{"1Gbit", 125_000_000},
		{"1.5Gbit", 187_500_000},
		{"1000kbit", 125_000},
		{"12.5MB/s", 12_500_000},
		{"800KiB/s", 819_200},
		{"1MiB/s", 1 << 20},
		{"2GiB/s", 2 << 30},
		{"125000B/s", 125_000},
		{"10 Mbit", 1_250_000},
	} {
		got, err := limits.ParseRate(tc.in)
		if err != nil {
			t.Errorf("ParseRate(%q): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseRate(%q) = %d, want %d", tc.in, got, tc.want)
		}
	}
}

func TestParseRateRejects(t *testing.T) {
	for _, tc := range []struct{ in, wantErr string }{
		{"50", "not a bandwidth"},
		{"50MB", "not a bandwidth"}, // a size, not a rate
		{"fast", "not a bandwidth"},
		{"Mbit", "not a bandwidth"},
		{"-5Mbit", "not a bandwidth"},
		{"0Mbit", "not a bandwidth"},
		{"NaNMbit", "not a bandwidth"},
		{"50mbit", "not a bandwidth"}, // millibits: refused rather than guessed
		{"999kbit", "below the minimum of 1Mbit"},
		{"100000000000Gbit", "too large"},
	} {
		_, err := limits.ParseRate(tc.in)
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("ParseRate(%q) = %v, want an error containing %q", tc.in, err, tc.wantErr)
		}
	}
}

func TestFormatRate(t *testing.T) {
	for _, tc := range []struct {
		in   int64
		want string
	}{
		{0, "unlimited"},
		{6_250_000, "50Mbit/s (6.25MB/s)"},
		{125_000_000, "1Gbit/s (125MB/s)"},
		{819_200, "6.554Mbit/s (819.2kB/s)"},
	} {
		if got := limits.FormatRate(tc.in); got != tc.want {
			t.Errorf("FormatRate(%d) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
