package vsphere_test

import (
	"crypto/sha1"
	"fmt"
	"strings"
)

func thumbprintSHA1(der []byte) string {
	sum := sha1.Sum(der)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}
