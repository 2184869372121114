package blockcopy_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/testenv"
)

// qcow2Of converts a raw fixture to a qcow2, as a restore point's file is.
func qcow2Of(t *testing.T, raw string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "point.qcow2")
	out, err := exec.Command(testenv.RequireCommand(t, "qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path).CombinedOutput()
	require.NoError(t, err, "qemu-img convert: %s", out)
	return path
}

func TestStreamWritesTheWholeDiskInOrderWithTheDigestOfComputeDigest(t *testing.T) {
	raw := fixture(t, 64*mib+4096)
	export := testenv.StartQemuNBD(t, qcow2Of(t, raw), testenv.QemuNBDOptions{Args: []string{"--read-only"}})
	for _, bs := range []int64{blockcopy.DefaultBlockSize, 64 << 10} {
		var mu sync.Mutex
		var last blockcopy.Progress
		var out bytes.Buffer
		res, err := blockcopy.Stream(context.Background(), export.URI, &out, blockcopy.Options{
			BlockSize: bs, Connections: 3, ProgressInterval: 10 * time.Millisecond,
			OnProgress: func(p blockcopy.Progress) {
				mu.Lock()
				last = p
				mu.Unlock()
			},
		})
		require.NoError(t, err)
		want, err := os.ReadFile(raw)
		require.NoError(t, err)
		require.True(t, bytes.Equal(want, out.Bytes()), "the stream is the disk, byte for byte (block size %d)", bs)

		digest, err := blockcopy.ComputeDigest(context.Background(), export.URI, blockcopy.Options{BlockSize: bs})
		require.NoError(t, err)
		assert.Equal(t, digest, res.Digest, "block size %d", bs)
		assert.Equal(t, fileDigest(t, raw, nil, bs), res.Digest)

		assert.Equal(t, int64(len(want)), res.BytesDone)
		assert.Equal(t, res.BytesDone, res.BytesWritten+res.BytesZeroed)
		assert.Less(t, res.BytesRead, int64(32*mib), "holes are not read")
		mu.Lock()
		assert.Equal(t, res.BytesDone, last.BytesDone, "final progress callback")
		assert.Equal(t, int64(len(want)), last.BytesTotal)
		mu.Unlock()
	}
}

type failingWriter struct{ after int }

func (w *failingWriter) Write(b []byte) (int, error) {
	if w.after <= 0 {
		return 0, errors.New("upload refused")
	}
	w.after--
	return len(b), nil
}

func TestStreamStopsOnAWriterError(t *testing.T) {
	raw := fixture(t, 64*mib)
	export := testenv.StartQemuNBD(t, qcow2Of(t, raw), testenv.QemuNBDOptions{Args: []string{"--read-only"}})
	res, err := blockcopy.Stream(context.Background(), export.URI, &failingWriter{after: 3}, blockcopy.Options{})
	require.ErrorContains(t, err, "upload refused")
	assert.Empty(t, res.Digest)
	assert.Less(t, res.BytesDone, int64(64*mib))
}

func TestStreamCancelled(t *testing.T) {
	raw := fixture(t, 64*mib)
	export := testenv.StartQemuNBD(t, qcow2Of(t, raw), testenv.QemuNBDOptions{Args: []string{"--read-only"}})
	ctx, cancel := context.WithCancel(context.Background())
	w := writerFunc(func(b []byte) (int, error) {
		cancel()
		return len(b), nil
	})
	_, err := blockcopy.Stream(ctx, export.URI, w, blockcopy.Options{})
	require.ErrorIs(t, err, context.Canceled)
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

func TestStreamRejectsOptionsItCannotHonour(t *testing.T) {
	_, err := blockcopy.Stream(context.Background(), "nbd://127.0.0.1:1", &bytes.Buffer{}, blockcopy.Options{Areas: []blockcopy.Extent{}})
	require.ErrorContains(t, err, "whole disk")
}
