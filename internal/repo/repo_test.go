package repo

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newLayout(t *testing.T) Layout {
	t.Helper()
	l, err := New(filepath.Join(t.TempDir(), "repo"))
	require.NoError(t, err)
	return l
}

func TestSafeName(t *testing.T) {
	cases := map[string]string{
		"web-01":           "web-01",
		"../../etc":        "_._.._etc",
		"a/b":              "a_b",
		"":                 "_",
		".hidden":          "_hidden",
		"..":               "_.",
		"Übung тест":       "_bung_____",
		"vm:with spaces\n": "vm_with_spaces_",
		"a\\b\x00c":        "a_b_c",
	}
	for in, want := range cases {
		assert.Equal(t, want, SafeName(in), "SafeName(%q)", in)
	}
	long := SafeName(strings.Repeat("é", 500))
	assert.Len(t, long, maxNameLen)
	for _, in := range []string{"../../etc", "a/b", "", ".", "..", "/", "日本語", strings.Repeat("x/", 300)} {
		out := SafeName(in)
		assert.Regexp(t, `^[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}$`, out, "SafeName(%q)", in)
	}
}

func TestTargetPathStaysUnderRoot(t *testing.T) {
	l := newLayout(t)
	path, err := l.TargetPath("web 01", "vm-42", "20261126T184912.123Z-9f2c41d7", 2000)
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(l.Root, "web_01-vm-42", "20261126T184912.123Z-9f2c41d7", "disk-2000.qcow2"), path)

	for _, name := range []string{"../../etc", "a/b", "", "..", "/etc/passwd", "ключ"} {
		for _, moref := range []string{"vm-1", "../..", "/", "x/../../y"} {
			p, err := l.TargetPath(name, moref, "p1", -5)
			require.NoError(t, err)
			assert.True(t, l.Contains(p), "%q under root for name %q moref %q", p, name, moref)
			rel, err := filepath.Rel(l.Root, p)
			require.NoError(t, err)
			assert.Len(t, strings.Split(rel, string(filepath.Separator)), 3, "%q", rel)
		}
	}

	_, err = l.TargetPath("vm", "", "p1", 1)
	assert.ErrorIs(t, err, ErrInvalidName, "empty moref")
	for _, id := range []string{"", "..", "../x", "a/b", ".hidden", "ü"} {
		_, err = l.PointDir("vm", "vm-1", id)
		assert.ErrorIs(t, err, ErrInvalidName, "point id %q", id)
	}
}

func TestEnsurePointDirAndRemoveAreIdempotent(t *testing.T) {
	l := newLayout(t)
	dir, err := l.EnsurePointDir("../../etc", "vm-7", "p1")
	require.NoError(t, err)
	again, err := l.EnsurePointDir("../../etc", "vm-7", "p1")
	require.NoError(t, err)
	assert.Equal(t, dir, again)

	target, err := l.TargetPath("../../etc", "vm-7", "p1", 2000)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(target, []byte("qcow"), 0o600))

	require.NoError(t, l.RemoveTarget(target))
	assert.NoFileExists(t, target)
	require.NoError(t, l.RemoveTarget(target), "removing again")

	require.NoError(t, os.WriteFile(target, []byte("qcow"), 0o600))
	require.NoError(t, l.RemovePointDir(dir))
	assert.NoDirExists(t, dir)
	require.NoError(t, l.RemovePointDir(dir), "removing again")
	assert.DirExists(t, filepath.Dir(dir), "the VM directory stays")
}

// Restore points hold whole disks: neither the root nor a VM's or a point's directory is
// open to others.
func TestDirectoriesAreClosedToOthers(t *testing.T) {
	l := newLayout(t)
	dir, err := l.EnsurePointDir("vm", "vm-1", "p1")
	require.NoError(t, err)
	for _, d := range []string{l.Root, filepath.Dir(dir), dir} {
		st, err := os.Stat(d)
		require.NoError(t, err)
		assert.Zero(t, st.Mode().Perm()&0o027, "%s has mode %04o, want 0750 or tighter", d, st.Mode().Perm())
	}
}

func TestRemoveRefusesPathsOutsideTheLayout(t *testing.T) {
	l := newLayout(t)
	outside := t.TempDir()
	victim := filepath.Join(outside, "victim")
	require.NoError(t, os.WriteFile(victim, []byte("keep"), 0o600))
	dir, err := l.EnsurePointDir("vm", "vm-1", "p1")
	require.NoError(t, err)

	for _, path := range []string{
		victim,
		outside,
		l.Root,
		filepath.Dir(dir),                   // a VM directory, not a point
		filepath.Join(l.Root, "..", "repo"), // the root again
		filepath.Join(dir, "..", "..", "..", "x"), // climbs out
		"relative/path",
		"",
	} {
		assert.ErrorIs(t, l.RemovePointDir(path), ErrOutsideRoot, "RemovePointDir(%q)", path)
		assert.ErrorIs(t, l.RemoveTarget(path), ErrOutsideRoot, "RemoveTarget(%q)", path)
	}
	assert.ErrorIs(t, l.RemoveTarget(dir), ErrOutsideRoot, "a point directory is not a target")

	// A VM directory that is a symlink to elsewhere must not be followed.
	require.NoError(t, os.Symlink(outside, filepath.Join(l.Root, "evil-vm-9")))
	assert.ErrorIs(t, l.RemoveTarget(filepath.Join(l.Root, "evil-vm-9", "x", "victim")), ErrOutsideRoot)
	require.NoError(t, os.MkdirAll(filepath.Join(outside, "p1"), 0o750))
	assert.ErrorIs(t, l.RemovePointDir(filepath.Join(l.Root, "evil-vm-9", "p1")), ErrOutsideRoot)
	_, err = l.EnsurePointDir("evil", "vm-9", "p2")
	assert.ErrorIs(t, err, ErrOutsideRoot, "no directory is created through the link")
	assert.NoDirExists(t, filepath.Join(outside, "p2"))

	// A point directory that is a symlink is refused, its target untouched.
	require.NoError(t, os.Symlink(outside, filepath.Join(filepath.Dir(dir), "p-link")))
	assert.ErrorIs(t, l.RemovePointDir(filepath.Join(filepath.Dir(dir), "p-link")), ErrOutsideRoot)

	// A target that is a symlink: the link goes, the file it points to stays.
	link := filepath.Join(dir, "disk-1.qcow2")
	require.NoError(t, os.Symlink(victim, link))
	require.NoError(t, l.RemoveTarget(link))
	assert.NoFileExists(t, link)
	assert.FileExists(t, victim)

	// A point directory holding a link to outside: the link goes, the outside stays.
	require.NoError(t, os.Symlink(outside, filepath.Join(dir, "escape")))
	require.NoError(t, l.RemovePointDir(dir))
	assert.FileExists(t, victim)
}

func TestRootBehindSymlinkWorks(t *testing.T) {
	target := t.TempDir()
	link := filepath.Join(t.TempDir(), "root-link")
	require.NoError(t, os.Symlink(target, link))
	l, err := New(link)
	require.NoError(t, err)
	dir, err := l.EnsurePointDir("vm", "vm-1", "p1")
	require.NoError(t, err)
	assert.DirExists(t, filepath.Join(target, "vm-vm-1", "p1"))
	pathViaLink, err := l.PointDir("vm", "vm-1", "p1")
	require.NoError(t, err)
	require.NoError(t, l.RemovePointDir(pathViaLink))
	assert.NoDirExists(t, dir)

	_, err = New("relative")
	assert.Error(t, err)
}
