package config_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/diskferry/diskferry/internal/config"
	"github.com/diskferry/diskferry/internal/tunnel"
)

const sha1Thumbprint = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01"

func snaEnv(t *testing.T) map[string]string {
	return map[string]string{
		"DISKFERRY_SITE":                 "site-a",
		"DISKFERRY_VCENTER_URL":          "https://vcenter.example.com/sdk",
		"DISKFERRY_VCENTER_USER":         "backup@vsphere.local",
		"DISKFERRY_VCENTER_PASSWORD":     "vc-pass",
		"DISKFERRY_VCENTER_THUMBPRINT":   sha1Thumbprint,
		"DISKFERRY_HUB_SSH_ADDR":         "hub.example.com:22",
		"DISKFERRY_SSH_KEY_FILE":         writeFile(t, "id_ed25519", "key"),
		"DISKFERRY_SSH_KNOWN_HOSTS_FILE": writeFile(t, "known_hosts", "hosts"),
	}
}

func TestLoadSNADefaults(t *testing.T) {
	isolateEnv(t, snaEnv(t))
	c, err := config.LoadSNA()
	if err != nil {
		t.Fatalf("LoadSNA: %v", err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"site", c.Site, "site-a"},
		{"password", c.VCenterPassword.Value(), "vc-pass"},
		{"insecure", c.VCenterInsecure, false},
		{"ssh user", c.HubSSHUser, "diskferry"},
		{"keepalive", c.SSHKeepalive, 15 * time.Second},
		{"keepalive count", c.SSHKeepaliveCount, 3},
		{"hub ssh connections", c.HubSSHConnections, tunnel.DefaultConnections},
		{"transport", c.Transport, config.TransportHTTPS},
		{"connections", c.CopyConnections, 4},
		{"checkpoint interval", c.CopyCheckpointInterval, 10 * time.Second},
		{"request size", c.CopyRequestSize, config.ByteSize(2 << 20)},
		{"max copies", c.MaxCopies, 4},
		{"site bandwidth", c.SiteBandwidth, config.Bandwidth(0)},
		{"temporal", c.Address, "127.0.0.1:7233"},
	}
	for _, check := range checks {
		if check.got != check.want {
			t.Errorf("%s = %v, want %v", check.name, check.got, check.want)
		}
	}
}

func TestLoadSNANormalises(t *testing.T) {
	libdir := t.TempDir()
	isolateEnv(t, with(snaEnv(t), map[string]string{
		"DISKFERRY_VCENTER_THUMBPRINT": strings.ToLower(strings.ReplaceAll(sha1Thumbprint, ":", "")),
		"DISKFERRY_HUB_SSH_ADDR":       "hub.example.com",
		"DISKFERRY_HUB_SSH_ADDRS":      "hub-b=10.0.0.6:2222, hub-c=[fd00::7]",
		"DISKFERRY_TRANSPORT":          "vddk",
		"DISKFERRY_VDDK_LIBDIR":        libdir,
		"DISKFERRY_COPY_REQUEST_SIZE":  "1MiB",
		"DISKFERRY_COPY_CONNECTIONS":   "8",
		"DISKFERRY_MAX_COPIES":         "0",
		"DISKFERRY_SITE_BANDWIDTH":     "200Mbit",
	}))
	c, err := config.LoadSNA()
	if err != nil {
		t.Fatalf("LoadSNA: %v", err)
	}
	if c.VCenterThumbprint != sha1Thumbprint {
		t.Errorf("thumbprint = %q, want %q", c.VCenterThumbprint, sha1Thumbprint)
	}
	if c.HubSSHAddr != "hub.example.com:22" {
		t.Errorf("hub ssh addr = %q, want port 22 added", c.HubSSHAddr)
	}
	if c.MaxCopies != 0 || c.SiteBandwidth != 25_000_000 {
		t.Errorf("limits = %d copies, %d B/s; want 0 (no cap) and 25000000 (200Mbit)", c.MaxCopies, c.SiteBandwidth)
	}
	if c.CopyRequestSize != 1<<20 || c.CopyConnections != 8 || c.VDDKLibdir != libdir {
		t.Errorf("copy/vddk settings = %s, %d, %q", c.CopyRequestSize, c.CopyConnections, c.VDDKLibdir)
	}
	for hub, want := range map[string]string{"hub-b": "10.0.0.6:2222", "hub-c": "[fd00::7]:22", "hub-z": "hub.example.com:22"} {
		got, err := c.HubSSHAddrFor(hub)
		if err != nil || got != want {
			t.Errorf("HubSSHAddrFor(%q) = %q, %v; want %q", hub, got, err, want)
		}
	}
	if got := c.HubSSHAddrs.String(); got != "hub-b=10.0.0.6:2222,hub-c=[fd00::7]:22" {
		t.Errorf("HubSSHAddrs.String() = %q", got)
	}
}

