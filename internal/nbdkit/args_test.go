package nbdkit

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func validVDDK() VDDKSource {
	return VDDKSource{
		LibDir:        "/opt/vmware-vix-disklib-distrib",
		Server:        "vcenter.example.com",
		User:          "backup@vsphere.local",
		Password:      "s3cret pass",
		Thumbprint:    "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01",
		VMMoref:       "vm-123",
		SnapshotMoref: "snapshot-456",
		Transports:    []string{"hotadd", "nbdssl"},
		File:          "[datastore1] web01/web01.vmdk",
	}
}

func TestVDDKArgs(t *testing.T) {
	dir := t.TempDir()
	args, err := Args(t.Context(), validVDDK(), Options{Filters: []Filter{{Name: "retry", Params: map[string]string{"retries": "5", "retry-delay": "2"}}}},
		"/run/df/nbdkit.sock", Files{Dir: "/run/df", SecretDir: dir})
	require.NoError(t, err)

	passwordFile := filepath.Join(dir, "password")
	want := []string{
		"--foreground",
		"--exit-with-parent",
		"--unix", "/run/df/nbdkit.sock",
		"--readonly",
		"--filter=retry",
		"vddk",
		"libdir=/opt/vmware-vix-disklib-distrib",
		"server=vcenter.example.com",
		"user=backup@vsphere.local",
		"password=+" + passwordFile,
		"thumbprint=AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01",
		"vm=moref=vm-123",
		"snapshot=snapshot-456",
		"transports=hotadd:nbdssl",
		"file=[datastore1] web01/web01.vmdk",
		"retries=5",
		"retry-delay=2",
	}
	assert.Equal(t, want, args)
	for _, a := range args {
		assert.NotContains(t, a, "s3cret", "the password must never be in the arguments")
	}
	data, err := os.ReadFile(passwordFile)
	require.NoError(t, err)
	assert.Equal(t, "s3cret pass", string(data), "no trailing newline: nbdkit would read it as part of the password")
	st, err := os.Stat(passwordFile)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
}

func TestVDDKArgsOptional(t *testing.T) {
	src := validVDDK()
	src.Transports, src.Port = nil, 902
	params, err := src.Params(t.Context(), Files{Dir: t.TempDir(), SecretDir: t.TempDir()})
	require.NoError(t, err)
	assert.Contains(t, params, "port=902")
	assert.False(t, slices.ContainsFunc(params, func(p string) bool { return strings.HasPrefix(p, "transports=") }),
		"no transports: VDDK chooses")
}

func TestVDDKArgsRejectsIncompleteConfig(t *testing.T) {
	for _, field := range []string{"LibDir", "Server", "User", "Password", "Thumbprint", "VMMoref", "SnapshotMoref", "File"} {
		src := validVDDK()
		switch field {
		case "LibDir":
			src.LibDir = ""
		case "Server":
			src.Server = ""
		case "User":
			src.User = ""
		case "Password":
			src.Password = ""
		case "Thumbprint":
			src.Thumbprint = ""
		case "VMMoref":
			src.VMMoref = ""
		case "SnapshotMoref":
			src.SnapshotMoref = ""
		case "File":
			src.File = ""
		}
		_, err := src.Params(t.Context(), Files{Dir: t.TempDir(), SecretDir: t.TempDir()})
		require.Error(t, err, field)
		assert.Contains(t, err.Error(), field)
	}
	src := validVDDK()
	src.Transports = []string{"carrier-pigeon"}
	_, err := src.Params(t.Context(), Files{Dir: t.TempDir(), SecretDir: t.TempDir()})
	assert.ErrorContains(t, err, "carrier-pigeon")
	_, err = validVDDK().Params(t.Context(), Files{Dir: t.TempDir()})
	assert.Error(t, err, "no place for the password file")
}

func TestCurlParams(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	require.NoError(t, os.WriteFile(ca, []byte("pem"), 0o600))
	url := DatastoreURL("vc.example.com", "DC0", "LocalDS_0", "vm1/vm1-flat.vmdk")
	assert.Equal(t, "https://vc.example.com/folder/vm1/vm1-flat.vmdk?dcPath=DC0&dsName=LocalDS_0", url)

	params, err := CurlSource{URL: url, Cookie: `vmware_soap_session="abc"`, CAFile: ca, Timeout: 90 * time.Second}.Params(t.Context(), Files{Dir: dir, SecretDir: dir})
	require.NoError(t, err)
	assert.Equal(t, []string{
		"url=" + url,
		"protocols=https",
		"followlocation=false",
		"cookie=+" + filepath.Join(dir, "cookie"),
		"cainfo=" + ca,
		"capath=" + filepath.Join(dir, "capath"),
		"timeout=90",
	}, params)
	cookie, err := os.ReadFile(filepath.Join(dir, "cookie"))
	require.NoError(t, err)
	assert.Equal(t, `vmware_soap_session="abc"`, string(cookie))

	params, err = CurlSource{URL: url, InsecureSkipVerify: true}.Params(t.Context(), Files{Dir: dir, SecretDir: dir})
	require.NoError(t, err)
	assert.Contains(t, params, "sslverify=false")

	for name, bad := range map[string]CurlSource{
		"no trust":       {URL: url},
		"two trusts":     {URL: url, CAFile: ca, InsecureSkipVerify: true},
		"missing ca":     {URL: url, CAFile: filepath.Join(dir, "none.pem")},
		"ftp":            {URL: "ftp://host/x", InsecureSkipVerify: true},
		"creds in url":   {URL: "https://root:pw@host/x", InsecureSkipVerify: true},
		"tls for http":   {URL: "http://host/x", CAFile: ca},
		"bad thumbprint": {URL: url, Thumbprint: "zz"},
	} {
		_, err := bad.Params(t.Context(), Files{Dir: dir, SecretDir: dir})
		assert.Error(t, err, name)
	}
}

func TestFileArgs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.raw")
	require.NoError(t, os.WriteFile(path, []byte("x"), 0o600))
	args, err := Args(t.Context(), FileSource{Path: path}, Options{Writable: true, Threads: 8}, "/s", Files{})
	require.NoError(t, err)
	assert.Equal(t, []string{"--foreground", "--exit-with-parent", "--unix", "/s", "--threads", "8", "file", "file=" + path}, args)
	_, err = Args(t.Context(), FileSource{Path: path + ".missing"}, Options{}, "/s", Files{})
	assert.Error(t, err)
}

// A restore opens the VM's live disk writable: no --readonly, no snapshot parameter.
func TestVDDKLiveWritableArgs(t *testing.T) {
	dir := t.TempDir()
	src := validVDDK()
	src.SnapshotMoref, src.Live, src.Transports = "", true, nil
	args, err := Args(t.Context(), src, Options{Writable: true}, "/run/df/nbdkit.sock", Files{Dir: "/run/df", SecretDir: dir})
	require.NoError(t, err)
	assert.Equal(t, []string{
		"--foreground",
		"--exit-with-parent",
		"--unix", "/run/df/nbdkit.sock",
		"vddk",
		"libdir=/opt/vmware-vix-disklib-distrib",
		"server=vcenter.example.com",
		"user=backup@vsphere.local",
		"password=+" + filepath.Join(dir, "password"),
		"thumbprint=AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01",
		"vm=moref=vm-123",
		"file=[datastore1] web01/web01.vmdk",
	}, args)

	src.SnapshotMoref = "snapshot-456"
	_, err = src.Params(t.Context(), Files{Dir: t.TempDir(), SecretDir: t.TempDir()})
	assert.ErrorContains(t, err, "live disk has no snapshot")
}
