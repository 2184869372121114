package hub

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/testenv"
)

// fullFS mounts a small tmpfs, fills it to the last byte and returns its path; it is
// unmounted on cleanup.
func fullFS(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=2m,mode=0700"); err != nil {
		testenv.Missing(t, "mount a tmpfs (needs root): %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	f, err := os.Create(filepath.Join(dir, "filler"))
	require.NoError(t, err)
	defer f.Close()
	chunk := make([]byte, 4096)
	for {
		if _, err := f.Write(chunk); err != nil {
			require.True(t, errors.Is(err, syscall.ENOSPC), "filling the tmpfs: %v", err)
			return dir
		}
	}
}

// A target that cannot be created on a full repository fails at once as NoSpace, not as a
// transient error retried for minutes.
func TestPrepareTargetOnFullRepository(t *testing.T) {
	testenv.Integration(t)
	root := filepath.Join(fullFS(t), "repo")
	require.NoError(t, os.Mkdir(root, 0o750))
	r := newRig(t, newStore(t), exportPorts(t, 4), filepath.Join(testenv.ShortTempDir(t), "run"), root, Settings{})
	plan, err := r.plan(t, "wf-full-repo", testVM(), activities.ModeAuto, diskA)
	require.NoError(t, err)
	err = r.run(t, activities.PrepareTargetName, activities.PrepareTargetInput{PointID: plan.PointID, VM: testVM(), Disk: plan.Disks[0]}, nil)
	appErr := requireAppError(t, err, activities.ErrNoSpace, true)
	assert.Contains(t, appErr.Error(), "the repository is full")
}