func TestLoadSNAInsecureNeedsNoThumbprint(t *testing.T) {
	isolateEnv(t, with(snaEnv(t), map[string]string{
		"DISKFERRY_VCENTER_THUMBPRINT": "<unset>",
		"DISKFERRY_VCENTER_INSECURE":   "true",
	}))
	c, err := config.LoadSNA()
	if err != nil {
		t.Fatalf("LoadSNA insecure without thumbprint: %v", err)
	}
	if !c.VCenterInsecure {
		t.Fatal("VCenterInsecure not set")
	}
}

func TestLoadSNAPasswordFromFile(t *testing.T) {
	isolateEnv(t, with(snaEnv(t), map[string]string{
		"DISKFERRY_VCENTER_PASSWORD":      "<unset>",
		"DISKFERRY_VCENTER_PASSWORD_FILE": writeFile(t, "pw", "from-file\n"),
	}))
	c, err := config.LoadSNA()
	if err != nil {
		t.Fatalf("LoadSNA: %v", err)
	}
	if c.VCenterPassword.Value() != "from-file" {
		t.Fatalf("password = %q, want the file's content", c.VCenterPassword.Value())
	}
}

func TestHubSSHAddrForWithoutDefault(t *testing.T) {
	isolateEnv(t, with(snaEnv(t), map[string]string{
		"DISKFERRY_HUB_SSH_ADDR":  "<unset>",
		"DISKFERRY_HUB_SSH_ADDRS": "hub-a=10.0.0.5:22",
	}))
	c, err := config.LoadSNA()
	if err != nil {
		t.Fatalf("LoadSNA: %v", err)
	}
	if _, err := c.HubSSHAddrFor("hub-x"); err == nil || !strings.Contains(err.Error(), "hub-x") {
		t.Fatalf("HubSSHAddrFor an unmapped hub: %v, want an error naming it", err)
	}
}

