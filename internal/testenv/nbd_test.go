package testenv_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/nbd"
	"github.com/diskferry/diskferry/internal/testenv"
)

func TestQemuNBDExportSizeOverNBD(t *testing.T) {
	path := testenv.CreateQcow2(t, 64<<20)
	srv := testenv.StartQemuNBD(t, path, testenv.QemuNBDOptions{})
	h, err := nbd.Connect(context.Background(), srv.URI, nbd.Options{})
	require.NoError(t, err)
	defer h.Close()
	size, err := h.Size()
	require.NoError(t, err)
	require.Equal(t, int64(64<<20), size)
}

func TestNbdkitFileSizeOverNBD(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.raw")
	require.NoError(t, os.Truncate(createEmpty(t, path), 3<<20))
	srv := testenv.StartNbdkitFile(t, path, testenv.NbdkitOptions{})
	h, err := nbd.Connect(context.Background(), srv.URI, nbd.Options{})
	require.NoError(t, err)
	defer h.Close()
	size, err := h.Size()
	require.NoError(t, err)
	require.Equal(t, int64(3<<20), size)
}

func createEmpty(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Create(path)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	return path
}
