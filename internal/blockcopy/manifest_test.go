package blockcopy_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/nbd"
	"github.com/diskferry/diskferry/internal/testenv"
)

// copyWithManifest copies src into a fresh qcow2 (optionally only areas) and writes the
// manifest to a file; it returns the target's URI and the manifest's path.
func copyWithManifest(t *testing.T, src string, size int64, areas []blockcopy.Extent) (string, string) {
	t.Helper()
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	target := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, size), testenv.QemuNBDOptions{})
	path := filepath.Join(t.TempDir(), "disk.manifest")
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	m, err := blockcopy.NewManifestWriter(f, blockcopy.DefaultBlockSize)
	require.NoError(t, err)
	c, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{Areas: areas, OnBlock: m.Add})
	require.NoError(t, err)
	_, err = c.Run(context.Background())
	require.NoError(t, err)
	require.NoError(t, m.Flush())
	return target.URI, path
}

func readManifest(t *testing.T, path string) []blockcopy.BlockHash {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	var out []blockcopy.BlockHash
	bs, err := blockcopy.ReadManifest(f, func(b blockcopy.BlockHash) error { out = append(out, b); return nil })
	require.NoError(t, err)
	require.Equal(t, int64(blockcopy.DefaultBlockSize), bs)
	return out
}

func TestManifestNamesTheBlockThatDiffers(t *testing.T) {
	src := fixture(t, 32*mib)
	targetURI, manifest := copyWithManifest(t, src, 32*mib, nil)

	// One entry per 1 MiB block, holes included, each the SHA-256 of the source's block.
	data, err := os.ReadFile(src)
	require.NoError(t, err)
	entries := readManifest(t, manifest)
	require.Len(t, entries, 32)
	for i, e := range entries {
		off := int64(i) * mib
		require.Equal(t, blockcopy.BlockHash{Offset: off, Length: mib, Sum: sha256.Sum256(data[off : off+mib])}, e, "block %d", i)
	}

	ctx := context.Background()
	v, err := blockcopy.VerifyManifest(ctx, targetURI, manifest, blockcopy.Options{})
	require.NoError(t, err)
	assert.Equal(t, &blockcopy.Verification{Blocks: 32, Bytes: 32 * mib}, v)

	// One byte changed in a data block and one in a hole: both named, nothing else.
	h, err := nbd.Connect(ctx, targetURI, nbd.Options{})
	require.NoError(t, err)
	defer h.Close()
	buf, err := nbd.NewBuffer(1)
	require.NoError(t, err)
	defer buf.Free()
	buf.Bytes()[0] = 0x5a
	require.NoError(t, h.Pwrite(ctx, buf, 0, 1, 2*mib+77, 0))
	require.NoError(t, h.Pwrite(ctx, buf, 0, 1, 25*mib, 0))
	require.NoError(t, h.Flush(ctx))

	v, err = blockcopy.VerifyManifest(ctx, targetURI, manifest, blockcopy.Options{})
	require.NoError(t, err)
	assert.Equal(t, int64(2), v.Mismatches)
	assert.Equal(t, []blockcopy.Extent{{Start: 2 * mib, Length: mib}, {Start: 25 * mib, Length: mib}}, v.First)
}

func TestManifestOfChangedAreas(t *testing.T) {
	src := fixture(t, 32*mib)
	areas := []blockcopy.Extent{{Start: 2*mib + 512, Length: 3 * mib}, {Start: 16 * mib, Length: mib}}
	targetURI, manifest := copyWithManifest(t, src, 32*mib, areas)

	entries := readManifest(t, manifest)
	var offsets []int64
	for _, e := range entries {
		offsets = append(offsets, e.Offset)
	}
	assert.Equal(t, []int64{2*mib + 512, 3 * mib, 4 * mib, 5 * mib, 16 * mib}, offsets, "pieces end at block boundaries and area ends")
	assert.Equal(t, int64(512), entries[len(entries)-2].Length, "the first area's tail")

	v, err := blockcopy.VerifyManifest(context.Background(), targetURI, manifest, blockcopy.Options{})
	require.NoError(t, err)
	assert.Equal(t, &blockcopy.Verification{Blocks: 5, Bytes: 4 * mib}, v)

	got, bs, err := blockcopy.ManifestAreas(manifest)
	require.NoError(t, err)
	assert.Equal(t, areas, got, "the entries joined give back the areas")
	assert.Equal(t, int64(blockcopy.DefaultBlockSize), bs)
	empty := filepath.Join(t.TempDir(), "empty.manifest")
	require.NoError(t, os.WriteFile(empty, []byte("diskferry-manifest v1 block-size 1048576\n"), 0o600))
	got, _, err = blockcopy.ManifestAreas(empty)
	require.NoError(t, err)
	assert.NotNil(t, got, "no entries cover nothing, not the whole disk")
	assert.Empty(t, got)
}

func TestManifestAgainstASmallerDisk(t *testing.T) {
	src := fixture(t, 32*mib)
	_, manifest := copyWithManifest(t, src, 32*mib, nil)
	small := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, 16*mib), testenv.QemuNBDOptions{})
	_, err := blockcopy.VerifyManifest(context.Background(), small.URI, manifest, blockcopy.Options{})
	require.ErrorContains(t, err, "outside the disk of 16777216 bytes")
}

func TestManifestWriteFailureFailsTheCopy(t *testing.T) {
	src := fixture(t, 32*mib)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	target := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, 32*mib), testenv.QemuNBDOptions{})
	full := errors.New("no space left")
	c, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{OnBlock: func(b blockcopy.BlockHash) error {
		if b.Offset >= 4*mib {
			return full
		}
		return nil
	}})
	require.NoError(t, err)
	res, err := c.Run(context.Background())
	require.ErrorIs(t, err, full)
	assert.Empty(t, res.Digest)

	_, err = blockcopy.New(source.URI, target.URI, blockcopy.Options{SkipDigest: true, OnBlock: func(blockcopy.BlockHash) error { return nil }})
	require.ErrorContains(t, err, "SkipDigest")
}

func TestReadManifestRejects(t *testing.T) {
	const sum = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
	for name, tc := range map[string]struct{ text, want string }{
		"empty":        {"", "manifest is empty"},
		"header":       {"hello\n", "line 1: not a diskferry manifest header"},
		"block size":   {"diskferry-manifest v1 block-size x\n", `line 1: block size "x"`},
		"fields":       {"diskferry-manifest v1 block-size 1048576\n0 1048576\n", "line 2: want \"OFFSET LENGTH SHA256\""},
		"hash":         {"diskferry-manifest v1 block-size 1048576\n0 1048576 abc\n", `line 2: hash "abc" is not 64 hex digits`},
		"offset":       {"diskferry-manifest v1 block-size 1048576\n-1 1048576 " + sum + "\n", `line 2: offset "-1"`},
		"too long":     {"diskferry-manifest v1 block-size 1048576\n0 2097152 " + sum + "\n", "line 2: length 2097152 outside 1..1048576"},
		"out of order": {"diskferry-manifest v1 block-size 1048576\n1048576 1048576 " + sum + "\n0 1048576 " + sum + "\n", "line 3: offset 0 below the end 2097152"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := blockcopy.ReadManifest(strings.NewReader(tc.text), func(blockcopy.BlockHash) error { return nil })
			require.ErrorContains(t, err, tc.want)
		})
	}
}
