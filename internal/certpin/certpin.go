// Package certpin pins TLS certificates by thumbprint: the SHA-1 or SHA-256 digest of the
// DER certificate, as vCenter shows it. Config validation, the vSphere client and the
// datastore HTTPS source all read and compare pins here, so they agree on the format.
package certpin

import (
	"crypto/sha1"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"strings"
)

// Pin is a certificate thumbprint: 20 bytes (SHA-1) or 32 bytes (SHA-256).
type Pin []byte

// Parse reads a thumbprint in hex, upper or lower case, with or without ':' (or ' ', '-')
// between the pairs.
func Parse(s string) (Pin, error) {
	clean := strings.NewReplacer(":", "", " ", "", "-", "").Replace(strings.TrimSpace(s))
	b, err := hex.DecodeString(clean)
	if err != nil || (len(b) != sha1.Size && len(b) != sha256.Size) {
		return nil, fmt.Errorf("thumbprint %q is not a SHA-1 or SHA-256 fingerprint (hex pairs, e.g. AB:CD:...)", s)
	}
	return Pin(b), nil
}

// String is the form vCenter and govmomi use: upper-case hex pairs joined by ':'.
func (p Pin) String() string { return format(p) }

// Matches reports whether the DER certificate has this thumbprint.
func (p Pin) Matches(der []byte) bool {
	var sum []byte
	switch len(p) {
	case sha1.Size:
		s := sha1.Sum(der)
		sum = s[:]
	case sha256.Size:
		s := sha256.Sum256(der)
		sum = s[:]
	default:
		return false
	}
	return subtle.ConstantTimeCompare(sum, p) == 1
}

// Thumbprints returns the SHA-1 and SHA-256 thumbprints of a DER certificate, for errors
// that tell an operator what the server presents.
func Thumbprints(der []byte) (sha1Print, sha256Print string) {
	s1 := sha1.Sum(der)
	s256 := sha256.Sum256(der)
	return format(s1[:]), format(s256[:])
}

func format(b []byte) string {
	parts := make([]string, len(b))
	for i, x := range b {
		parts[i] = fmt.Sprintf("%02X", x)
	}
	return strings.Join(parts, ":")
}
