package vsphere_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/vsphere"
	"github.com/diskferry/diskferry/internal/vsphere/vcsimtest"
)

func TestUploadFlatWritesTheWholeFileOverThePinnedConnection(t *testing.T) {
	lab := newLab(t, vcsimtest.Options{Disks: 1, DiskSize: diskSize})
	c := connect(t, lab)
	ctx := context.Background()
	flat, err := c.LiveDiskFlatURL(ctx, lab.VMMoref, lab.Disks[0].Key)
	require.NoError(t, err)
	data := make([]byte, diskSize)
	_, err = rand.Read(data)
	require.NoError(t, err)
	fill := func(w io.Writer) error {
		_, err := io.Copy(w, bytes.NewReader(data))
		return err
	}
	before, err := os.ReadFile(lab.Disks[0].FlatPath)
	require.NoError(t, err)

	wrongPin := "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33"
	err = vsphere.UploadFlat(ctx, flat, diskSize, vsphere.Trust{Thumbprint: wrongPin}, fill)
	var mismatch *vsphere.ThumbprintMismatchError
	require.ErrorAs(t, err, &mismatch)
	noCookie := flat
	noCookie.Cookie = ""
	err = vsphere.UploadFlat(ctx, noCookie, diskSize, vsphere.Trust{Thumbprint: lab.Thumbprint}, fill)
	require.ErrorContains(t, err, "401")
	after, err := os.ReadFile(lab.Disks[0].FlatPath)
	require.NoError(t, err)
	require.True(t, bytes.Equal(before, after), "refused uploads change nothing")

	require.NoError(t, vsphere.UploadFlat(ctx, flat, diskSize, vsphere.Trust{Thumbprint: lab.Thumbprint}, fill))
	after, err = os.ReadFile(lab.Disks[0].FlatPath)
	require.NoError(t, err)
	require.True(t, bytes.Equal(data, after), "the flat file is the upload")
	assert.NotContains(t, flat.URL, flat.Cookie, "the cookie is no part of the URL")
}
