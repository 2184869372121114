package hub

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/testenv"
)

// PlanBackup and ResolvePoint wait (ErrBusy, retryable: the step is retried) while the VM's
// retention runs and go ahead once it ended; a backup that waits opens no point. Not knowing
// whether a retention runs is retryable too.
func TestBackupAndRestoreWaitForRetention(t *testing.T) {
	testenv.Integration(t)
	var mu sync.Mutex
	var runningRef, running string
	var askErr error
	var asked []string
	r := newRig(t, newStore(t), exportPorts(t, 1), filepath.Join(testenv.ShortTempDir(t), "run"), filepath.Join(t.TempDir(), "repo"),
		Settings{RetentionRunning: func(_ context.Context, ref string) (string, error) {
			mu.Lock()
			defer mu.Unlock()
			asked = append(asked, ref)
			if ref != runningRef {
				return "", askErr
			}
			return running, askErr
		}})
	set := func(ref, id string, err error) {
		mu.Lock()
		defer mu.Unlock()
		runningRef, running, askErr = ref, id, err
	}
	ctx := context.Background()
	vm := testVM()
	plan, err := r.plan(t, "wf-1", vm, activities.ModeFull, diskA)
	require.NoError(t, err)
	r.commit(t, plan, map[int32]string{diskA: "/repo/p1.qcow2"}, nil)

	set(vm.Name, "retention-web", nil)
	_, err = r.plan(t, "wf-2", vm, activities.ModeAuto, diskA)
	appErr := requireAppError(t, err, activities.ErrBusy, false)
	assert.Equal(t, "plan backup of web 01/../x: the retention of VM web 01/../x is running (workflow retention-web); waiting until it ends", appErr.Message())
	points, err := r.store.FindPoints(ctx, vm.Moref)
	require.NoError(t, err)
	assert.Len(t, points, 1, "a waiting backup opens no point")
	_, err = r.resolve(t, activities.ResolvePointInput{PointID: plan.PointID})
	appErr = requireAppError(t, err, activities.ErrBusy, false)
	assert.Equal(t, "resolve point "+plan.PointID+": the retention of VM web 01/../x is running (workflow retention-web); waiting until it ends", appErr.Message())
	// An operator's retention asked for by moref counts as well.
	set(vm.Moref, "retention-vm-42", nil)
	_, err = r.resolve(t, activities.ResolvePointInput{VM: vm.Moref})
	appErr = requireAppError(t, err, activities.ErrBusy, false)
	assert.Contains(t, appErr.Message(), "(workflow retention-vm-42)")

	set("", "", errors.New("frontend unavailable"))
	_, err = r.plan(t, "wf-2", vm, activities.ModeAuto, diskA)
	require.ErrorContains(t, err, "plan backup of web 01/../x: is a retention of VM web 01/../x running: frontend unavailable")
	require.True(t, errors.As(err, &appErr))
	assert.False(t, appErr.NonRetryable())

	set("", "", nil)
	src, err := r.resolve(t, activities.ResolvePointInput{PointID: plan.PointID})
	require.NoError(t, err)
	assert.Equal(t, plan.PointID, src.PointID)
	next, err := r.plan(t, "wf-2", vm, activities.ModeAuto, diskA)
	require.NoError(t, err)
	assert.NotEmpty(t, next.PointID)
	mu.Lock()
	defer mu.Unlock()
	for _, ref := range asked {
		assert.Contains(t, []string{vm.Name, vm.Moref}, ref, "the retention is looked up by the catalog's VM name and moref")
	}
	assert.Contains(t, asked, vm.Moref)
}
