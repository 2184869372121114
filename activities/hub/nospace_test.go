package hub

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/testenv"
)

// smallFS mounts a tmpfs of the size ("2m") and returns its path; it is unmounted on
// cleanup.
func smallFS(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size+",mode=0700"); err != nil {
		testenv.Missing(t, "mount a tmpfs (needs root): %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

// fullFS mounts a small tmpfs, fills it to the last byte and returns its path; it is
// unmounted on cleanup.
func fullFS(t *testing.T) string {
	t.Helper()
	dir := smallFS(t, "2m")
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
	assert.Contains(t, appErr.Error(), "not enough space in the repository")
}

// spaceRig is the hub activities on a repository in a tmpfs of the size.
func spaceRig(t *testing.T, size string, margin string) (*rig, string) {
	t.Helper()
	testenv.Integration(t)
	root := filepath.Join(smallFS(t, size), "repo")
	m, err := repo.ParseMargin(margin)
	require.NoError(t, err)
	return newRig(t, newStore(t), exportPorts(t, 1), filepath.Join(testenv.ShortTempDir(t), "run"), root,
		Settings{RepositoryMargin: m}), root
}

// A disk whose capacity does not fit in the free space is refused before anything is
// written, with the numbers: what it needs, what is free, the margin.
func TestPrepareTargetRefusesDiskThatWouldNotFit(t *testing.T) {
	r, root := spaceRig(t, "4m", "")
	plan, err := r.plan(t, "wf-small-repo", testVM(), activities.ModeAuto, diskA)
	require.NoError(t, err)
	space, err := r.layout.Space()
	require.NoError(t, err)
	err = r.run(t, activities.PrepareTargetName, activities.PrepareTargetInput{PointID: plan.PointID, VM: testVM(), Disk: plan.Disks[0]}, nil)
	appErr := requireAppError(t, err, activities.ErrNoSpace, true)
	assert.Equal(t, fmt.Sprintf("prepare target: not enough space in the repository %s for disk %d: it needs up to %d bytes "+
		"(full copy of a 8.0 MiB disk), %d bytes are free and %d bytes are kept free as the margin "+
		"(DISKFERRY_REPOSITORY_MARGIN 5%% or 1GiB, whichever is smaller)", root, diskA, capacity, space.Free, space.Total/20), appErr.Message())
	target, err := r.layout.TargetPath(testVM().Name, testVM().Moref, plan.PointID, diskA)
	require.NoError(t, err)
	assert.NoFileExists(t, target)
}

// The same disk fits a larger file system, unless the margin set keeps too much free; an
// incremental is held to its capacity too.
func TestPrepareTargetKeepsTheMargin(t *testing.T) {
	r, _ := spaceRig(t, "16m", "")
	var incr activities.Plan
	plan, target := r.fullTarget(t, "wf-fits")
	assert.FileExists(t, target.Path)
	r.commit(t, plan, map[int32]string{diskA: target.Path}, map[int32]string{diskA: "52aa 01/11"})

	margin, err := repo.ParseMargin("10MiB")
	require.NoError(t, err)
	r.acts.settings.RepositoryMargin = margin
	incr, err = r.plan(t, "wf-incr", testVM(), activities.ModeAuto, diskA)
	require.NoError(t, err)
	require.Equal(t, activities.ModeIncremental, incr.Disks[0].Mode)
	err = r.run(t, activities.PrepareTargetName, activities.PrepareTargetInput{PointID: incr.PointID, VM: testVM(), Disk: incr.Disks[0]}, nil)
	appErr := requireAppError(t, err, activities.ErrNoSpace, true)
	assert.Contains(t, appErr.Message(), "(incremental copy of a 8.0 MiB disk)")
	assert.Contains(t, appErr.Message(), "10485760 bytes are kept free as the margin (DISKFERRY_REPOSITORY_MARGIN 10485760 bytes)")
}
