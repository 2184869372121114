// Package outfile writes a file an operator asked for (a restored disk) so that it appears
// complete or not at all: it is written under a temporary name in its directory, synced,
// and then linked to its name, which must not exist; an existing file is never replaced.
package outfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// Mode is the mode of every file written: a restored disk holds a VM's data, so only the
// hub's user and group may read it.
const Mode fs.FileMode = 0o640

// Errors the caller reports as invalid input; match them with errors.Is.
var (
	ErrNotAbsolute = errors.New("not an absolute path")
	ErrExists      = errors.New("exists; refusing to overwrite")
	ErrNoDir       = errors.New("directory does not exist")
)

// Check cleans path and checks the rules of an output: absolute, not existing (not even as
// a dangling symlink), in an existing directory.
func Check(path string) (string, error) {
	if !filepath.IsAbs(path) {
		return "", fmt.Errorf("%s: %w", path, ErrNotAbsolute)
	}
	clean := filepath.Clean(path)
	if clean == string(filepath.Separator) {
		return "", fmt.Errorf("%s: %w", path, ErrExists)
	}
	dir := filepath.Dir(clean)
	st, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) || (err == nil && !st.IsDir()) {
		return "", fmt.Errorf("%s: %w", dir, ErrNoDir)
	}
	if err != nil {
		return "", fmt.Errorf("%s: %w", dir, err)
	}
	if _, err := os.Lstat(clean); err == nil {
		return "", fmt.Errorf("%s %w", clean, ErrExists)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("%s: %w", clean, err)
	}
	return clean, nil
}

// Pending is an output being written under its temporary name.
type Pending struct {
	path string
	temp string
}

// TempName is the temporary name of path's file while it is written: hidden, in the same
// directory (a rename across file systems would copy), the same for every attempt so a
// retry replaces what a crashed one left.
func TempName(path string) string {
	return filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".diskferry-partial")
}

// Create checks path (Check) and creates its temporary file, empty, with Mode; a leftover
// of an earlier attempt is replaced.
func Create(path string) (*Pending, error) {
	clean, err := Check(path)
	if err != nil {
		return nil, err
	}
	p := &Pending{path: clean, temp: TempName(clean)}
	if err := os.Remove(p.temp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("remove leftover %s: %w", p.temp, err)
	}
	f, err := os.OpenFile(p.temp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, Mode)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", p.temp, err)
	}
	// The umask may have narrowed the mode; the group must read it.
	err = errors.Join(f.Chmod(Mode), f.Close())
	if err != nil {
		_ = os.Remove(p.temp)
		return nil, fmt.Errorf("create %s: %w", p.temp, err)
	}
	return p, nil
}

// Path is the output's final name.
func (p *Pending) Path() string { return p.path }

// Temp is where the content is written until Commit.
func (p *Pending) Temp() string { return p.temp }

// Commit syncs the temporary file and gives it its name, which must still be free (a file
// that appeared meanwhile is kept and ErrExists returned), then syncs the directory. On any
// failure the temporary file is removed.
func (p *Pending) Commit() error {
	if err := p.commit(); err != nil {
		_ = os.Remove(p.temp)
		return err
	}
	return nil
}

func (p *Pending) commit() error {
	f, err := os.OpenFile(p.temp, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("sync %s: %w", p.temp, err)
	}
	if err := errors.Join(f.Sync(), f.Close()); err != nil {
		return fmt.Errorf("sync %s: %w", p.temp, err)
	}
	// A link, unlike a rename, never replaces an existing file.
	if err := os.Link(p.temp, p.path); errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s %w", p.path, ErrExists)
	} else if err != nil {
		return fmt.Errorf("name %s: %w", p.path, err)
	}
	if err := os.Remove(p.temp); err != nil {
		return fmt.Errorf("remove %s: %w", p.temp, err)
	}
	return syncDir(filepath.Dir(p.path))
}

// Discard removes the temporary file; already gone is success.
func (p *Pending) Discard() error {
	if err := os.Remove(p.temp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("discard %s: %w", p.temp, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	if err := errors.Join(d.Sync(), d.Close()); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
