package blockcopy

import (
	"bytes"
	"testing"
)

// isZero agrees with a byte-by-byte check for every length up to a few heads and a
// non-zero byte at every position, and for a whole request of zeros.
func TestIsZeroFindsEveryNonZeroByte(t *testing.T) {
	for n := range 4*zeroHead + 3 {
		b := make([]byte, n)
		if !isZero(b) {
			t.Fatalf("%d zeros: not zero", n)
		}
		for i := range n {
			for _, v := range []byte{1, 0x80, 0xff} {
				b[i] = v
				if isZero(b) {
					t.Fatalf("%d bytes with %#x at %d: zero", n, v, i)
				}
				b[i] = 0
			}
		}
	}
	big := make([]byte, DefaultRequestSize)
	if !isZero(big) {
		t.Fatal("a request of zeros: not zero")
	}
	// Every byte equal to the one zeroHead before it, but not zero.
	periodic := bytes.Repeat([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7}, 1024)
	if isZero(periodic) {
		t.Fatal("a periodic non-zero pattern: zero")
	}
	big[len(big)-1] = 1
	if isZero(big) {
		t.Fatal("a request with its last byte set: zero")
	}
}
