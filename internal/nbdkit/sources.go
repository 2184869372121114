package nbdkit

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/diskferry/diskferry/internal/certpin"
)

// FileSource serves a local file or block device (lab sources, benchmarks).
type FileSource struct {
	Path string
}

// Plugin implements Source.
func (FileSource) Plugin() string { return "file" }

// Params implements Source.
func (f FileSource) Params(context.Context, Files) ([]string, error) {
	if f.Path == "" {
		return nil, errors.New("empty file path")
	}
	abs, err := filepath.Abs(f.Path)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(abs); err != nil {
		return nil, err
	}
	return []string{"file=" + abs}, nil
}

// CurlSource serves a file over HTTPS: on vSphere, the datastore URL of a snapshotted disk's
// flat file (see DatastoreURL), authenticated with the API session's cookie.
//
// TLS: CAFile trusts a CA bundle; Thumbprint pins the server certificate (SHA-1 as vSphere
// shows it, or SHA-256): it is fetched, matched and then given to curl as its only trust
// anchor, so curl still checks that the URL's host name is in the certificate.
// InsecureSkipVerify turns verification off and must be an explicit operator choice.
type CurlSource struct {
	URL                string
	Cookie             string // e.g. vmware_soap_session="..."; passed as cookie=+FILE
	CAFile             string
	Thumbprint         string
	InsecureSkipVerify bool
	Timeout            time.Duration // per request; 0 keeps libcurl's default
	Logger             *slog.Logger  // warns about InsecureSkipVerify; default discards
}

// Plugin implements Source.
func (CurlSource) Plugin() string { return "curl" }

// Params implements Source.
func (c CurlSource) Params(ctx context.Context, files Files) ([]string, error) {
	u, err := url.Parse(c.URL)
	if err != nil {
		return nil, fmt.Errorf("parse url: %w", err)
	}
	if u.Scheme != "https" && u.Scheme != "http" {
		return nil, fmt.Errorf("url scheme %q: want https", u.Scheme)
	}
	if u.User != nil {
		return nil, errors.New("url must not carry credentials (they would be in the process arguments)")
	}
	params := []string{
		"url=" + u.String(),
		// The URL names one file on one server: no redirects elsewhere, no other protocols.
		"protocols=" + u.Scheme,
		"followlocation=false",
	}
	if c.Cookie != "" {
		path, err := writeSecret(files.SecretDir, "cookie", c.Cookie)
		if err != nil {
			return nil, err
		}
		params = append(params, "cookie=+"+path)
	}
	trust := 0
	for _, set := range []bool{c.CAFile != "", c.Thumbprint != "", c.InsecureSkipVerify} {
		if set {
			trust++
		}
	}
	switch {
	case u.Scheme == "http":
		if trust > 0 {
			return nil, errors.New("TLS settings given for a plain http url")
		}
	case trust != 1:
		return nil, errors.New("https needs exactly one of CAFile, Thumbprint or InsecureSkipVerify")
	case c.CAFile != "":
		abs, err := filepath.Abs(c.CAFile)
		if err != nil {
			return nil, err
		}
		if _, err := os.Stat(abs); err != nil {
			return nil, fmt.Errorf("ca file: %w", err)
		}
		params = append(params, "cainfo="+abs)
	case c.Thumbprint != "":
		pemCert, err := FetchPinnedCertificate(ctx, u.Host, c.Thumbprint)
		if err != nil {
			return nil, err
		}
		// curl reads its CA file on every connection, so it must outlive the secrets.
		path, err := writeSecret(files.Dir, "pinned.pem", string(pemCert))
		if err != nil {
			return nil, err
		}
		params = append(params, "cainfo="+path)
	default:
		log := c.Logger
		if log == nil {
			log = slog.New(slog.DiscardHandler)
		}
		log.Warn("INSECURE: curl source does not verify the server certificate", "host", u.Host)
		params = append(params, "sslverify=false")
	}
	if c.CAFile != "" || c.Thumbprint != "" {
		// An empty CA directory: libcurl would otherwise also trust the system's CA path.
		empty := filepath.Join(files.Dir, "capath")
		if err := os.MkdirAll(empty, 0o700); err != nil {
			return nil, fmt.Errorf("empty ca path: %w", err)
		}
		params = append(params, "capath="+empty)
	}
	if c.Timeout > 0 {
		params = append(params, "timeout="+strconv.Itoa(int(c.Timeout.Round(time.Second)/time.Second)))
	}
	return params, nil
}

