package chain

import (
	"fmt"
	"slices"
)

type stepKind int

const (
	stepRemove stepKind = iota + 1 // a deleting disk nothing backs onto: file, then row
	stepForget                     // a deleting point without disks: its row
	stepRebase                     // a kept disk onto a kept ancestor or nothing (safe)
	stepCommit                     // a kept disk into its chain's deleting full file
)

type ref struct {
	p *Point
	d Disk
}

type step struct {
	kind  stepKind
	point *Point
	disk  Disk
	onto  string // stepRebase: the new backing file, "" to flatten
	root  ref    // stepCommit: the full file committed into
	// rootDepth (stepCommit) is root's depth below the kept disk in its backing chain: 1
	// for its parent, 2 for its grandparent...
	rootDepth int
}

func (s *step) describe() string {
	switch s.kind {
	case stepRemove:
		return fmt.Sprintf("remove disk %d of point %s (%s)", s.disk.Key, s.point.ID, s.disk.Path)
	case stepForget:
		return "remove point " + s.point.ID
	case stepRebase:
		if s.onto == "" {
			return fmt.Sprintf("flatten disk %d of point %s", s.disk.Key, s.point.ID)
		}
		return fmt.Sprintf("rebase disk %d of point %s onto %s", s.disk.Key, s.point.ID, s.onto)
	case stepCommit:
		return fmt.Sprintf("commit disk %d of point %s into point %s's file %s", s.disk.Key, s.point.ID, s.root.p.ID, s.root.d.Path)
	}
	return "unknown step"
}

// state indexes the points by file.
type state struct {
	points   []Point
	flatten  []string
	owner    map[string]ref   // file → the point disk it holds
	children map[string][]ref // file → the point disks backing onto it
}

func newState(points []Point, flatten []string) *state {
	st := &state{points: points, flatten: flatten, owner: map[string]ref{}, children: map[string][]ref{}}
	for i := range st.points {
		p := &st.points[i]
		for _, d := range p.Disks {
			st.owner[d.Path] = ref{p: p, d: d}
			if d.ParentPath != "" {
				st.children[d.ParentPath] = append(st.children[d.ParentPath], ref{p: p, d: d})
			}
		}
	}
	return st
}

// remaining counts the steps left, as far as they can be told now.
func (st *state) remaining() int {
	n := 0
	for _, p := range st.points {
		if p.Deleting {
			n += len(p.Disks) + 1
			continue
		}
		for _, d := range p.Disks {
			if d.ParentPath == "" {
				continue
			}
			if o, ok := st.owner[d.ParentPath]; (ok && o.p.Deleting) || slices.Contains(st.flatten, p.ID) {
				n++
			}
		}
	}
	return n
}

// next is the step to take now, nil when done. Removals come first (they only free space),
// then what frees kept disks from deleting files, then flattening.
func (st *state) next() (*step, error) {
	for i := range st.points {
		p := &st.points[i]
		if !p.Deleting {
			continue
		}
		for _, d := range p.Disks {
			if len(st.children[d.Path]) == 0 {
				return &step{kind: stepRemove, point: p, disk: d}, nil
			}
		}
		if len(p.Disks) == 0 {
			return &step{kind: stepForget, point: p}, nil
		}
	}
	for i := range st.points {
		p := &st.points[i]
		if p.Deleting {
			continue
		}
		for _, d := range p.Disks {
			if d.ParentPath == "" {
				continue
			}
			parent, ok := st.owner[d.ParentPath]
			if !ok {
				return nil, fmt.Errorf("%w: disk %d of point %s backs onto %s, which no point holds", ErrInconsistent, d.Key, p.ID, d.ParentPath)
			}
			if !parent.p.Deleting {
				continue
			}
			return st.free(p, d, parent)
		}
	}
	for i := range st.points {
		p := &st.points[i]
		if p.Deleting || !slices.Contains(st.flatten, p.ID) {
			continue
		}
		for _, d := range p.Disks {
			if d.ParentPath != "" {
				return &step{kind: stepRebase, point: p, disk: d}, nil
			}
		}
	}
	return nil, nil
}

// free chooses how a kept disk stops depending on the deleting file it backs onto: a rebase
// onto its nearest kept ancestor; a commit into the chain's full file when every ancestor
// goes and the chain down to it does not branch (a commit changes what every descendant
// of the full file reads), which the run turns into a flatten when that moves fewer bytes
// (flattenMovesLess); otherwise a flatten.
func (st *state) free(p *Point, d Disk, parent ref) (*step, error) {
	linear := true
	cur := parent
	depth := 0
	for ; ; depth++ {
		if depth > len(st.points) {
			return nil, fmt.Errorf("%w: the backing chain of %s loops", ErrInconsistent, d.Path)
		}
		if !cur.p.Deleting {
			return &step{kind: stepRebase, point: p, disk: d, onto: cur.d.Path}, nil
		}
		linear = linear && len(st.children[cur.d.Path]) == 1
		if cur.d.ParentPath == "" {
			break
		}
		next, ok := st.owner[cur.d.ParentPath]
		if !ok {
			return nil, fmt.Errorf("%w: %s backs onto %s, which no point holds", ErrInconsistent, cur.d.Path, cur.d.ParentPath)
		}
		cur = next
	}
	if linear {
		return &step{kind: stepCommit, point: p, disk: d, root: cur, rootDepth: depth + 1}, nil
	}
	return &step{kind: stepRebase, point: p, disk: d}, nil
}
