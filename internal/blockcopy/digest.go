package blockcopy

import (
	"crypto/sha256"
	"encoding"
	"encoding/hex"
	"fmt"
	"hash"
)

// pieceEnd is where the digest piece holding off ends: areas are split at multiples of
// the block size, and an area's own end also ends a piece.
func pieceEnd(off, end, blockSize int64) int64 {
	return min(end, (off/blockSize+1)*blockSize)
}

// zeroHasher hashes pieces known to be zero without reading them.
type zeroHasher struct {
	zero     []byte // never written
	fullHash [32]byte
}

func newZeroHasher(blockSize int64) *zeroHasher {
	z := &zeroHasher{zero: make([]byte, blockSize)}
	z.fullHash = sha256.Sum256(z.zero)
	return z
}

func (z *zeroHasher) sum(n int64) [32]byte {
	if n == int64(len(z.zero)) {
		return z.fullHash
	}
	return sha256.Sum256(z.zero[:n])
}

// isZero reports whether b is all zeros.
func (z *zeroHasher) isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(z.zero))
		if string(b[:n]) != string(z.zero[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// digest folds piece hashes in offset order: SHA-256 over the SHA-256 of each piece.
type digest struct {
	h hash.Hash
}

func newDigest(state []byte) (*digest, error) {
	h := sha256.New()
	if len(state) > 0 {
		if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(state); err != nil {
			return nil, fmt.Errorf("restore digest state: %w", err)
		}
	}
	return &digest{h: h}, nil
}

func (d *digest) fold(sum *[32]byte) { d.h.Write(sum[:]) }

// state is nil for a nil digest (SkipDigest).
func (d *digest) state() ([]byte, error) {
	if d == nil {
		return nil, nil
	}
	b, err := d.h.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("save digest state: %w", err)
	}
	return b, nil
}

func (d *digest) hex() string {
	if d == nil {
		return ""
	}
	return hex.EncodeToString(d.h.Sum(nil))
}
