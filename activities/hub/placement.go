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

// placeBackup picks the hub of a backup (docs/architecture.md, Placement). A VM with a
// complete point stays on the hub of its newest one, where its chain lives, alive or not:
// note then says that the backup waits for that hub's worker (the hub-host steps' worker
// wait bounds it). A VM without one goes to the alive hub with the most room: free bytes at
// its last heartbeat less the disk capacity of the backups running on it (so a burst of new
// VMs spreads instead of all landing on the hub that was freest before they began), the
// smallest id on a tie; none alive is a retryable ErrNoHub naming every hub and when it was
// last seen. Which hub worker runs this does not matter.
func (a *Activities) placeBackup(ctx context.Context, vm catalog.VM, last catalog.Point, hasLast bool) (hubID, note string, err error) {
	hubs, err := a.store.ListHubs(ctx)
	if err != nil {
		return "", "", fmt.Errorf("plan backup of %s: place it: %w", vm.Name, err)
	}
	at := time.Now()
	within := aliveHeartbeats * a.settings.HubHeartbeat
	if hasLast {
		for _, h := range hubs {
			if h.ID == last.Hub && !h.Alive(at, within) {
				note = fmt.Sprintf("hub %s holding VM %s's chain was last seen %s; waiting for its worker", h.ID, vm.Name, seenAgo(h, at))
			}
		}
		return last.Hub, note, nil
	}
	var best *catalog.Hub
	for i, h := range hubs {
		// ListHubs is ordered by id: on a tie the first, smallest id stays.
		if h.Alive(at, within) && (best == nil || h.Room() > best.Room()) {
			best = &hubs[i]
		}
	}
	if best != nil {
		return best.ID, "", nil
	}
	seen := make([]string, len(hubs))
	for i, h := range hubs {
		seen[i] = fmt.Sprintf("hub %s last seen %s", h.ID, seenAgo(h, at))
	}
	if len(seen) == 0 {
		seen = []string{"no hub has recorded itself in the catalog"}
	}
	return "", "", temporal.NewApplicationError(fmt.Sprintf(
		"plan backup of %s: no hub is alive to start its chain (%s; a hub is alive when its worker recorded itself within %s); start a hub worker",
		vm.Name, strings.Join(seen, ", "), within), activities.ErrNoHub)
}

// seenAgo says when a hub's worker was last seen, for people.
func seenAgo(h catalog.Hub, at time.Time) string {
	if h.LastSeen.IsZero() {
		return "never (no worker of this version has run on it)"
	}
	// A clock a little ahead on the hub says "0s ago", not a negative age.
	return max(at.Sub(h.LastSeen), 0).Round(time.Second).String() + " ago"
}
