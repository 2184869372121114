// Package chain carries out retention on one VM's qcow2 chains on the hub: it removes the
// points a plan drops and flattens the ones it makes full, by qemu-img commit and rebase and
// file removal, without a moment where a kept point reads differently from its backup.
//
// Every step is chosen from the catalog and the files as they are now, so a run killed at
// any moment (the worker or qemu-img) and run again finishes the job:
//
//   - a point to remove is marked deleting before any file changes; its disk rows then name
//     the files still to be removed;
//   - a kept disk backing onto a deleting point's file is made independent of it: a safe
//     rebase onto the nearest kept ancestor (qemu-img copies in what the dropped files
//     contributed before it rewrites the header), or, when every ancestor goes, a commit of
//     the kept file into the oldest (full) file, which then holds the kept point: the catalog
//     swaps the two files between the points in one transaction, so the deleting point's row
//     names the kept point's former file, now a leaf to remove;
//   - a deleting disk nothing backs onto (in the catalog and in every file's header) loses
//     its file first and its row second;
//   - a point to flatten has each disk rebased onto nothing (safe) and is then full.
package chain

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/repo"
)

// ErrInconsistent means the catalog and the files disagree in a way no step explains; the
// engine stops rather than guess, and names the file.
var ErrInconsistent = errors.New("catalog and files disagree")

// Plan is what Run carries out.
type Plan struct {
	Delete  []string // points to remove
	Flatten []string // kept points to make full
}

// Progress is what Run reports: before each action (Percent 0) and as qemu-img advances.
type Progress struct {
	Step    string
	Done    int // steps finished
	Total   int // steps known when the run started (it may need fewer)
	Percent float64
}

// Options tune Run.
type Options struct {
	OnProgress func(Progress) // optional; called synchronously
	Stall      time.Duration  // qemu-img without progress for that long is killed; 0: qemu's default
}

// Result is what a run did. A retry reports what it removed itself.
type Result struct {
	Deleted    []string // points of the plan no longer in the catalog
	Flattened  []string // points of the plan now full
	BytesFreed int64    // allocated bytes of the files this run removed
}

// Run carries out plan on the points cat holds: marks the points to remove deleting, then
// takes one step at a time, each recomputed from the catalog and the files, until none is
// left. Points already deleting (a killed earlier run) are finished too.
func Run(ctx context.Context, cat Catalog, files Files, plan Plan, opts Options) (Result, error) {
	if err := cat.MarkDeleting(ctx, plan.Delete); err != nil {
		return Result{}, fmt.Errorf("mark points deleting: %w", err)
	}
	r := runner{cat: cat, files: files, opts: opts, headers: map[string]string{}}
	points, err := cat.Points(ctx)
	if err != nil {
		return Result{}, fmt.Errorf("read points: %w", err)
	}
	r.total = newState(points, plan.Flatten).remaining()
	// Each step removes a row, a dependency or an incremental disk, so the count bounds them;
	// more means the engine is not converging and must stop.
	limit := 2*r.total + 2
	for {
		st := newState(points, plan.Flatten)
		s, err := st.next()
		if err != nil {
			return r.res, err
		}
		if s == nil {
			break
		}
		if r.done >= limit {
			return r.res, fmt.Errorf("retention made %d steps without finishing (last: %s)", r.done, s.describe())
		}
		if err := r.do(ctx, st, s); err != nil {
			return r.res, fmt.Errorf("%s: %w", s.describe(), err)
		}
		r.done++
		if points, err = cat.Points(ctx); err != nil {
			return r.res, fmt.Errorf("read points: %w", err)
		}
	}
	r.finish(points, plan)
	return r.res, nil
}

// Needed is how many bytes carrying out plan on points may write: a merge writes at most
// the data it moves (the dropped files a kept file depends on, and the kept file for a
// commit), a flatten at most its ancestors. allocated gives a file's allocated bytes.
func Needed(points []Point, plan Plan, allocated func(path string) int64) (int64, error) {
	marked := slices.Clone(points)
	for i := range marked {
		if slices.Contains(plan.Delete, marked[i].ID) {
			marked[i].Deleting = true
		}
	}
	st := newState(marked, plan.Flatten)
	var need int64
	for _, p := range st.points {
		if p.Deleting {
			continue
		}
		for _, d := range p.Disks {
			if d.ParentPath == "" {
				continue
			}
			flatten := slices.Contains(plan.Flatten, p.ID)
			owner, ok := st.owner[d.ParentPath]
			if !ok {
				return 0, fmt.Errorf("%w: %s backs onto %s, which no point holds", ErrInconsistent, d.Path, d.ParentPath)
			}
			if !owner.p.Deleting && !flatten {
				continue
			}
			need += allocated(d.Path)
			for ref, ok := owner, true; ok && (ref.p.Deleting || flatten); ref, ok = st.owner[ref.d.ParentPath] {
				need += allocated(ref.d.Path)
				if ref.d.ParentPath == "" {
					break
				}
			}
		}
	}
	return need, nil
}