func TestLoadSNARejects(t *testing.T) {
	dir := t.TempDir()
	openKey := writeFile(t, "id_open", "key")
	if err := os.Chmod(openKey, 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name     string
		changes  map[string]string
		variable string
		problem  string
	}{
		{"missing site", map[string]string{"DISKFERRY_SITE": "<unset>"}, "DISKFERRY_SITE", "required"},
		{"site with space", map[string]string{"DISKFERRY_SITE": "site a"}, "DISKFERRY_SITE", "use letters"},
		{"missing vcenter url", map[string]string{"DISKFERRY_VCENTER_URL": "<unset>"}, "DISKFERRY_VCENTER_URL", "required"},
		{"malformed vcenter url", map[string]string{"DISKFERRY_VCENTER_URL": "https://vc.example.com:port/sdk"}, "DISKFERRY_VCENTER_URL", "malformed URL"},
		{"vcenter url without scheme", map[string]string{"DISKFERRY_VCENTER_URL": "vcenter.example.com/sdk"}, "DISKFERRY_VCENTER_URL", "https://"},
		{"vcenter url plain http", map[string]string{"DISKFERRY_VCENTER_URL": "http://vcenter.example.com/sdk"}, "DISKFERRY_VCENTER_URL", "https://"},
		{"vcenter url without host", map[string]string{"DISKFERRY_VCENTER_URL": "https:///sdk"}, "DISKFERRY_VCENTER_URL", "no host"},
		{"credentials in vcenter url", map[string]string{"DISKFERRY_VCENTER_URL": "https://root:vc-pass@vc.example.com/sdk"}, "DISKFERRY_VCENTER_URL", "credentials in the URL"},
		{"thumbprint missing", map[string]string{"DISKFERRY_VCENTER_THUMBPRINT": "<unset>"}, "DISKFERRY_VCENTER_THUMBPRINT", "DISKFERRY_VCENTER_INSECURE"},
		{"thumbprint malformed", map[string]string{"DISKFERRY_VCENTER_THUMBPRINT": "AB:CD"}, "DISKFERRY_VCENTER_THUMBPRINT", "not a SHA-1 or SHA-256"},
		{"insecure not a bool", map[string]string{"DISKFERRY_VCENTER_INSECURE": "maybe"}, "DISKFERRY_VCENTER_INSECURE", "cannot parse"},
		{"password and file", map[string]string{"DISKFERRY_VCENTER_PASSWORD_FILE": writeFile(t, "pw", "x")}, "DISKFERRY_VCENTER_PASSWORD", "not both"},
		{"password file unreadable", map[string]string{"DISKFERRY_VCENTER_PASSWORD": "<unset>", "DISKFERRY_VCENTER_PASSWORD_FILE": filepath.Join(dir, "pw")}, "DISKFERRY_VCENTER_PASSWORD_FILE", "read secret file"},
		{"no hub ssh address", map[string]string{"DISKFERRY_HUB_SSH_ADDR": "<unset>"}, "DISKFERRY_HUB_SSH_ADDR", "required"},
		{"hub ssh address bad port", map[string]string{"DISKFERRY_HUB_SSH_ADDR": "hub:ssh"}, "DISKFERRY_HUB_SSH_ADDR", "not 1-65535"},
		{"hub ssh map malformed", map[string]string{"DISKFERRY_HUB_SSH_ADDRS": "hub-a:10.0.0.5"}, "DISKFERRY_HUB_SSH_ADDRS", "want hubID=host:port"},
		{"hub ssh map duplicate", map[string]string{"DISKFERRY_HUB_SSH_ADDRS": "a=h1,a=h2"}, "DISKFERRY_HUB_SSH_ADDRS", "listed twice"},
		{"hub ssh map bad id", map[string]string{"DISKFERRY_HUB_SSH_ADDRS": "a/b=h1"}, "DISKFERRY_HUB_SSH_ADDRS", "use letters"},
		{"retired hub export host", map[string]string{"DISKFERRY_HUB_EXPORT_HOST": "127.0.0.1"}, "DISKFERRY_HUB_EXPORT_HOST", "no longer used"},
		{"empty ssh user", map[string]string{"DISKFERRY_HUB_SSH_USER": ""}, "DISKFERRY_HUB_SSH_USER", "required"},
		{"missing key file", map[string]string{"DISKFERRY_SSH_KEY_FILE": "<unset>"}, "DISKFERRY_SSH_KEY_FILE", "required"},
		{"unreadable key file", map[string]string{"DISKFERRY_SSH_KEY_FILE": filepath.Join(dir, "id_missing")}, "DISKFERRY_SSH_KEY_FILE", "unreadable file"},
		{"key file others can read", map[string]string{"DISKFERRY_SSH_KEY_FILE": openKey}, "DISKFERRY_SSH_KEY_FILE", openKey + " has mode 0644"},
		{"unreadable known_hosts", map[string]string{"DISKFERRY_SSH_KNOWN_HOSTS_FILE": filepath.Join(dir, "kh")}, "DISKFERRY_SSH_KNOWN_HOSTS_FILE", "unreadable file"},
		{"keepalive zero", map[string]string{"DISKFERRY_SSH_KEEPALIVE": "0s"}, "DISKFERRY_SSH_KEEPALIVE", "positive duration"},
		{"keepalive count zero", map[string]string{"DISKFERRY_SSH_KEEPALIVE_COUNT": "0"}, "DISKFERRY_SSH_KEEPALIVE_COUNT", "want 1 or more"},
		{"no hub ssh connections", map[string]string{"DISKFERRY_HUB_SSH_CONNECTIONS": "0"}, "DISKFERRY_HUB_SSH_CONNECTIONS", "want 1-16"},
		{"too many hub ssh connections", map[string]string{"DISKFERRY_HUB_SSH_CONNECTIONS": "17"}, "DISKFERRY_HUB_SSH_CONNECTIONS", "want 1-16"},
		{"unknown transport", map[string]string{"DISKFERRY_TRANSPORT": "nfc"}, "DISKFERRY_TRANSPORT", "want https or vddk"},
		{"vddk without libdir", map[string]string{"DISKFERRY_TRANSPORT": "vddk"}, "DISKFERRY_VDDK_LIBDIR", "required"},
		{"vddk with a sha-256 pin", map[string]string{"DISKFERRY_TRANSPORT": "vddk", "DISKFERRY_VDDK_LIBDIR": dir,
			"DISKFERRY_VCENTER_THUMBPRINT": strings.Repeat("AB:", 31) + "AB"}, "DISKFERRY_VCENTER_THUMBPRINT", "VDDK needs the SHA-1"},
		{"vddk libdir missing", map[string]string{"DISKFERRY_TRANSPORT": "vddk", "DISKFERRY_VDDK_LIBDIR": filepath.Join(dir, "vddk")}, "DISKFERRY_VDDK_LIBDIR", "no such file"},
		{"vddk libdir is a file", map[string]string{"DISKFERRY_TRANSPORT": "vddk", "DISKFERRY_VDDK_LIBDIR": writeFile(t, "lib", "")}, "DISKFERRY_VDDK_LIBDIR", "not a directory"},
		{"zero connections", map[string]string{"DISKFERRY_COPY_CONNECTIONS": "0"}, "DISKFERRY_COPY_CONNECTIONS", "want 1-16"},
		{"negative max copies", map[string]string{"DISKFERRY_MAX_COPIES": "-1"}, "DISKFERRY_MAX_COPIES", "want 0 (no cap) or more"},
		{"site bandwidth without unit", map[string]string{"DISKFERRY_SITE_BANDWIDTH": "50"}, "DISKFERRY_SITE_BANDWIDTH", "not a bandwidth"},
		{"site bandwidth too low", map[string]string{"DISKFERRY_SITE_BANDWIDTH": "100kbit"}, "DISKFERRY_SITE_BANDWIDTH", "below the minimum"},
		{"request size too large", map[string]string{"DISKFERRY_COPY_REQUEST_SIZE": "64MiB"}, "DISKFERRY_COPY_REQUEST_SIZE", "want 1MiB or 2MiB"},
		{"request size unaligned", map[string]string{"DISKFERRY_COPY_REQUEST_SIZE": "1536KiB"}, "DISKFERRY_COPY_REQUEST_SIZE", "multiple of the 1MiB digest block"},
		{"request size unparseable", map[string]string{"DISKFERRY_COPY_REQUEST_SIZE": "lots"}, "DISKFERRY_COPY_REQUEST_SIZE", "not a size"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			isolateEnv(t, with(snaEnv(t), tc.changes))
			_, err := config.LoadSNA()
			expectErr(t, err, tc.variable, tc.problem)
			if strings.Contains(err.Error(), "vc-pass") {
				t.Fatalf("error leaks the vCenter password: %v", err)
			}
		})
	}
}

func TestByteSizeDecode(t *testing.T) {
	cases := map[string]config.ByteSize{
		"4096":    4096,
		"512KiB":  512 << 10,
		"512 KB":  512 << 10,
		"2MiB":    2 << 20,
		"2M":      2 << 20,
		"1GiB":    1 << 30,
		"65536B":  65536,
		" 1MiB  ": 1 << 20,
	}
	for in, want := range cases {
		var got config.ByteSize
		if err := got.Decode(in); err != nil || got != want {
			t.Errorf("Decode(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "MiB", "-1MiB", "1.5MiB", "1TiB", "99999999999999GiB"} {
		var got config.ByteSize
		if err := got.Decode(bad); err == nil {
			t.Errorf("Decode(%q) = %d, want an error", bad, got)
		}
	}
	if s := config.ByteSize(3 << 20).String(); s != "3MiB" {
		t.Errorf("String() = %q, want 3MiB", s)
	}
}