// DatastoreURL is the HTTPS URL of a file on a datastore, as vCenter and ESXi serve it:
// https://host/folder/<path>?dcPath=<datacenter>&dsName=<datastore>. path is relative to
// the datastore root, e.g. "vm1/vm1-flat.vmdk".
func DatastoreURL(host, datacenter, datastore, path string) string {
	q := url.Values{"dcPath": {datacenter}, "dsName": {datastore}}
	return (&url.URL{Scheme: "https", Host: host, Path: "/folder/" + strings.TrimPrefix(path, "/"),
		RawQuery: q.Encode()}).String()
}

// FetchPinnedCertificate connects to hostport, checks the server's leaf certificate
// against thumbprint (hex, colons optional; 20 bytes SHA-1 or 32 bytes SHA-256) and returns
// it PEM-encoded.
func FetchPinnedCertificate(ctx context.Context, hostport, thumbprint string) ([]byte, error) {
	want, err := certpin.Parse(thumbprint)
	if err != nil {
		return nil, err
	}
	leaf, err := want.Fetch(ctx, hostport)
	if err != nil {
		return nil, fmt.Errorf("fetch certificate: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw}), nil
}

// VDDKSource serves a disk of a VM snapshot through VMware's VDDK (nbdkit-vddk-plugin,
// not packaged by Debian). With Live it opens the VM's disk as it is now instead: a
// restore writes it (nbdkit started Writable, the VM powered off) and reads it back.
type VDDKSource struct {
	LibDir        string   // the VDDK installation (contains lib64/)
	Server        string   // vCenter or ESXi host name
	Port          int      // 0 keeps 443
	User          string   // e.g. administrator@vsphere.local
	Password      string   // passed as password=+FILE, never in the arguments
	Thumbprint    string   // the server's SHA-1 thumbprint, AB:CD:...
	VMMoref       string   // e.g. vm-123
	SnapshotMoref string   // e.g. snapshot-456; the disk is read as of this snapshot
	Live          bool     // no snapshot: the disk as it is now; SnapshotMoref must be empty
	Transports    []string // in order of preference: hotadd, san, nbdssl, nbd; empty lets VDDK choose
	File          string   // the disk's backing file in the snapshot: "[datastore1] vm/vm.vmdk"
}

// Plugin implements Source.
func (VDDKSource) Plugin() string { return "vddk" }

// Params implements Source.
func (v VDDKSource) Params(_ context.Context, files Files) ([]string, error) {
	required := map[string]string{
		"LibDir": v.LibDir, "Server": v.Server, "User": v.User, "Password": v.Password,
		"Thumbprint": v.Thumbprint, "VMMoref": v.VMMoref, "SnapshotMoref": v.SnapshotMoref, "File": v.File,
	}
	if v.Live {
		if v.SnapshotMoref != "" {
			return nil, errors.New("vddk source: a live disk has no snapshot, but SnapshotMoref is set")
		}
		delete(required, "SnapshotMoref")
	}
	missing := []string{}
	for name, val := range required {
		if val == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return nil, fmt.Errorf("vddk source: missing %s", strings.Join(missing, ", "))
	}
	for _, t := range v.Transports {
		if !slices.Contains([]string{"file", "san", "hotadd", "nbd", "nbdssl"}, t) {
			return nil, fmt.Errorf("vddk source: unknown transport %q", t)
		}
	}
	password, err := writeSecret(files.SecretDir, "password", v.Password)
	if err != nil {
		return nil, err
	}
	params := []string{
		"libdir=" + v.LibDir,
		"server=" + v.Server,
	}
	if v.Port != 0 {
		params = append(params, "port="+strconv.Itoa(v.Port))
	}
	params = append(params,
		"user="+v.User,
		"password=+"+password,
		"thumbprint="+v.Thumbprint,
		"vm=moref="+v.VMMoref,
	)
	if !v.Live {
		params = append(params, "snapshot="+v.SnapshotMoref)
	}
	if len(v.Transports) > 0 {
		params = append(params, "transports="+strings.Join(v.Transports, ":"))
	}
	return append(params, "file="+v.File), nil
}
