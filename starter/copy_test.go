package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/testenv"
)

func TestCopyCommand(t *testing.T) {
	qemuImg := testenv.RequireCommand(t, "qemu-img")
	src := filepath.Join(t.TempDir(), "src.raw")
	data := make([]byte, 3<<20)
	_, err := rand.Read(data)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(src, nil, 0o600))
	require.NoError(t, os.Truncate(src, 32<<20))
	testenv.WriteFileAt(t, src, 4<<20, data)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	dst := testenv.CreateQcow2(t, 32<<20)
	target := testenv.StartQemuNBD(t, dst, testenv.QemuNBDOptions{})

	var out bytes.Buffer
	root := newRootCommand()
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs([]string{"copy", "--connections", "2", "--request-size", "2MiB", source.URI, target.URI})
	require.NoError(t, root.ExecuteContext(context.Background()), out.String())
	assert.Regexp(t, `^copied 33554432 bytes in [0-9.]+s: read 3145728, written 3145728, zeroed 30408704 bytes, [0-9.]+ MB/s\n$`, out.String())
	cmp, err := exec.Command(qemuImg, "compare", "-U", "-f", "raw", "-F", "qcow2", src, dst).CombinedOutput()
	require.NoError(t, err, "%s", cmp)

	areas := filepath.Join(t.TempDir(), "areas.json")
	require.NoError(t, os.WriteFile(areas, []byte(`[{"start":4194304,"length":1048576}]`), 0o600))
	out.Reset()
	root = newRootCommand()
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs([]string{"copy", "--changed-areas", areas, source.URI, target.URI})
	require.NoError(t, root.ExecuteContext(context.Background()), out.String())
	assert.Contains(t, out.String(), "copied 1048576 bytes")

	out.Reset()
	root = newRootCommand()
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs([]string{"copy", "--digest", source.URI, target.URI})
	require.NoError(t, root.ExecuteContext(context.Background()), out.String())
	want, err := blockcopy.ComputeDigest(context.Background(), source.URI, blockcopy.Options{})
	require.NoError(t, err)
	assert.Regexp(t, `\ndigest sha256-of-1048576-byte-block-sha256s `+want+`\n$`, out.String())
}

func TestCopyCommandRejectsBadAreas(t *testing.T) {
	areas := filepath.Join(t.TempDir(), "areas.json")
	require.NoError(t, os.WriteFile(areas, []byte(`{"start":1}`), 0o600))
	_, err := readAreas(areas)
	assert.ErrorContains(t, err, "parse changed areas")
	_, err = readAreas(filepath.Join(t.TempDir(), "missing.json"))
	assert.Error(t, err)

	root := newRootCommand()
	root.SetOut(&bytes.Buffer{})
	root.SetErr(&bytes.Buffer{})
	root.SetArgs([]string{"copy", "nbd://127.0.0.1:1/"})
	assert.Error(t, root.Execute(), "two URIs required")
}

// copy --manifest writes a manifest only for a finished copy, never over an existing file,
// and verify names the block that differs.
func TestCopyManifestThenVerify(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src.raw")
	require.NoError(t, os.WriteFile(src, nil, 0o600))
	require.NoError(t, os.Truncate(src, 8<<20))
	data := make([]byte, 2<<20)
	_, err := rand.Read(data)
	require.NoError(t, err)
	testenv.WriteFileAt(t, src, 1<<20, data)
	source := testenv.StartNbdkitFile(t, src, testenv.NbdkitOptions{})
	target := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, 8<<20), testenv.QemuNBDOptions{})
	manifest := filepath.Join(t.TempDir(), "disk.manifest")

	run := func(args ...string) (string, error) {
		var out bytes.Buffer
		root := newRootCommand()
		root.SetOut(&out)
		root.SetErr(&out)
		root.SetArgs(args)
		err := root.ExecuteContext(context.Background())
		return out.String(), err
	}
	out, err := run("copy", "--manifest", manifest, source.URI, target.URI)
	require.NoError(t, err, out)
	text, err := os.ReadFile(manifest)
	require.NoError(t, err)
	assert.Equal(t, 9, bytes.Count(text, []byte("\n")), "header and 8 blocks:\n%s", text)

	out, err = run("copy", "--manifest", manifest, source.URI, target.URI)
	require.ErrorContains(t, err, "file exists", "an existing manifest is never overwritten")
	after, rerr := os.ReadFile(manifest)
	require.NoError(t, rerr)
	assert.Equal(t, text, after, out)

	out, err = run("verify", "--manifest", manifest, target.URI)
	require.NoError(t, err, out)
	assert.Equal(t, "verified 8 blocks (8388608 bytes): all match\n", out)

	// The source changes; the copy's manifest now names the changed block.
	out, err = run("verify", "--manifest", manifest, source.URI)
	require.NoError(t, err, out)
	testenv.WriteFileAt(t, src, 6<<20+1, []byte{1})
	out, err = run("verify", "--manifest", manifest, source.URI)
	require.ErrorContains(t, err, "1 of 8 blocks differ")
	assert.Contains(t, out, "differs: offset 6291456 length 1048576\n")

	// A failed copy leaves no manifest behind.
	failed := filepath.Join(t.TempDir(), "failed.manifest")
	out, err = run("copy", "--manifest", failed, source.URI, "nbd://127.0.0.1:1/")
	require.Error(t, err, out)
	assert.NoFileExists(t, failed)
}
