package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/testenv"
)

// runCLICombined runs the CLI and returns what it printed on stdout and stderr together.
func runCLICombined(args ...string) (string, error) {
	var out bytes.Buffer
	root := newRootCommand()
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func qemuIOFile(t *testing.T, path string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command(testenv.RequireCommand(t, "qemu-io"), append(args, path)...).CombinedOutput()
	require.NoError(t, err, "qemu-io %v: %s", cmds, out)
}

// manifestOf writes the manifest a copy of the raw file's areas (JSON) produces.
func manifestOf(t *testing.T, raw, areasJSON string) string {
	t.Helper()
	areas := filepath.Join(t.TempDir(), "areas.json")
	require.NoError(t, os.WriteFile(areas, []byte(areasJSON), 0o600))
	source := testenv.StartNbdkitFile(t, raw, testenv.NbdkitOptions{})
	scratch := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, 8<<20), testenv.QemuNBDOptions{})
	manifest := filepath.Join(t.TempDir(), "disk.manifest")
	out, err := runCLICombined("copy", "--manifest", manifest, "--changed-areas", areas, source.URI, scratch.URI)
	require.NoError(t, err, out)
	return manifest
}

// The manifest covers only the copied blocks: a point written elsewhere still matches it,
// and --image is what catches that.
func TestVerifyImageProvesNothingOutsideTheManifest(t *testing.T) {
	tmp := testenv.ShortTempDir(t)
	t.Setenv("TMPDIR", tmp) // where verify serves the parent, looked at below
	ro := testenv.QemuNBDOptions{Args: []string{"--read-only"}}
	raw := filepath.Join(t.TempDir(), "src.raw")
	require.NoError(t, os.WriteFile(raw, nil, 0o600))
	require.NoError(t, os.Truncate(raw, 8<<20))
	testenv.WriteFileAt(t, raw, 1<<20, bytes.Repeat([]byte{0x5a}, 2<<20))
	manifest := manifestOf(t, raw, `[{"start":1048576,"length":2097152}]`)

	point := testenv.CreateQcow2(t, 8<<20)
	qemuIOFile(t, point, "write -P 0x5a 1M 2M")
	served := testenv.StartQemuNBD(t, point, ro)
	out, err := runCLICombined("verify", "--manifest", manifest, "--image", point, served.URI)
	require.NoError(t, err, out)
	assert.Equal(t, "verified 2 blocks (2097152 bytes): all match\n"+point+" holds nothing outside those blocks\n", out)
	served.Kill()

	qemuIOFile(t, point, "write -P 0xab 6M 1M")
	served = testenv.StartQemuNBD(t, point, ro)
	out, err = runCLICombined("verify", "--manifest", manifest, served.URI)
	require.NoError(t, err, "the manifest alone cannot see it: %s", out)
	out, err = runCLICombined("verify", "--manifest", manifest, "--image", point, served.URI)
	require.ErrorContains(t, err, "allocated outside the copied areas")
	assert.Contains(t, out, "outside: offset 6291456 length 1048576\n")
	served.Kill()

	// An incremental point: the rest of a partly changed cluster must be its parent's.
	qemuImg := testenv.RequireCommand(t, "qemu-img")
	base := testenv.CreateQcow2(t, 8<<20)
	qemuIOFile(t, base, "write -P 0x5a 1M 2M")
	top := filepath.Join(t.TempDir(), "top.qcow2")
	b, err := exec.Command(qemuImg, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top).CombinedOutput()
	require.NoError(t, err, string(b))
	qemuIOFile(t, top, "write -P 0x77 1028k 4k")
	testenv.WriteFileAt(t, raw, 1<<20+4096, bytes.Repeat([]byte{0x77}, 4096))
	incr := manifestOf(t, raw, `[{"start":1052672,"length":4096}]`)
	served = testenv.StartQemuNBD(t, top, ro)
	out, err = runCLICombined("verify", "--manifest", incr, "--image", top, served.URI)
	require.NoError(t, err, out)
	served.Kill()

	qemuIOFile(t, top, "write -P 0x99 1056k 1")
	served = testenv.StartQemuNBD(t, top, ro)
	out, err = runCLICombined("verify", "--manifest", incr, "--image", top, served.URI)
	require.ErrorContains(t, err, "differing from the parent")
	assert.Contains(t, out, "outside: offset 1056768 length 57344\n")
	leftovers, err := filepath.Glob(filepath.Join(tmp, "diskferry-verify*"))
	require.NoError(t, err)
	assert.Empty(t, leftovers, "the parent's export is gone")
}
