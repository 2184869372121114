package coverage

import (
	"cmp"
	"context"
	"errors"
	"fmt"

	"github.com/diskferry/diskferry/internal/nbd"
	"github.com/diskferry/diskferry/internal/qemu"
)

// ErrInvalid marks a request VerifyImage cannot judge (bad areas, an image without a cluster
// size); a retry does not change it.
var ErrInvalid = errors.New("invalid coverage check")

// Server serves an image read-only and returns its NBD URI (accepting Readers connections)
// and how to stop it.
type Server func(ctx context.Context, path string) (uri string, stop func(), err error)

// VerifyImage proves that the qcow2 at path holds what a copy of the areas wrote and nothing
// else. With nil areas the copy wrote the whole disk and there is nothing outside to check.
// Otherwise the image's own clusters (qemu-img map of its layer alone, metadata only) must
// lie inside the areas. An image without backing file reads as zeros wherever it allocates
// nothing and in its zero clusters, so the map proves every other area zero. An overlay
// reads its parent there, and any cluster of its own, a zero cluster too, replaces the
// parent's content. Where an area ends mid-cluster, the rest of the cluster is allocated
// too: those bytes are read from uri, which serves the image, and must be zeros, or on an
// overlay the parent's (copy-on-write filled them from it; serve exports the parent, only
// when needed). Which kind the image is comes from its header's backing file, which no NBD
// client can change.
//
// Data the copy did not write gives a *RangeError naming the ranges; the image should not
// be written meanwhile (the caller's read-only export keeps writers out).
func VerifyImage(ctx context.Context, path string, areas []Extent, uri string, serve Server, opts nbd.Options) error {
	if areas == nil {
		return nil
	}
	info, err := qemu.Info(ctx, path)
	if err != nil {
		return err
	}
	extents, err := qemu.MapLayer(ctx, path)
	if err != nil {
		return err
	}
	var alloc []Allocation
	for _, e := range extents {
		if e.Present || e.Data {
			alloc = append(alloc, Allocation{Start: e.Start, Length: e.Length, Zero: !e.Data})
		}
	}
	layer, parent := Standalone, ""
	if info.BackingFile != "" {
		layer, parent = Overlay, cmp.Or(info.FullBackingFile, info.BackingFile)
	}
	found, err := Check(alloc, areas, info.ClusterSize, layer)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if len(found.Stray) > 0 {
		return &RangeError{What: "allocated outside the copied areas", Ranges: found.Stray}
	}
	if len(found.Partial) == 0 {
		return nil
	}
	refURI, what := "", "in clusters the copy shares, outside its areas, not reading as zeros"
	if layer == Overlay {
		ref, stop, err := serve(ctx, parent)
		if err != nil {
			return fmt.Errorf("serve parent %s: %w", parent, err)
		}
		defer stop()
		refURI, what = ref, "in clusters the copy shares, outside its areas, differing from the parent"
	}
	differ, err := Differing(ctx, uri, refURI, found.Partial, opts)
	if err != nil {
		return err
	}
	if len(differ) > 0 {
		return &RangeError{What: what, Ranges: differ}
	}
	return nil
}
