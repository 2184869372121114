// Package text shortens untrusted strings without splitting a UTF-8 character: for
// database columns of bounded size and for error messages that echo a huge value.
package text

import "unicode/utf8"

// Cut returns s cut to at most n bytes, at a character boundary.
func Cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// Shorten is Cut marked with "…" when it cut something, for messages a person reads.
func Shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return Cut(s, n) + "…"
}
