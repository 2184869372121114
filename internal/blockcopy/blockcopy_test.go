package blockcopy_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/nbd"
	"github.com/diskferry/diskferry/internal/testenv"
)

const mib = 1 << 20

// fixture writes a raw disk: random data, a stretch of written zeros (allocated, so block
// status calls it data), a lone 4 KiB write, an unaligned tail, holes in between.
func fixture(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "src.raw")
	require.NoError(t, os.WriteFile(path, nil, 0o600))
	require.NoError(t, os.Truncate(path, size))
	testenv.WriteFileAt(t, path, 1*mib, random(t, 4*mib))
	testenv.WriteFileAt(t, path, 8*mib, make([]byte, 4*mib))
	testenv.WriteFileAt(t, path, 20*mib+4096, random(t, 4096))
	testenv.WriteFileAt(t, path, 30*mib, random(t, mib/2+100))
	return path
}

func random(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

// qemuImg runs qemu-img with -U where it reads images that a server holds open.
func qemuImg(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	return exec.Command(testenv.RequireCommand(t, "qemu-img"), args...).CombinedOutput()
}

func requireSame(t *testing.T, raw, qcow2 string) {
	t.Helper()
	out, err := qemuImg(t, "compare", "-U", "-f", "raw", "-F", "qcow2", raw, qcow2)
	require.NoError(t, err, "qemu-img compare: %s", out)
}

func allocated(t *testing.T, qcow2 string) int64 {
	t.Helper()
	out, err := qemuImg(t, "info", "-U", "--output=json", qcow2)
	require.NoError(t, err, "%s", out)
	var info struct {
		ActualSize int64 `json:"actual-size"`
	}
	require.NoError(t, json.Unmarshal(out, &info))
	return info.ActualSize
}

// fileDigest computes the digest by its definition straight from a raw file.
func fileDigest(t *testing.T, path string, areas []blockcopy.Extent, blockSize int64) string {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	if areas == nil {
		areas = []blockcopy.Extent{{Start: 0, Length: int64(len(data))}}
	}
	outer := sha256.New()
	for _, a := range areas {
		for p := a.Start; p < a.End(); {
			pe := min(a.End(), (p/blockSize+1)*blockSize)
			sum := sha256.Sum256(data[p:pe])
			outer.Write(sum[:])
			p = pe
		}
	}
	return hex.EncodeToString(outer.Sum(nil))
}

func TestFullCopySparse(t *testing.T) {
	src := fixture(t, 64*mib)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	dstPath := testenv.CreateQcow2(t, 64*mib)
	target := testenv.StartQemuNBD(t, dstPath, testenv.QemuNBDOptions{})

	var mu sync.Mutex
	var last blockcopy.Progress
	c, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{
		ProgressInterval: 10 * time.Millisecond,
		OnProgress: func(p blockcopy.Progress) {
			mu.Lock()
			last = p
			mu.Unlock()
		},
	})
	require.NoError(t, err)
	res, err := c.Run(context.Background())
	require.NoError(t, err)
	requireSame(t, src, dstPath)

	assert.Equal(t, int64(64*mib), res.BytesTotal)
	assert.Equal(t, res.BytesTotal, res.BytesDone)
	assert.Equal(t, int64(64*mib), res.Checkpoint.Offset)
	// Reads: the 4 MiB of data, the 4 MiB of written zeros, and of the two pieces with a
	// little data only their allocated extents (the file system's 4 KiB blocks), not the
	// holes around them.
	assert.GreaterOrEqual(t, res.BytesRead, int64(4*mib+4*mib+4096+mib/2+100))
	assert.Less(t, res.BytesRead, int64(4*mib+4*mib+mib), "holes inside pieces are not read")
	// Writes: the data at the target's 64 KiB grain; written zeros are not written.
	assert.Equal(t, int64(4*mib+64<<10+9*64<<10), res.BytesWritten, "zeros are not written, down to 64 KiB")
	assert.Equal(t, res.BytesTotal-res.BytesWritten, res.BytesZeroed)
	assert.Less(t, allocated(t, dstPath), int64(16*mib), "target stays sparse")
	mu.Lock()
	assert.Equal(t, res.BytesDone, last.BytesDone, "final progress callback")
	mu.Unlock()
	assert.Equal(t, res.BytesDone, c.Progress().BytesDone)

	want := fileDigest(t, src, nil, blockcopy.DefaultBlockSize)
	assert.Equal(t, want, res.Digest)
	got, err := blockcopy.ComputeDigest(context.Background(), target.URI, blockcopy.Options{})
	require.NoError(t, err)
	assert.Equal(t, want, got, "digest recomputed from the target")
}

