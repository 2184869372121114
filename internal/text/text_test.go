package text

import "testing"

func TestCutAndShorten(t *testing.T) {
	cases := []struct {
		s       string
		n       int
		cut     string
		shorten string
	}{
		{"abc", 5, "abc", "abc"},
		{"abc", 3, "abc", "abc"},
		{"abcdef", 3, "abc", "abc…"},
		{"aé", 2, "a", "a…"}, // é is two bytes: never split
		{"éé", 3, "é", "é…"},
		{"é", 0, "", "…"},
	}
	for _, c := range cases {
		if got := Cut(c.s, c.n); got != c.cut {
			t.Errorf("Cut(%q, %d) = %q, want %q", c.s, c.n, got, c.cut)
		}
		if got := Shorten(c.s, c.n); got != c.shorten {
			t.Errorf("Shorten(%q, %d) = %q, want %q", c.s, c.n, got, c.shorten)
		}
	}
}
