package catalog

import (
	"context"
	"fmt"
)

// PointOfVM is a point with the VM it belongs to, for operators' listings.
type PointOfVM struct {
	Point
	VM VM
}

// FindPoints returns points with their disks and VMs, newest first: every VM's when vm is
// empty, else those of the VMs named vm or with moref vm (a name may be shared by VMs of
// different vCenters; all of them are listed).
func (s *Store) FindPoints(ctx context.Context, vm string) ([]PointOfVM, error) {
	where := "TRUE"
	var args []any
	if vm != "" {
		where = "vm_id IN (SELECT id FROM vms WHERE name = ? OR moref = ?)"
		args = append(args, vm, vm)
	}
	points, err := s.pointsWithDisks(ctx, where+" ORDER BY started_at DESC, id DESC", args...)
	if err != nil {
		return nil, fmt.Errorf("list points of VM %q: %w", vm, err)
	}
	vms := map[int64]VM{}
	out := make([]PointOfVM, len(points))
	for i, p := range points {
		v, ok := vms[p.VMID]
		if !ok {
			if v, err = s.GetVM(ctx, p.VMID); err != nil {
				return nil, fmt.Errorf("VM of point %s: %w", p.ID, err)
			}
			vms[p.VMID] = v
		}
		out[i] = PointOfVM{Point: p, VM: v}
	}
	return out, nil
}