func TestCopyToZeroDestinationAndSmallBlocks(t *testing.T) {
	src := fixture(t, 40*mib)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	dstPath := testenv.CreateQcow2(t, 40*mib)
	target := testenv.StartQemuNBD(t, dstPath, testenv.QemuNBDOptions{})
	c, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{
		DestinationIsZero: true, BlockSize: 64 * 1024, RequestSize: 256 * 1024, Connections: 2})
	require.NoError(t, err)
	res, err := c.Run(context.Background())
	require.NoError(t, err)
	requireSame(t, src, dstPath)
	assert.Zero(t, res.BytesZeroed, "nothing zeroed on a zero destination")
	assert.Equal(t, fileDigest(t, src, nil, 64*1024), res.Digest)
}

func TestSkipDigestCopiesAndResumesWithoutDigestState(t *testing.T) {
	src := fixture(t, 40*mib)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	dstPath := testenv.CreateQcow2(t, 40*mib)
	target := testenv.StartQemuNBD(t, dstPath, testenv.QemuNBDOptions{})

	// First half, as an interrupted copy would have left it.
	half := []blockcopy.Extent{{Start: 0, Length: 20 * mib}}
	c, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{Areas: half, SkipDigest: true, DestinationIsZero: true})
	require.NoError(t, err)
	res, err := c.Run(context.Background())
	require.NoError(t, err)
	assert.Empty(t, res.Digest)
	assert.Empty(t, res.Checkpoint.DigestState)
	assert.Equal(t, int64(20*mib), res.Checkpoint.Offset)

	c, err = blockcopy.New(source.URI, target.URI, blockcopy.Options{SkipDigest: true, DestinationIsZero: true,
		Resume: &blockcopy.Checkpoint{Offset: res.Checkpoint.Offset, BytesDone: res.BytesDone}})
	require.NoError(t, err)
	res, err = c.Run(context.Background())
	require.NoError(t, err, "resume needs no digest state when no digest is wanted")
	requireSame(t, src, dstPath)
	assert.Empty(t, res.Digest)
	assert.GreaterOrEqual(t, res.BytesRead, int64(4096+mib/2+100))
	assert.Less(t, res.BytesRead, int64(mib), "only the allocated extents of the second half's two pieces were read")

	got, err := blockcopy.ComputeDigest(context.Background(), target.URI, blockcopy.Options{SkipDigest: true})
	require.NoError(t, err)
	assert.Equal(t, fileDigest(t, src, nil, blockcopy.DefaultBlockSize), got, "ComputeDigest always hashes")
}

