package outfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCheckRules(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing")
	require.NoError(t, os.WriteFile(existing, []byte("keep"), 0o600))
	dangling := filepath.Join(dir, "dangling")
	require.NoError(t, os.Symlink(filepath.Join(dir, "nowhere"), dangling))
	file := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))

	for _, tc := range []struct {
		name, path string
		want       error
		msg        string
	}{
		{"relative", "out.raw", ErrNotAbsolute, "out.raw: not an absolute path"},
		{"exists", existing, ErrExists, existing + " exists; refusing to overwrite"},
		{"dangling symlink", dangling, ErrExists, dangling + " exists; refusing to overwrite"},
		{"no directory", filepath.Join(dir, "missing", "out.raw"), ErrNoDir, filepath.Join(dir, "missing") + ": directory does not exist"},
		{"parent is a file", filepath.Join(file, "out.raw"), ErrNoDir, file + ": directory does not exist"},
		{"root", "/", ErrExists, "exists; refusing to overwrite"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Check(tc.path)
			require.ErrorIs(t, err, tc.want)
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
	clean, err := Check(dir + "/./sub/../out.raw")
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, "out.raw"), clean)
}

func TestCreateCommitAppearsWhole(t *testing.T) {
	old := syscall.Umask(0o077)
	t.Cleanup(func() { syscall.Umask(old) })
	dir := t.TempDir()
	out := filepath.Join(dir, "disk.raw")
	// What a crashed attempt left is replaced.
	require.NoError(t, os.WriteFile(TempName(out), []byte("stale"), 0o600))

	p, err := Create(out)
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, ".disk.raw.diskferry-partial"), p.Temp())
	st, err := os.Stat(p.Temp())
	require.NoError(t, err)
	assert.Zero(t, st.Size(), "the leftover is gone")
	require.NoError(t, os.WriteFile(p.Temp(), []byte("content"), 0o600))
	assert.NoFileExists(t, out, "nothing under the name before the commit")

	require.NoError(t, p.Commit())
	data, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, "content", string(data))
	st, err = os.Stat(out)
	require.NoError(t, err)
	assert.Equal(t, Mode, st.Mode().Perm(), "mode despite the umask")
	assert.NoFileExists(t, p.Temp())
}

func TestCommitNeverReplaces(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "disk.raw")
	p, err := Create(out)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(out, []byte("theirs"), 0o600), "a file appears meanwhile")

	err = p.Commit()
	require.ErrorIs(t, err, ErrExists)
	data, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, "theirs", string(data))
	assert.NoFileExists(t, p.Temp(), "the temporary file is removed on failure")
}

func TestDiscard(t *testing.T) {
	p, err := Create(filepath.Join(t.TempDir(), "disk.raw"))
	require.NoError(t, err)
	require.NoError(t, p.Discard())
	_, err = os.Stat(p.Temp())
	assert.True(t, errors.Is(err, fs.ErrNotExist))
	require.NoError(t, p.Discard(), "already gone")
}
