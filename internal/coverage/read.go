package coverage

import (
	"bytes"
	"context"
	"fmt"

	"github.com/diskferry/diskferry/internal/nbd"
)

// readChunk bounds one read; partial ranges are shorter than two clusters anyway.
const readChunk = 1 << 20

// Differing reads each range from the export at uri and compares it with the same range of
// the export at refURI, or with zeros when refURI is empty. It returns the ranges that
// differ, whole. Partial ranges are few and short (at most two per area, each under two
// clusters), so one connection per side suffices.
func Differing(ctx context.Context, uri, refURI string, ranges []Extent, opts nbd.Options) ([]Extent, error) {
	if len(ranges) == 0 {
		return nil, nil
	}
	// The buffers are allocated first so they are freed after the handles close: a
	// cancelled read may hold one until then.
	buf, err := nbd.NewBuffer(readChunk)
	if err != nil {
		return nil, err
	}
	defer buf.Free()
	var refBuf *nbd.Buffer
	if refURI != "" {
		if refBuf, err = nbd.NewBuffer(readChunk); err != nil {
			return nil, err
		}
		defer refBuf.Free()
	}
	img, err := nbd.Connect(ctx, uri, opts)
	if err != nil {
		return nil, fmt.Errorf("compare partial clusters: %w", err)
	}
	defer img.Close()
	var ref *nbd.Handle
	if refURI != "" {
		if ref, err = nbd.Connect(ctx, refURI, opts); err != nil {
			return nil, fmt.Errorf("compare partial clusters with the parent: %w", err)
		}
		defer ref.Close()
	}
	var differ []Extent
	for _, r := range ranges {
		for off := r.Start; off < r.End(); off += readChunk {
			n := int(min(readChunk, r.End()-off))
			if err := img.Pread(ctx, buf, 0, n, off); err != nil {
				return nil, fmt.Errorf("read target at %d+%d: %w", off, n, err)
			}
			same := allZero(buf.Bytes()[:n])
			if ref != nil {
				if err := ref.Pread(ctx, refBuf, 0, n, off); err != nil {
					return nil, fmt.Errorf("read parent at %d+%d: %w", off, n, err)
				}
				same = bytes.Equal(buf.Bytes()[:n], refBuf.Bytes()[:n])
			}
			if !same {
				differ = append(differ, r)
				break
			}
		}
	}
	return differ, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