// Allocated is a file's allocated bytes on its file system; 0 when it is missing.
func Allocated(path string) int64 {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0
	}
	return st.Blocks * 512
}

type runner struct {
	cat   Catalog
	files Files
	opts  Options
	// headers caches the backing file each file's header names, as read or as this run
	// rewrote it: only this run changes headers while it runs.
	headers map[string]string
	done    int
	total   int
	res     Result
}

func (r *runner) report(step string, percent float64) {
	if r.opts.OnProgress == nil {
		return
	}
	r.opts.OnProgress(Progress{Step: step, Done: r.done, Total: max(r.total, r.done+1), Percent: percent})
}

// act reports an action and then checks ctx: a run cancelled between actions stops there.
func (r *runner) act(ctx context.Context, what string) error {
	r.report(what, 0)
	return ctx.Err()
}

func (r *runner) merge(what string) qemu.MergeOptions {
	return qemu.MergeOptions{Stall: r.opts.Stall, OnProgress: func(p float64) { r.report(what, p) }}
}

func (r *runner) do(ctx context.Context, st *state, s *step) error {
	switch s.kind {
	case stepRemove:
		return r.remove(ctx, st, s)
	case stepForget:
		if err := r.act(ctx, s.describe()); err != nil {
			return err
		}
		return r.cat.RemovePoint(ctx, s.point.ID)
	case stepRebase:
		return r.rebase(ctx, s)
	case stepCommit:
		return r.commit(ctx, st, s)
	}
	return fmt.Errorf("unknown step %d", s.kind)
}

// remove deletes a deleting disk's file, which nothing backs onto any more, then its row.
func (r *runner) remove(ctx context.Context, st *state, s *step) error {
	// The catalog says nothing backs onto it; the files must agree, or a kept point would
	// lose a file its header names.
	for _, p := range st.points {
		for _, d := range p.Disks {
			if d.Key != s.disk.Key || d.Path == s.disk.Path {
				continue
			}
			backing, err := r.backingFile(ctx, d.Path)
			if err != nil {
				return err
			}
			if backing == s.disk.Path {
				return fmt.Errorf("%w: %s still backs onto %s", ErrInconsistent, d.Path, s.disk.Path)
			}
		}
	}
	if err := r.act(ctx, "remove "+s.disk.Path); err != nil {
		return err
	}
	size := Allocated(s.disk.Path)
	if err := r.files.RemoveTarget(s.disk.Path); err != nil {
		return err
	}
	delete(r.headers, s.disk.Path)
	r.res.BytesFreed += size
	if err := r.act(ctx, fmt.Sprintf("forget disk %d of point %s", s.disk.Key, s.point.ID)); err != nil {
		return err
	}
	if err := r.cat.RemoveDisk(ctx, s.point.ID, s.disk.Key); err != nil {
		return err
	}
	return r.files.RemoveDirIfEmpty(filepath.Dir(s.disk.Path))
}

// backingFile is the backing file a header names; a missing file (a deleting disk whose
// file went before its row) names none.
func (r *runner) backingFile(ctx context.Context, path string) (string, error) {
	if b, ok := r.headers[path]; ok {
		return b, nil
	}
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	b, err := qemu.BackingFile(ctx, path)
	if err != nil {
		return "", err
	}
	r.headers[path] = b
	return b, nil
}

// rebase makes a kept disk back onto onto (a kept ancestor, or nothing), safely.
func (r *runner) rebase(ctx context.Context, s *step) error {
	if err := r.act(ctx, s.describe()); err != nil {
		return err
	}
	backing, err := r.backingFile(ctx, s.disk.Path)
	if err != nil {
		return err
	}
	switch backing {
	case s.onto:
		// Rebased before the run stopped; only the catalog is behind.
	case s.disk.ParentPath:
		// Whatever happens to the header now, it is read again.
		delete(r.headers, s.disk.Path)
		if err := qemu.RepairLeaks(ctx, s.disk.Path); err != nil {
			return err
		}
		if err := qemu.Rebase(ctx, s.disk.Path, s.onto, r.merge(s.describe())); err != nil {
			return err
		}
		r.headers[s.disk.Path] = s.onto
	default:
		return fmt.Errorf("%w: %s backs onto %s, the catalog says %s", ErrInconsistent, s.disk.Path, backing, s.disk.ParentPath)
	}
	if err := r.act(ctx, fmt.Sprintf("record disk %d of point %s on %s", s.disk.Key, s.point.ID, displayFile(s.onto))); err != nil {
		return err
	}
	return r.cat.Repoint(ctx, []DiskChange{{PointID: s.point.ID, Key: s.disk.Key, Path: s.disk.Path, ParentPath: s.onto}})
}

