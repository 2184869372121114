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

// zeroHead is how many leading bytes isZero checks one by one.
const zeroHead = 16

// isZero reports whether b is all zeros: its first zeroHead bytes are, and every later byte
// equals the one zeroHead before it. That compares b with itself, one pass over memory the
// copy has just received into, where comparing with a buffer of zeros read that buffer as
// well (perf: 13 % of a copy's CPU on written zeros).
func isZero(b []byte) bool {
	for i := 0; i < len(b) && i < zeroHead; i++ {
		if b[i] != 0 {
			return false
		}
	}
	return len(b) <= zeroHead || string(b[zeroHead:]) == string(b[:len(b)-zeroHead])
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