func TestChangedAreasIntoOverlay(t *testing.T) {
	src := fixture(t, 32*mib)
	base := testenv.CreateQcow2(t, 32*mib)
	out, err := qemuImg(t, "convert", "-n", "-f", "raw", "-O", "qcow2", src, base)
	require.NoError(t, err, "%s", out)

	// Change the source: new data, data turned to zeros (a written-zero area and a hole).
	testenv.WriteFileAt(t, src, 2*mib+512, random(t, 3*mib))
	testenv.WriteFileAt(t, src, 16*mib, random(t, mib))
	testenv.WriteFileAt(t, src, 30*mib, make([]byte, mib/2+100))
	areas := []blockcopy.Extent{{Start: 2 * mib, Length: 4 * mib}, {Start: 16 * mib, Length: mib}, {Start: 30 * mib, Length: mib}}

	overlay := filepath.Join(t.TempDir(), "inc.qcow2")
	out, err = qemuImg(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay)
	require.NoError(t, err, "%s", out)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	target := testenv.StartQemuNBD(t, overlay, testenv.QemuNBDOptions{})

	c, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{Areas: areas})
	require.NoError(t, err)
	res, err := c.Run(context.Background())
	require.NoError(t, err)
	requireSame(t, src, overlay)
	assert.Equal(t, areas, res.Areas)
	assert.Equal(t, int64(6*mib), res.BytesTotal)
	assert.LessOrEqual(t, res.BytesRead+res.BytesWritten, 2*res.BytesTotal)
	assert.Equal(t, fileDigest(t, src, areas, blockcopy.DefaultBlockSize), res.Digest)

	got, err := blockcopy.ComputeDigest(context.Background(), target.URI, blockcopy.Options{Areas: areas})
	require.NoError(t, err)
	assert.Equal(t, res.Digest, got)
}

func TestCancelThenResume(t *testing.T) {
	src := fixture(t, 128*mib)
	testenv.WriteFileAt(t, src, 40*mib, random(t, 64*mib))
	// 200 ms per read: the data (32 reads of 2 MiB, 8 at a time) takes 0.8 s at least, so the
	// cancel, sent once the checkpoint has passed the leading holes, always comes first even
	// on a busy machine (at 20 ms the copy sometimes finished before the cancel reached it).
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{Filters: []string{"delay"}, Params: []string{"rdelay=200ms"}})
	dstPath := testenv.CreateQcow2(t, 128*mib)
	target := testenv.StartQemuNBD(t, dstPath, testenv.QemuNBDOptions{})

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var once sync.Once
	var seen blockcopy.Progress
	c, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{
		CheckpointInterval: 20 * time.Millisecond, ProgressInterval: 10 * time.Millisecond,
		OnProgress: func(p blockcopy.Progress) {
			if p.Checkpoint.Offset > 10*mib && p.BytesDone < p.BytesTotal {
				once.Do(func() { seen = p; cancel() })
			}
		}})
	require.NoError(t, err)
	start := time.Now()
	res, err := c.Run(ctx)
	require.ErrorIs(t, err, context.Canceled)
	assert.Less(t, time.Since(start), 10*time.Second)
	require.NotNil(t, res)
	require.NotZero(t, seen.BytesTotal, "cancelled from the progress callback")
	assert.GreaterOrEqual(t, res.Checkpoint.Offset, seen.Checkpoint.Offset)
	assert.Less(t, res.Checkpoint.Offset, int64(128*mib))
	assert.Empty(t, res.Digest)
	out, err := qemuImg(t, "check", "-U", dstPath)
	require.NoError(t, err, "target consistent after cancel: %s", out)

	cp := res.Checkpoint
	cp.BytesDone = res.BytesDone
	var ahead int64
	for _, f := range cp.Ahead {
		assert.GreaterOrEqual(t, f.Start, cp.Offset, "finished stretches lie beyond the checkpoint")
		ahead += f.Length
	}
	t.Logf("stopped at checkpoint %d with %d bytes finished ahead of it, %d done", cp.Offset, ahead, res.BytesDone)
	c2, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{Resume: &cp})
	require.NoError(t, err)
	res2, err := c2.Run(context.Background())
	require.NoError(t, err)
	requireSame(t, src, dstPath)
	assert.Equal(t, fileDigest(t, src, nil, blockcopy.DefaultBlockSize), res2.Digest, "digest continues across the resume")
	assert.Equal(t, res.BytesDone-cp.Offset-ahead, res2.BytesRecopied)

	// Nothing finished is read again: the two attempts read what one copy reads.
	full, err := blockcopy.New(source.URI, testenv.StartQemuNBD(t, testenv.CreateQcow2(t, 128*mib), testenv.QemuNBDOptions{}).URI, blockcopy.Options{})
	require.NoError(t, err)
	resFull, err := full.Run(context.Background())
	require.NoError(t, err)
	assert.Equal(t, resFull.BytesRead, res.BytesRead+res2.BytesRead, "finished work not redone (%d finished ahead)", ahead)
}