// commit writes a kept disk, whose every ancestor goes, into the chain's full file, which
// then holds the kept point; the kept disk's own file passes to the deleting root point.
func (r *runner) commit(ctx context.Context, st *state, s *step) error {
	backing, err := r.backingFile(ctx, s.disk.Path)
	if err != nil {
		return err
	}
	flatten := &step{kind: stepRebase, point: s.point, disk: s.disk}
	if backing == "" {
		// The flatten chosen below rewrote the header before the run stopped; only the
		// catalog is behind.
		return r.rebase(ctx, flatten)
	}
	if backing != s.disk.ParentPath {
		return fmt.Errorf("%w: %s backs onto %s, the catalog says %s", ErrInconsistent, s.disk.Path, backing, s.disk.ParentPath)
	}
	cheaper, err := flattenMovesLess(ctx, s)
	if err != nil {
		return err
	}
	if cheaper {
		return r.rebase(ctx, flatten)
	}
	if err := r.act(ctx, s.describe()); err != nil {
		return err
	}
	root := s.root.d.Path
	// Run again after a kill, the commit writes the same data again: root belongs to a
	// deleting point and nothing kept reads it except through the kept file, which masks it.
	// The killed attempt's leaked clusters are freed first.
	if err := qemu.RepairLeaks(ctx, root); err != nil {
		return err
	}
	if err := qemu.Commit(ctx, s.disk.Path, root, r.merge(s.describe())); err != nil {
		return err
	}
	changes := []DiskChange{
		{PointID: s.point.ID, Key: s.disk.Key, Path: root},
		{PointID: s.root.p.ID, Key: s.disk.Key, Path: s.disk.Path, ParentPath: s.disk.ParentPath},
	}
	// Root now reads as the kept file, so what backed onto the kept file may back onto root
	// with a header change alone.
	for _, c := range st.children[s.disk.Path] {
		if err := r.act(ctx, "repoint "+c.d.Path+" onto "+root); err != nil {
			return err
		}
		b, err := r.backingFile(ctx, c.d.Path)
		if err != nil {
			return err
		}
		switch b {
		case root:
		case s.disk.Path:
			delete(r.headers, c.d.Path)
			if err := qemu.RebaseUnsafe(ctx, c.d.Path, root); err != nil {
				return err
			}
			r.headers[c.d.Path] = root
		case "":
			if c.p.Deleting {
				break // its file is gone already
			}
			fallthrough
		default:
			return fmt.Errorf("%w: %s backs onto %s, the catalog says %s", ErrInconsistent, c.d.Path, b, s.disk.Path)
		}
		changes = append(changes, DiskChange{PointID: c.p.ID, Key: c.d.Key, Path: c.d.Path, ParentPath: root})
	}
	// The kept point's block manifest describes its content, which root now holds; root's
	// own manifest described the dropped point.
	if err := r.act(ctx, "move manifest of "+s.disk.Path); err != nil {
		return err
	}
	if err := moveManifest(s.disk.Path, root); err != nil {
		return err
	}
	if err := r.act(ctx, fmt.Sprintf("record point %s in %s", s.point.ID, root)); err != nil {
		return err
	}
	return r.cat.Repoint(ctx, changes)
}

// flattenMovesLess reports whether flattening the kept disk of a commit step writes fewer
// bytes than the commit. Both leave every kept point reading the same, and the files
// between the kept disk and root go either way: the commit writes into root what lies
// above it (the kept disk's own clusters and those of the files between), the flatten
// writes into the kept disk what lies below it and shows through (the files between and
// root). They differ by the kept disk's own data against root's visible data: an
// incremental that rewrote most of what its full held is flattened almost for free, where
// the commit would copy all of it. A tie commits. Either choice is made again, the same
// way, by a run after a kill: a killed flatten only moved data up, which favours it more,
// and a killed commit wrote only what the kept disk masks.
func flattenMovesLess(ctx context.Context, s *step) (bool, error) {
	extents, err := qemu.Map(ctx, qemu.QCOW2(s.disk.Path))
	if err != nil {
		return false, err
	}
	var own, rootVisible int64
	for _, e := range extents {
		switch {
		case !e.Data:
		case e.Depth == 0:
			own += e.Length
		case e.Depth == s.rootDepth:
			rootVisible += e.Length
		}
	}
	return rootVisible < own, nil
}

func moveManifest(from, to string) error {
	src, dst := repo.ManifestPath(from), repo.ManifestPath(to)
	err := os.Rename(src, dst)
	if errors.Is(err, fs.ErrNotExist) {
		err = os.Remove(dst)
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("move manifest %s to %s: %w", src, dst, err)
	}
	return nil
}

// finish fills in the plan's points that are gone or full.
func (r *runner) finish(points []Point, plan Plan) {
	byID := map[string]Point{}
	for _, p := range points {
		byID[p.ID] = p
	}
	for _, id := range plan.Delete {
		if _, ok := byID[id]; !ok {
			r.res.Deleted = append(r.res.Deleted, id)
		}
	}
	for _, id := range plan.Flatten {
		p, ok := byID[id]
		if ok && !p.Deleting && !slices.ContainsFunc(p.Disks, func(d Disk) bool { return d.ParentPath != "" }) {
			r.res.Flattened = append(r.res.Flattened, id)
		}
	}
}

func displayFile(path string) string {
	if path == "" {
		return "nothing (standalone)"
	}
	return path
}
