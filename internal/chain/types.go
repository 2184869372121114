package chain

import "context"

// Disk is one disk of a point as the catalog records it: the file holding it and the file
// that file backs onto ("" for a standalone file).
type Disk struct {
	Key        int32
	Path       string
	ParentPath string
}

// Point is a complete or deleting point of the VM.
type Point struct {
	ID       string
	Deleting bool
	Disks    []Disk // by key
}

// DiskChange sets where one disk of a point lives.
type DiskChange struct {
	PointID    string
	Key        int32
	Path       string
	ParentPath string
}

// Catalog is the engine's view of one VM's points. Every method is idempotent.
type Catalog interface {
	// Points lists the VM's complete and deleting points with their disks, oldest first.
	Points(ctx context.Context) ([]Point, error)
	// MarkDeleting marks complete points deleting; deleting or absent ones are skipped.
	MarkDeleting(ctx context.Context, ids []string) error
	// Repoint applies the changes in one transaction; a point whose disks all stand alone
	// becomes full.
	Repoint(ctx context.Context, changes []DiskChange) error
	// RemoveDisk forgets a disk of a deleting point, once its file is gone.
	RemoveDisk(ctx context.Context, pointID string, key int32) error
	// RemovePoint forgets a deleting point without disks; its children take its parent.
	RemovePoint(ctx context.Context, pointID string) error
}

// Files removes what the repository holds.
type Files interface {
	// RemoveTarget removes a disk file and what lies beside it; a missing file is removed.
	RemoveTarget(path string) error
	// RemoveDirIfEmpty removes a point directory once it holds nothing.
	RemoveDirIfEmpty(dir string) error
}