// A resume skips the stretches its checkpoint lists as finished beyond the offset, and the
// digest and manifest still cover them, from the checkpoint's sums.
func TestResumeSkipsFinishedStretches(t *testing.T) {
	src := fixture(t, 32*mib)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	dstPath := testenv.CreateQcow2(t, 32*mib)
	target := testenv.StartQemuNBD(t, dstPath, testenv.QemuNBDOptions{})
	run := func(opts blockcopy.Options) *blockcopy.Result {
		t.Helper()
		c, err := blockcopy.New(source.URI, target.URI, opts)
		require.NoError(t, err)
		res, err := c.Run(context.Background())
		require.NoError(t, err)
		return res
	}
	// What an interrupted copy leaves: [0, 8 MiB) below its checkpoint, [16, 24 MiB) ahead.
	below := run(blockcopy.Options{Areas: []blockcopy.Extent{{Start: 0, Length: 8 * mib}}})
	var sums []byte
	run(blockcopy.Options{Areas: []blockcopy.Extent{{Start: 16 * mib, Length: 8 * mib}}, OnBlock: func(b blockcopy.BlockHash) error {
		sums = append(sums, b.Sum[:]...)
		return nil
	}})
	cp := blockcopy.Checkpoint{Offset: 8 * mib, DigestState: below.Checkpoint.DigestState,
		Ahead: []blockcopy.Finished{{Start: 16 * mib, Length: 8 * mib, Sums: sums}}}

	var offsets []int64
	res := run(blockcopy.Options{Resume: &cp, OnBlock: func(b blockcopy.BlockHash) error {
		offsets = append(offsets, b.Offset)
		return nil
	}})
	requireSame(t, src, dstPath)
	assert.Equal(t, fileDigest(t, src, nil, blockcopy.DefaultBlockSize), res.Digest)
	assert.GreaterOrEqual(t, res.BytesRead, int64(4*mib+mib/2+100))
	assert.Less(t, res.BytesRead, int64(4*mib+mib), "read: the written zeros at 8 MiB and the data extent at 30 MiB, not the block at 20 MiB")
	require.Len(t, offsets, 24, "every block from the checkpoint on, the finished ones included")
	for i, off := range offsets {
		require.Equal(t, int64(8+i)*mib, off)
	}

	for name, bad := range map[string][]blockcopy.Finished{
		"below the offset": {{Start: 4 * mib, Length: mib, Sums: sums[:32]}},
		"out of order":     {{Start: 20 * mib, Length: mib, Sums: sums[:32]}, {Start: 16 * mib, Length: mib, Sums: sums[:32]}},
		"wrong sums":       {{Start: 16 * mib, Length: 2 * mib, Sums: sums[:32]}},
		"outside the disk": {{Start: 32 * mib, Length: mib, Sums: sums[:32]}},
	} {
		c, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{Resume: &blockcopy.Checkpoint{
			Offset: cp.Offset, DigestState: cp.DigestState, Ahead: bad}})
		require.NoError(t, err)
		_, err = c.Run(context.Background())
		assert.ErrorContains(t, err, "resume: finished stretch", name)
	}
}

// A cancel reaches a block-status request the source is slow to answer at once, instead of
// waiting for it (or for the command timeout).
func TestCancelDuringBlockStatus(t *testing.T) {
	src := fixture(t, 64*mib)
	testenv.WriteFileAt(t, src, 8*mib, random(t, 8*mib))
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{Filters: []string{"delay"}, Params: []string{"delay-extents=30"}})
	dstPath := testenv.CreateQcow2(t, 64*mib)
	target := testenv.StartQemuNBD(t, dstPath, testenv.QemuNBDOptions{})

	c, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{CommandTimeout: time.Minute})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = c.Run(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Less(t, time.Since(start), 5*time.Second, "the cancel did not wait for the block-status reply")
	out, err := qemuImg(t, "check", "-U", dstPath)
	require.NoError(t, err, "target consistent after cancel: %s", out)
}

