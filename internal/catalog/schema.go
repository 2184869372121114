package catalog

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strconv"
	"strings"
)

// ErrSchemaBehind is a catalog whose schema is older than this build reads: a hub of this
// version has not started on it yet (hubs migrate when they start).
var ErrSchemaBehind = errors.New("catalog schema is older than this diskferry")

// LatestSchemaVersion is the version of the newest embedded migration.
func LatestSchemaVersion() (int64, error) {
	names, err := fs.Glob(migrations, "migrations/*.sql")
	if err != nil {
		return 0, fmt.Errorf("list migrations: %w", err)
	}
	var latest int64
	for _, name := range names {
		digits, _, _ := strings.Cut(path.Base(name), "_")
		v, err := strconv.ParseInt(digits, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("migration %s: version: %w", name, err)
		}
		latest = max(latest, v)
	}
	return latest, nil
}

// CheckSchema makes sure the catalog has every migration of this build, for readers that
// do not migrate (the CLI): they would otherwise fail on a missing column.
func (s *Store) CheckSchema(ctx context.Context) error {
	want, err := LatestSchemaVersion()
	if err != nil {
		return err
	}
	have, err := s.SchemaVersion(ctx)
	if err != nil {
		return err
	}
	if have < want {
		return fmt.Errorf("%w: it is at version %d, this build needs %d; start a hub of this version once (it migrates the catalog)",
			ErrSchemaBehind, have, want)
	}
	return nil
}
