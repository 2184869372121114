package config

import (
	"crypto/sha1"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/diskferry/diskferry/internal/certpin"
	"github.com/diskferry/diskferry/internal/limits"
)

// Source transports: how nbdkit reads a snapshot's disk.
const (
	TransportHTTPS = "https" // the datastore's HTTPS file endpoint (nbdkit curl), no VDDK needed
	TransportVDDK  = "vddk"  // VMware's VDDK (nbdkit vddk plugin)
)

// SNA configures the source node appliance worker (workers/sna).
type SNA struct {
	Temporal

	// DISKFERRY_SITE names this source site; the worker polls diskferry-sna.<site>.
	// Required; letters, digits, '.', '_' and '-'.
	Site string `envconfig:"DISKFERRY_SITE"`

	// DISKFERRY_VCENTER_URL is the vCenter (or ESXi) SDK endpoint, e.g.
	// https://vcenter.example.com/sdk. Required; https only; no credentials in the URL.
	VCenterURL string `envconfig:"DISKFERRY_VCENTER_URL"`
	// DISKFERRY_VCENTER_USER is the vCenter user name.
	VCenterUser string `envconfig:"DISKFERRY_VCENTER_USER"`
	// DISKFERRY_VCENTER_PASSWORD is the vCenter password. Secret: or DISKFERRY_VCENTER_PASSWORD_FILE.
	VCenterPassword Secret `envconfig:"DISKFERRY_VCENTER_PASSWORD"`
	// DISKFERRY_VCENTER_PASSWORD_FILE is a file holding DISKFERRY_VCENTER_PASSWORD.
	VCenterPasswordFile string `envconfig:"DISKFERRY_VCENTER_PASSWORD_FILE"`
	// DISKFERRY_VCENTER_THUMBPRINT pins vCenter's certificate: its SHA-1 or SHA-256
	// fingerprint in hex, colons optional (normalised to upper case with colons).
	// Required unless DISKFERRY_VCENTER_INSECURE=true.
	VCenterThumbprint string `envconfig:"DISKFERRY_VCENTER_THUMBPRINT"`
	// DISKFERRY_VCENTER_INSECURE=true skips certificate verification. Lab use only; the
	// worker logs a warning at start. Default false.
	VCenterInsecure bool `envconfig:"DISKFERRY_VCENTER_INSECURE" default:"false"`

	// DISKFERRY_HUB_SSH_ADDR is the hub's sshd as host:port (":22" assumed when the port is
	// missing), used for hubs not listed in DISKFERRY_HUB_SSH_ADDRS. One of the two is required.
	HubSSHAddr string `envconfig:"DISKFERRY_HUB_SSH_ADDR"`
	// DISKFERRY_HUB_SSH_ADDRS maps hub IDs to their sshd for sites served by several hubs:
	// "hub-a=10.0.0.5:22,hub-b=backup2.example.com:2222". Optional.
	HubSSHAddrs HubAddrs `envconfig:"DISKFERRY_HUB_SSH_ADDRS"`
	// DISKFERRY_HUB_SSH_USER is the user the tunnel logs in as on the hub. Default diskferry.
	HubSSHUser string `envconfig:"DISKFERRY_HUB_SSH_USER" default:"diskferry"`
	// DISKFERRY_SSH_KEY_FILE is the tunnel's private key (OpenSSH format, no passphrase,
	// mode 0600). Required.
	SSHKeyFile string `envconfig:"DISKFERRY_SSH_KEY_FILE"`
	// DISKFERRY_SSH_KNOWN_HOSTS_FILE pins the hubs' host keys (OpenSSH known_hosts). Required.
	SSHKnownHostsFile string `envconfig:"DISKFERRY_SSH_KNOWN_HOSTS_FILE"`
	// DISKFERRY_SSH_KEEPALIVE is how often the tunnel checks the SSH connection. Default 15s.
	SSHKeepalive time.Duration `envconfig:"DISKFERRY_SSH_KEEPALIVE" default:"15s"`
	// DISKFERRY_SSH_KEEPALIVE_COUNT is how many keepalive intervals in a row may pass with a
	// check unanswered and nothing else arriving from the hub before the tunnel redials (as
	// OpenSSH's ServerAliveCountMax). Default 3.
	SSHKeepaliveCount int `envconfig:"DISKFERRY_SSH_KEEPALIVE_COUNT" default:"3"`
	// DISKFERRY_HUB_SSH_CONNECTIONS is how many SSH connections the tunnel keeps to each hub,
	// 1-16; forwarded connections spread over them (sshd runs each on one core). Default 2
	// (internal/tunnel.DefaultConnections).
	HubSSHConnections int `envconfig:"DISKFERRY_HUB_SSH_CONNECTIONS" default:"2"`

	// DISKFERRY_TRANSPORT is how disks are read: https (default) or vddk.
	Transport string `envconfig:"DISKFERRY_TRANSPORT" default:"https"`
	// DISKFERRY_VDDK_LIBDIR is the directory of VMware's VDDK (holding lib64/).
	// Required when DISKFERRY_TRANSPORT=vddk.
	VDDKLibdir string `envconfig:"DISKFERRY_VDDK_LIBDIR"`
	// DISKFERRY_COPY_CONNECTIONS is the number of NBD connections per disk copy, 1-16. Default 4.
	CopyConnections int `envconfig:"DISKFERRY_COPY_CONNECTIONS" default:"4"`
	// DISKFERRY_COPY_REQUEST_SIZE is the size of one read/write request: bytes or with a
	// KiB/MiB suffix, a multiple of 4 KiB from 64 KiB to 32 MiB. Default 1MiB. Through
	// vCenter keep it at 2 MiB or less (larger NFC reads fail).
	CopyRequestSize ByteSize `envconfig:"DISKFERRY_COPY_REQUEST_SIZE" default:"2MiB"`
	// DISKFERRY_COPY_CHECKPOINT_INTERVAL is how often a copy flushes its target to advance the
	// checkpoint a retried copy resumes from (after an SNA restart it redoes at most what was
	// copied since). Default 10s.
	CopyCheckpointInterval time.Duration `envconfig:"DISKFERRY_COPY_CHECKPOINT_INTERVAL" default:"10s"`
	// DISKFERRY_MAX_COPIES caps the disk copies (backup and restore) this SNA runs at once;
	// the others wait for a slot, heartbeating. 0: no cap. Default 4.
	MaxCopies int `envconfig:"DISKFERRY_MAX_COPIES" default:"4"`
	// DISKFERRY_SITE_BANDWIDTH is the bandwidth every copy of this SNA shares, e.g. 50Mbit,
	// 1Gbit, 12.5MB/s, 800KiB/s (at least 1Mbit). Empty (default): no limit.
	SiteBandwidth Bandwidth `envconfig:"DISKFERRY_SITE_BANDWIDTH"`

	// DISKFERRY_LOG_LEVEL is debug, info, warn or error. Default info.
	LogLevel slog.Level `envconfig:"DISKFERRY_LOG_LEVEL" default:"info"`
}

