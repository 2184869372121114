package blockcopy

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// A manifest lists the SHA-256 of every piece of the copied areas (the areas split at
// BlockSize), in offset order, holes included as the hash of zeros. The digest only says
// whether a whole copy matches; the manifest names the blocks that differ. Text, one line
// per piece, streamed while copying, so its size never counts against memory:
//
//	diskferry-manifest v1 block-size 1048576
//	0 1048576 9f86d08...
const manifestHeader = "diskferry-manifest v1 block-size "

// BlockHash is one manifest entry.
type BlockHash struct {
	Offset, Length int64
	Sum            [32]byte
}

// ManifestWriter writes a manifest; pass its Add as Options.OnBlock.
type ManifestWriter struct {
	w *bufio.Writer
}

// NewManifestWriter writes the header for pieces of blockSize bytes.
func NewManifestWriter(w io.Writer, blockSize int64) (*ManifestWriter, error) {
	m := &ManifestWriter{w: bufio.NewWriter(w)}
	if _, err := fmt.Fprintf(m.w, "%s%d\n", manifestHeader, blockSize); err != nil {
		return nil, fmt.Errorf("write manifest: %w", err)
	}
	return m, nil
}

// Add writes one entry.
func (m *ManifestWriter) Add(b BlockHash) error {
	if _, err := fmt.Fprintf(m.w, "%d %d %x\n", b.Offset, b.Length, b.Sum); err != nil {
		return fmt.Errorf("write manifest: %w", err)
	}
	return nil
}

// Flush writes what is buffered.
func (m *ManifestWriter) Flush() error {
	if err := m.w.Flush(); err != nil {
		return fmt.Errorf("write manifest: %w", err)
	}
	return nil
}

// ReadManifest parses a manifest, calling fn for each entry in order; entries must ascend
// without overlapping and none may be longer than the block size.
func ReadManifest(r io.Reader, fn func(BlockHash) error) (blockSize int64, err error) {
	sc := bufio.NewScanner(r)
	if !sc.Scan() {
		if err := sc.Err(); err != nil {
			return 0, fmt.Errorf("read manifest: %w", err)
		}
		return 0, errors.New("manifest is empty")
	}
	bs, ok := strings.CutPrefix(sc.Text(), manifestHeader)
	if !ok {
		return 0, fmt.Errorf("manifest line 1: not a diskferry manifest header (want %q)", manifestHeader+"N")
	}
	if blockSize, err = strconv.ParseInt(bs, 10, 64); err != nil || blockSize <= 0 {
		return 0, fmt.Errorf("manifest line 1: block size %q is not a positive number", bs)
	}
	next := int64(0)
	for line := 2; sc.Scan(); line++ {
		b, err := parseBlockHash(sc.Text())
		switch {
		case err != nil:
			return 0, fmt.Errorf("manifest line %d: %w", line, err)
		case b.Offset < next:
			return 0, fmt.Errorf("manifest line %d: offset %d below the end %d of the previous entry", line, b.Offset, next)
		case b.Length <= 0 || b.Length > blockSize:
			return 0, fmt.Errorf("manifest line %d: length %d outside 1..%d", line, b.Length, blockSize)
		}
		next = b.Offset + b.Length
		if err := fn(b); err != nil {
			return 0, err
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("read manifest: %w", err)
	}
	return blockSize, nil
}

func parseBlockHash(line string) (BlockHash, error) {
	var b BlockHash
	f := strings.Fields(line)
	if len(f) != 3 {
		return b, fmt.Errorf("want \"OFFSET LENGTH SHA256\", got %d fields", len(f))
	}
	var err error
	if b.Offset, err = strconv.ParseInt(f[0], 10, 64); err != nil || b.Offset < 0 {
		return b, fmt.Errorf("offset %q is not a number", f[0])
	}
	if b.Length, err = strconv.ParseInt(f[1], 10, 64); err != nil {
		return b, fmt.Errorf("length %q is not a number", f[1])
	}
	if n, err := hex.Decode(b.Sum[:], []byte(f[2])); err != nil || n != len(b.Sum) || len(f[2]) != 2*len(b.Sum) {
		return b, fmt.Errorf("hash %q is not 64 hex digits", f[2])
	}
	return b, nil
}

// maxMismatches is how many differing blocks a verification lists (all are counted).
const maxMismatches = 100

// Verification is the outcome of VerifyManifest.
type Verification struct {
	Blocks     int64    // entries checked
	Bytes      int64    // bytes they cover
	Mismatches int64    // entries whose content differs
	First      []Extent // the first differing blocks, at most 100
}

// VerifyManifest reads uri over the areas the manifest at path lists and compares each
// piece's hash with its entry. opts' Connections, RequestSize and timeouts apply; the block
// size is the manifest's.
func VerifyManifest(ctx context.Context, uri, path string, opts Options) (*Verification, error) {
	areas, blockSize, err := ManifestAreas(path)
	if err != nil {
		return nil, err
	}
	// The second pass hands the entries over one at a time, in step with the read.
	entries := make(chan BlockHash)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		defer close(entries)
		_, _ = readManifestFile(path, func(b BlockHash) error {
			select {
			case entries <- b:
				return nil
			case <-stop:
				return errors.New("stopped")
			}
		})
	}()

	v := &Verification{}
	opts.Areas = areas
	opts.BlockSize = blockSize
	opts.Resume = nil
	opts.SkipDigest = false
	opts.OnBlock = func(got BlockHash) error {
		want, ok := <-entries
		if !ok || want.Offset != got.Offset || want.Length != got.Length {
			return fmt.Errorf("manifest entry for %d+%d missing", got.Offset, got.Length)
		}
		v.Blocks++
		v.Bytes += got.Length
		if want.Sum != got.Sum {
			v.Mismatches++
			if len(v.First) < maxMismatches {
				v.First = append(v.First, Extent{Start: got.Offset, Length: got.Length})
			}
		}
		return nil
	}
	c, err := newCopy(uri, "", opts)
	if err != nil {
		return nil, err
	}
	if _, err := c.Run(ctx); err != nil {
		return nil, fmt.Errorf("verify %s against %s: %w", path, uri, err)
	}
	return v, nil
}

// ManifestAreas returns the areas the manifest at path covers (its entries joined where
// they touch) and its block size. A manifest without entries covers nothing: the list is
// empty, not nil (which would mean the whole disk).
func ManifestAreas(path string) ([]Extent, int64, error) {
	areas := []Extent{}
	blockSize, err := readManifestFile(path, func(b BlockHash) error {
		if n := len(areas); n > 0 && areas[n-1].End() == b.Offset {
			areas[n-1].Length += b.Length
		} else {
			areas = append(areas, Extent{Start: b.Offset, Length: b.Length})
		}
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	return areas, blockSize, nil
}

func readManifestFile(path string, fn func(BlockHash) error) (int64, error) {
	f, err := os.Open(filepath.Clean(path))
	if err != nil {
		return 0, fmt.Errorf("open manifest: %w", err)
	}
	defer f.Close()
	bs, err := ReadManifest(f, fn)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return bs, nil
}
