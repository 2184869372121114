package nbdkit

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/diskferry/diskferry/internal/nbdprobe"
	"github.com/diskferry/diskferry/internal/testenv"
)

// vcsimDisk is a VM disk's flat file on a vcsim datastore, filled with known bytes.
type vcsimDisk struct {
	server  *simulator.Server
	url     string // datastore HTTPS URL of the flat file
	cookie  string // the API session's cookie
	content []byte
}

func newVCSimDisk(t *testing.T) vcsimDisk {
	t.Helper()
	testenv.Integration(t)
	model := simulator.VPX()
	require.NoError(t, model.Create())
	t.Cleanup(model.Remove)
	model.Service.TLS = new(tls.Config)
	s := model.Service.NewServer()
	t.Cleanup(s.Close)
	ctx := testCtx(t)

	sc := soap.NewClient(s.URL, false)
	sc.SetThumbprint(s.URL.Host, soap.ThumbprintSHA1(s.Certificate()))
	vc, err := vim25.NewClient(ctx, sc)
	require.NoError(t, err)
	require.NoError(t, session.NewManager(vc).Login(ctx, s.URL.User))

	finder := find.NewFinder(vc)
	dc, err := finder.DefaultDatacenter(ctx)
	require.NoError(t, err)
	finder.SetDatacenter(dc)
	vms, err := finder.VirtualMachineList(ctx, "*")
	require.NoError(t, err)
	devices, err := vms[0].Device(ctx)
	require.NoError(t, err)
	disks := devices.SelectByType((*types.VirtualDisk)(nil))
	require.NotEmpty(t, disks)
	backing := disks[0].(*types.VirtualDisk).Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	var dsPath object.DatastorePath
	require.True(t, dsPath.FromString(backing.FileName), backing.FileName)
	flat := strings.TrimSuffix(dsPath.Path, ".vmdk") + "-flat.vmdk"

	ds, err := finder.Datastore(ctx, dsPath.Datastore)
	require.NoError(t, err)
	var dsMo mo.Datastore
	require.NoError(t, ds.Properties(ctx, ds.Reference(), []string{"summary"}, &dsMo))
	// vcsim's datastore summary.url is a local directory.
	local := filepath.Join(dsMo.Summary.Url, filepath.FromSlash(flat))
	content := randomBytes(t, 2<<20+4096)
	require.NoError(t, os.WriteFile(local, content, 0o600))

	var cookie string
	for _, c := range sc.Jar.Cookies(s.URL) {
		if c.Name == "vmware_soap_session" {
			cookie = c.String()
		}
	}
	require.NotEmpty(t, cookie, "logged-in session has a cookie")
	return vcsimDisk{
		server:  s,
		url:     DatastoreURL(s.URL.Host, dc.InventoryPath, dsPath.Datastore, flat),
		cookie:  cookie,
		content: content,
	}
}

func TestCurlSourceFromVCSim(t *testing.T) {
	testenv.RequireCommand(t, "nbdkit")
	disk := newVCSimDisk(t)
	caFile, err := disk.server.CertificateFile()
	require.NoError(t, err)

	s := startServer(t, CurlSource{URL: disk.url, Cookie: disk.cookie, CAFile: caFile}, Options{})
	args := cmdline(t, s.PID())
	assert.NotContains(t, args, strings.SplitN(disk.cookie, "=", 2)[1], "the session cookie is never in argv")
	assert.Contains(t, args, "cookie=+")
	assert.Contains(t, args, "--readonly")
	entries, err := os.ReadDir(filepath.Dir(s.Socket))
	require.NoError(t, err)
	for _, e := range entries {
		assert.NotContains(t, e.Name(), "secrets", "secret files are gone once nbdkit is ready")
	}

	assert.True(t, bytes.Equal(disk.content, readAll(t, s.URI())), "nbd content equals the flat file")
}

func TestCurlSourcePinnedThumbprint(t *testing.T) {
	testenv.RequireCommand(t, "nbdkit")
	disk := newVCSimDisk(t)
	sha1 := soap.ThumbprintSHA1(disk.server.Certificate())
	s := startServer(t, CurlSource{URL: disk.url, Cookie: disk.cookie, Thumbprint: sha1}, Options{})
	assert.True(t, bytes.Equal(disk.content, readAll(t, s.URI())))
	require.NoError(t, s.Stop(testCtx(t)))

	sha256 := soap.ThumbprintSHA256(disk.server.Certificate())
	s = startServer(t, CurlSource{URL: disk.url, Thumbprint: sha256}, Options{})
	assert.True(t, bytes.Equal(disk.content, readAll(t, s.URI())))

	wrong := strings.Repeat("AB:", 19) + "AB"
	_, err := Start(testCtx(t), CurlSource{URL: disk.url, Thumbprint: wrong}, Options{Dir: testenv.ShortTempDir(t)})
	assert.ErrorContains(t, err, "does not match the pinned")
}

func TestCurlSourceUntrustedCertificate(t *testing.T) {
	testenv.RequireCommand(t, "nbdkit")
	disk := newVCSimDisk(t)
	// A CA that did not sign the server's certificate: curl must refuse, and Start must say so
	// at once (the export is refused at NBD_OPT_GO) rather than wait for its ready timeout.
	wrongCA := filepath.Join(t.TempDir(), "other.pem")
	writeSelfSignedCA(t, wrongCA)

	_, err := Start(testCtx(t), CurlSource{URL: disk.url, CAFile: wrongCA}, Options{Dir: testenv.ShortTempDir(t)})
	require.Error(t, err)
	assert.ErrorIs(t, err, nbdprobe.ErrExportRefused)

	_, err = Start(context.Background(), CurlSource{URL: disk.url + "-missing", InsecureSkipVerify: true},
		Options{Dir: testenv.ShortTempDir(t)})
	assert.ErrorIs(t, err, nbdprobe.ErrExportRefused, "a missing file is refused, insecure or not")
}

func writeSelfSignedCA(t *testing.T, path string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "not the vcsim CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600))
}