// LoadSNA reads the SNA worker's configuration from the environment and validates it.
func LoadSNA() (SNA, error) {
	var c SNA
	if err := process(&c); err != nil {
		return SNA{}, fmt.Errorf("sna configuration: %w", err)
	}
	if err := c.resolveAndValidate(); err != nil {
		return SNA{}, err
	}
	return c, nil
}

// HubSSHAddrFor returns the sshd address of a hub: its DISKFERRY_HUB_SSH_ADDRS entry, else
// DISKFERRY_HUB_SSH_ADDR.
func (c SNA) HubSSHAddrFor(hubID string) (string, error) {
	if addr, ok := c.HubSSHAddrs[hubID]; ok {
		return addr, nil
	}
	if c.HubSSHAddr != "" {
		return c.HubSSHAddr, nil
	}
	return "", fmt.Errorf("no ssh address for hub %q: not in DISKFERRY_HUB_SSH_ADDRS and DISKFERRY_HUB_SSH_ADDR unset", hubID)
}

func (c *SNA) resolveAndValidate() error {
	var v validator
	v.secret("DISKFERRY_VCENTER_PASSWORD", &c.VCenterPassword, c.VCenterPasswordFile)
	c.Temporal.validate(&v)
	if v.required("DISKFERRY_SITE", c.Site) {
		v.queueName("DISKFERRY_SITE", c.Site)
	}
	v.vcenterURL("DISKFERRY_VCENTER_URL", c.VCenterURL)
	if c.VCenterThumbprint != "" {
		// Normalised to govmomi's form: upper case, colon separated.
		if pin, err := certpin.Parse(c.VCenterThumbprint); err != nil {
			v.fail("DISKFERRY_VCENTER_THUMBPRINT", err)
		} else {
			c.VCenterThumbprint = pin.String()
		}
	} else if !c.VCenterInsecure {
		v.fail("DISKFERRY_VCENTER_THUMBPRINT", errors.New("required to pin vCenter's certificate (or DISKFERRY_VCENTER_INSECURE=true, lab only)"))
	}

	if c.HubSSHAddr == "" && len(c.HubSSHAddrs) == 0 {
		v.fail("DISKFERRY_HUB_SSH_ADDR", errors.New("required but not set (or DISKFERRY_HUB_SSH_ADDRS)"))
	}
	if c.HubSSHAddr != "" {
		c.HubSSHAddr = withDefaultPort(c.HubSSHAddr, "22")
		v.hostPort("DISKFERRY_HUB_SSH_ADDR", c.HubSSHAddr, true)
	}
	for id, addr := range c.HubSSHAddrs {
		v.queueName("DISKFERRY_HUB_SSH_ADDRS", id)
		c.HubSSHAddrs[id] = withDefaultPort(addr, "22")
		v.hostPort("DISKFERRY_HUB_SSH_ADDRS", c.HubSSHAddrs[id], true)
	}
	v.retired("DISKFERRY_HUB_EXPORT_HOST", "the hub names each export's unix socket, reached through SSH stream-local forwarding")
	v.required("DISKFERRY_HUB_SSH_USER", c.HubSSHUser)
	if v.required("DISKFERRY_SSH_KEY_FILE", c.SSHKeyFile) {
		v.privateKeyFile("DISKFERRY_SSH_KEY_FILE", c.SSHKeyFile)
	}
	if v.required("DISKFERRY_SSH_KNOWN_HOSTS_FILE", c.SSHKnownHostsFile) {
		v.readableFile("DISKFERRY_SSH_KNOWN_HOSTS_FILE", c.SSHKnownHostsFile)
	}
	if c.SSHKeepalive <= 0 {
		v.fail("DISKFERRY_SSH_KEEPALIVE", fmt.Errorf("want a positive duration, got %s", c.SSHKeepalive))
	}
	if c.SSHKeepaliveCount < 1 {
		v.fail("DISKFERRY_SSH_KEEPALIVE_COUNT", fmt.Errorf("want 1 or more, got %d", c.SSHKeepaliveCount))
	}
	if c.HubSSHConnections < 1 || c.HubSSHConnections > 16 {
		v.fail("DISKFERRY_HUB_SSH_CONNECTIONS", fmt.Errorf("want 1-16, got %d", c.HubSSHConnections))
	}

	switch c.Transport {
	case TransportHTTPS:
	case TransportVDDK:
		// VDDK pins vCenter by SHA-1 only.
		if pin, err := certpin.Parse(c.VCenterThumbprint); err == nil && len(pin) != sha1.Size {
			v.fail("DISKFERRY_VCENTER_THUMBPRINT", errors.New("VDDK needs the SHA-1 thumbprint (20 hex pairs) with DISKFERRY_TRANSPORT=vddk"))
		}
		if v.required("DISKFERRY_VDDK_LIBDIR", c.VDDKLibdir) {
			if info, err := os.Stat(c.VDDKLibdir); err != nil {
				v.fail("DISKFERRY_VDDK_LIBDIR", fmt.Errorf("VDDK directory: %w", err))
			} else if !info.IsDir() {
				v.fail("DISKFERRY_VDDK_LIBDIR", fmt.Errorf("%s is not a directory", c.VDDKLibdir))
			}
		}
	default:
		v.fail("DISKFERRY_TRANSPORT", fmt.Errorf("want %s or %s, got %q", TransportHTTPS, TransportVDDK, c.Transport))
	}
	if c.CopyCheckpointInterval <= 0 {
		v.fail("DISKFERRY_COPY_CHECKPOINT_INTERVAL", fmt.Errorf("want a positive duration, got %s", c.CopyCheckpointInterval))
	}
	if c.MaxCopies < 0 {
		v.fail("DISKFERRY_MAX_COPIES", fmt.Errorf("want 0 (no cap) or more, got %d", c.MaxCopies))
	}
	if c.CopyConnections < 1 || c.CopyConnections > 16 {
		v.fail("DISKFERRY_COPY_CONNECTIONS", fmt.Errorf("want 1-16, got %d", c.CopyConnections))
	}
	// The copy engine cuts requests at its 1 MiB digest blocks, and vCenter serves 2 MiB at most.
	if c.CopyRequestSize < 1<<20 || c.CopyRequestSize > 2<<20 || c.CopyRequestSize%(1<<20) != 0 {
		v.fail("DISKFERRY_COPY_REQUEST_SIZE", fmt.Errorf("want 1MiB or 2MiB (a multiple of the 1MiB digest block, at most what vCenter serves), got %s", c.CopyRequestSize))
	}
	return v.err("sna")
}