func TestTargetDiesMidCopy(t *testing.T) {
	src := fixture(t, 64*mib)
	testenv.WriteFileAt(t, src, 40*mib, random(t, 16*mib))
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{Filters: []string{"delay"}, Params: []string{"rdelay=20ms"}})

	for _, how := range []string{"killed", "frozen"} {
		t.Run(how, func(t *testing.T) {
			target := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, 64*mib), testenv.QemuNBDOptions{})
			var once sync.Once
			c, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{
				CommandTimeout: time.Second, ProgressInterval: 10 * time.Millisecond,
				OnProgress: func(p blockcopy.Progress) {
					if p.BytesWritten > 0 {
						once.Do(func() {
							if how == "killed" {
								target.Kill()
							} else {
								target.Stop()
							}
						})
					}
				}})
			require.NoError(t, err)
			done := make(chan error, 1)
			go func() {
				_, err := c.Run(context.Background())
				done <- err
			}()
			select {
			case err := <-done:
				require.Error(t, err)
				if how == "frozen" {
					assert.ErrorIs(t, err, syscall.ETIMEDOUT)
				}
			case <-time.After(45 * time.Second):
				t.Fatal("copy hung on a dead target")
			}
		})
	}
}

func TestBadOptions(t *testing.T) {
	_, err := blockcopy.New("nbd://a", "nbd://b", blockcopy.Options{RequestSize: 3 << 19})
	assert.Error(t, err, "request size not a multiple of the block size")
	_, err = blockcopy.New("", "nbd://b", blockcopy.Options{})
	assert.Error(t, err)
	c, err := blockcopy.New("nbd://a", "nbd://b", blockcopy.Options{RequestSize: 8 << 20, MaxRequestSize: blockcopy.VCenterMaxRequestSize})
	require.NoError(t, err, "capped to 2 MiB")
	assert.NotNil(t, c)
}

func TestRefusedSource(t *testing.T) {
	testenv.Integration(t)
	c, err := blockcopy.New("nbd://127.0.0.1:1/", "nbd://127.0.0.1:1/", blockcopy.Options{})
	require.NoError(t, err)
	_, err = c.Run(context.Background())
	require.Error(t, err)
	assert.True(t, errors.Is(err, syscall.ECONNREFUSED), "%v", err)
}

// dirtyCHeap leaves freed C buffers full of non-zero bytes on this thread's malloc arena,
// the state a long-running worker is in after earlier copies.
func dirtyCHeap(t *testing.T, size int) {
	t.Helper()
	var bufs []*nbd.Buffer
	for range 8 {
		b, err := nbd.NewBuffer(size)
		require.NoError(t, err)
		for i := range b.Bytes() {
			b.Bytes()[i] = 0xa5
		}
		bufs = append(bufs, b)
	}
	for _, b := range bufs {
		b.Free()
	}
}

// A target without zero support gets zeros written from a shared buffer: holes and
// all-zero pieces of the source must arrive as zeros, whatever the C heap held before.
func TestTargetWithoutZeroSupport(t *testing.T) {
	src := fixture(t, 40*mib)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	dst := filepath.Join(t.TempDir(), "dst.raw")
	require.NoError(t, os.WriteFile(dst, bytes.Repeat([]byte{0x5a}, 40*mib), 0o600))
	target := testenv.StartNbdkitFile(t, dst, testenv.NbdkitOptions{Filters: []string{"nozero"}})

	// The copy allocates its buffers on the calling goroutine's thread: keep it on the
	// thread whose arena was dirtied.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// Requests below glibc's mmap threshold come from the heap, which reuses freed memory.
	const request = 64 << 10
	dirtyCHeap(t, request)
	c, err := blockcopy.New(source.URI, target.URI, blockcopy.Options{BlockSize: request, RequestSize: request})
	require.NoError(t, err)
	res, err := c.Run(context.Background())
	require.NoError(t, err)
	assert.NotZero(t, res.BytesZeroed)
	want, err := os.ReadFile(src)
	require.NoError(t, err)
	got, err := os.ReadFile(dst)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "target differs from the source")
}
