package hub

import (
	"context"
	"fmt"
	"strings"
	"time"

	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
)

// aliveHeartbeats is how many heartbeats a hub may miss and still count as alive.
const aliveHeartbeats = 3

// chainNote says, for a VM with a complete point, that its backup waits for the worker of the
// hub holding its chain when that hub is not alive; empty when it is (docs/architecture.md,
// Placement). The backup goes to that hub whatever: the hub-host steps' worker wait bounds it.
func (a *Activities) chainNote(ctx context.Context, vm catalog.VM, hubID string) (string, error) {
	hubs, err := a.store.ListHubs(ctx)
	if err != nil {
		return "", fmt.Errorf("plan backup of %s: is hub %s alive: %w", vm.Name, hubID, err)
	}
	at := time.Now()
	for _, h := range hubs {
		if h.ID == hubID && !h.Alive(at, a.aliveWithin()) {
			return fmt.Sprintf("hub %s holding VM %s's chain was last seen %s; waiting for its worker", h.ID, vm.Name, seenAgo(h, at)), nil
		}
	}
	return "", nil
}

// chooseHub places the new chain of a VM without a complete point; OpenPoint calls it with
// the hubs read under the placement lock, so placements at the same moment see each other's
// points. It picks the alive hub with the most room: free bytes at its last heartbeat less
// the disk capacity of the backups running on it (so a burst of new VMs spreads instead of
// all landing on the hub that was freest before they began), the smallest id on a tie; none
// alive is a retryable ErrNoHub naming every hub and when it was last seen. Which hub worker
// runs this does not matter.
func (a *Activities) chooseHub(vm catalog.VM) catalog.ChooseHub {
	return func(hubs []catalog.Hub) (string, error) {
		at := time.Now()
		within := a.aliveWithin()
		var best *catalog.Hub
		for i, h := range hubs {
			// ListHubs is ordered by id: on a tie the first, smallest id stays.
			if h.Alive(at, within) && (best == nil || h.Room() > best.Room()) {
				best = &hubs[i]
			}
		}
		if best != nil {
			return best.ID, nil
		}
		seen := make([]string, len(hubs))
		for i, h := range hubs {
			seen[i] = fmt.Sprintf("hub %s last seen %s", h.ID, seenAgo(h, at))
		}
		if len(seen) == 0 {
			seen = []string{"no hub has recorded itself in the catalog"}
		}
		return "", temporal.NewApplicationError(fmt.Sprintf(
			"plan backup of %s: no hub is alive to start its chain (%s; a hub is alive when its worker recorded itself within %s); start a hub worker",
			vm.Name, strings.Join(seen, ", "), within), activities.ErrNoHub)
	}
}

// aliveWithin is how recently a hub's worker must have recorded itself to count as alive.
func (a *Activities) aliveWithin() time.Duration { return aliveHeartbeats * a.settings.HubHeartbeat }

// seenAgo says when a hub's worker was last seen, for people.
func seenAgo(h catalog.Hub, at time.Time) string {
	if h.LastSeen.IsZero() {
		return "never (no worker of this version has run on it)"
	}
	// A clock a little ahead on the hub says "0s ago", not a negative age.
	return max(at.Sub(h.LastSeen), 0).Round(time.Second).String() + " ago"
}
