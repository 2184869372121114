package catalog

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRecordHubUpsertsLivenessAndSpace(t *testing.T) {
	s := newStore(t)
	ctx := testCtx(t)

	// A hub named only by a lease has a row but was never seen.
	ports, err := NewPorts(s, PortRange{First: 10100, Last: 10101})
	require.NoError(t, err)
	_, err = ports.Allocate(ctx, "hub-b", "wf-1", 2000)
	require.NoError(t, err)

	before := now()
	require.NoError(t, s.RecordHub(ctx, "hub-a", 100, 50))
	require.NoError(t, s.RecordHub(ctx, "hub-a", 80, 70), "a second heartbeat updates the row")

	hubs, err := s.ListHubs(ctx)
	require.NoError(t, err)
	require.Len(t, hubs, 2)
	a, b := hubs[0], hubs[1]
	assert.Equal(t, "hub-a", a.ID)
	assert.Equal(t, int64(80), a.FreeBytes)
	assert.Equal(t, int64(70), a.UsedBytes)
	assert.False(t, a.LastSeen.Before(before), "last seen %s is before the heartbeat at %s", a.LastSeen, before)
	assert.True(t, a.Alive(a.LastSeen, 0))
	assert.False(t, a.Alive(a.LastSeen.Add(31*time.Second), 30*time.Second))

	assert.Equal(t, "hub-b", b.ID)
	assert.True(t, b.LastSeen.IsZero())
	assert.False(t, b.Alive(time.Now(), time.Hour), "a hub never seen is not alive")

	require.ErrorIs(t, s.RecordHub(ctx, "", 1, 1), ErrInvalid)
}