// LogValue shows the configuration in logs with secrets redacted.
func (c SNA) LogValue() slog.Value { return logValue(c) }

// String shows the configuration as NAME=value pairs with secrets redacted.
func (c SNA) String() string { return render(c) }

func (v *validator) vcenterURL(name, raw string) {
	if !v.required(name, raw) {
		return
	}
	u, err := url.Parse(raw)
	if err != nil {
		// url.Error quotes the input, which may hold a password; report only the cause.
		var urlErr *url.Error
		if errors.As(err, &urlErr) {
			err = urlErr.Err
		}
		v.fail(name, fmt.Errorf("malformed URL: %w", err))
		return
	}
	switch {
	case u.User != nil:
		v.fail(name, errors.New("credentials in the URL are not allowed; use DISKFERRY_VCENTER_USER and DISKFERRY_VCENTER_PASSWORD_FILE"))
	case u.Scheme != "https":
		v.fail(name, fmt.Errorf("malformed URL %q: want an https:// URL", raw))
	case u.Host == "":
		v.fail(name, fmt.Errorf("malformed URL %q: no host", raw))
	}
}

func withDefaultPort(addr, port string) string {
	if _, _, err := net.SplitHostPort(addr); err == nil {
		return addr
	}
	if ip := net.ParseIP(strings.Trim(addr, "[]")); ip != nil && strings.Contains(ip.String(), ":") {
		return net.JoinHostPort(ip.String(), port)
	}
	if strings.Contains(addr, ":") {
		return addr // malformed; hostPort says why
	}
	return net.JoinHostPort(addr, port)
}

