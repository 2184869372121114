package qemu

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// chain makes a base qcow2 (0x11 in its first MiB) and an overlay on it (0x22 in the third).
func chain(t *testing.T) (base, top string) {
	t.Helper()
	ctx := testCtx(t)
	dir := t.TempDir()
	base, top = filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	require.NoError(t, CreateImage(ctx, base, testSize))
	writePattern(t, base, 0x11, 0, mib)
	require.NoError(t, CreateOverlay(ctx, top, base))
	writePattern(t, top, 0x22, 2*mib, mib)
	return base, top
}

func TestConvertFlattensChainToEachFormat(t *testing.T) {
	requireQemuImg(t)
	ctx := testCtx(t)
	_, top := chain(t)
	for _, tc := range []struct{ format, options string }{
		{FormatRaw, ""}, {FormatQCOW2, ""}, {FormatVMDK, StreamOptimized},
	} {
		t.Run(tc.format, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out."+tc.format)
			var progress []float64
			require.NoError(t, Convert(ctx, QCOW2(top), Image{Path: out, Format: tc.format}, ConvertOptions{
				Options: tc.options, OnProgress: func(p float64) { progress = append(progress, p) }, StallTimeout: time.Minute,
			}))
			require.NotEmpty(t, progress)
			assert.Equal(t, 100.0, progress[len(progress)-1])
			assert.True(t, slices.IsSorted(progress), "progress only advances: %v", progress)

			res, err := CompareProgress(ctx, QCOW2(top), Image{Path: out, Format: tc.format}, nil, time.Minute)
			require.NoError(t, err)
			assert.True(t, res.Equal, res.Message)
			assert.Equal(t, "Images are identical.", res.Message, "the verdict without progress lines")

			info, err := exec.Command("qemu-img", "info", "-f", tc.format, out).CombinedOutput()
			require.NoError(t, err, string(info))
			assert.NotContains(t, string(info), "backing file", "standalone")
			if tc.format == FormatVMDK {
				assert.Contains(t, string(info), "create type: streamOptimized")
			}
		})
	}
}

func TestCompareProgressReportsMismatch(t *testing.T) {
	requireQemuImg(t)
	ctx := testCtx(t)
	_, top := chain(t)
	out := filepath.Join(t.TempDir(), "out.raw")
	require.NoError(t, Convert(ctx, QCOW2(top), Raw(out), ConvertOptions{}))
	f, err := os.OpenFile(out, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte{0x33}, 5*mib)
	require.NoError(t, err)
	require.NoError(t, f.Close())

	var progress []float64
	res, err := CompareProgress(ctx, QCOW2(top), Raw(out), func(p float64) { progress = append(progress, p) }, time.Minute)
	require.NoError(t, err)
	assert.False(t, res.Equal)
	assert.Contains(t, res.Message, "Content mismatch at offset")
	assert.NotEmpty(t, progress)
}

func TestConvertFailureCarriesStderr(t *testing.T) {
	requireQemuImg(t)
	err := Convert(testCtx(t), QCOW2(filepath.Join(t.TempDir(), "missing.qcow2")), Raw(filepath.Join(t.TempDir(), "out.raw")), ConvertOptions{})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "missing.qcow2")
	assert.Error(t, Convert(testCtx(t), Image{Path: "a"}, Raw("b"), ConvertOptions{}), "formats must be named")
}

func TestReadProgressSplitsLines(t *testing.T) {
	in := "    (0.00/100%)\r    (1.56/100%)\r    (100.00/100%)\rImages are identical.\n"
	var got []float64
	var rest strings.Builder
	readProgress(bytes.NewBufferString(in), &rest, func(p float64) { got = append(got, p) })
	assert.Equal(t, []float64{0, 1.56, 100}, got)
	assert.Equal(t, "Images are identical.\n", rest.String())
}