// HubAddrs maps hub IDs to sshd addresses; set from "id=host:port,id2=host:port".
type HubAddrs map[string]string

// Decode parses the variable (envconfig.Decoder).
func (h *HubAddrs) Decode(value string) error {
	out := HubAddrs{}
	for entry := range strings.SplitSeq(value, ",") {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		id, addr, ok := strings.Cut(entry, "=")
		id, addr = strings.TrimSpace(id), strings.TrimSpace(addr)
		if !ok || id == "" || addr == "" {
			return fmt.Errorf("entry %q: want hubID=host:port", entry)
		}
		if _, dup := out[id]; dup {
			return fmt.Errorf("hub %q listed twice", id)
		}
		out[id] = addr
	}
	*h = out
	return nil
}

// String renders the map in its variable's format, sorted by hub ID.
func (h HubAddrs) String() string {
	ids := make([]string, 0, len(h))
	for id := range h {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	parts := make([]string, len(ids))
	for i, id := range ids {
		parts[i] = id + "=" + h[id]
	}
	return strings.Join(parts, ",")
}

// Bandwidth is a rate in bytes per second, 0 for none; set from "50Mbit", "1Gbit",
// "12.5MB/s", "800KiB/s" (limits.ParseRate).
type Bandwidth int64

// Decode parses the variable (envconfig.Decoder).
func (b *Bandwidth) Decode(value string) error {
	n, err := limits.ParseRate(value)
	if err != nil {
		return err
	}
	*b = Bandwidth(n)
	return nil
}

// String renders the rate as it is logged; empty when there is none.
func (b Bandwidth) String() string {
	if b == 0 {
		return ""
	}
	return limits.FormatRate(int64(b))
}

// ByteSize is a size in bytes; set from "1048576", "1024KiB", "1MiB" or "1GiB"
// (K, M, G and KB, MB, GB are read as binary units too).
type ByteSize int64

// Decode parses the variable (envconfig.Decoder).
func (b *ByteSize) Decode(value string) error {
	s := strings.TrimSpace(value)
	multiplier := int64(1)
	units := []struct {
		suffixes []string
		factor   int64
	}{
		{[]string{"GiB", "GB", "G"}, 1 << 30},
		{[]string{"MiB", "MB", "M"}, 1 << 20},
		{[]string{"KiB", "KB", "K"}, 1 << 10},
		{[]string{"B"}, 1},
	}
found:
	for _, u := range units {
		for _, suffix := range u.suffixes {
			if rest, ok := strings.CutSuffix(s, suffix); ok {
				s, multiplier = strings.TrimSpace(rest), u.factor
				break found
			}
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/multiplier {
		return fmt.Errorf("%q is not a size (e.g. 1048576, 512KiB, 2MiB)", value)
	}
	*b = ByteSize(n * multiplier)
	return nil
}

// String renders the size with the largest binary unit that divides it.
// Set parses a size, so a ByteSize also serves as a command-line flag (pflag.Value).
func (b *ByteSize) Set(value string) error { return b.Decode(value) }

// Type names the flag's value in help output.
func (ByteSize) Type() string { return "size" }

func (b ByteSize) String() string {
	switch {
	case b != 0 && b%(1<<30) == 0:
		return strconv.FormatInt(int64(b>>30), 10) + "GiB"
	case b != 0 && b%(1<<20) == 0:
		return strconv.FormatInt(int64(b>>20), 10) + "MiB"
	case b != 0 && b%(1<<10) == 0:
		return strconv.FormatInt(int64(b>>10), 10) + "KiB"
	}
	return strconv.FormatInt(int64(b), 10)
}
