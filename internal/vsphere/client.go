// Package vsphere talks to vCenter/ESXi through govmomi: it finds and inspects VMs,
// manages backup snapshots and Changed Block Tracking, and describes where a snapshot's
// disk can be read from.
package vsphere

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"time"

	"github.com/vmware/govmomi/fault"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/session/keepalive"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/diskferry/diskferry/internal/certpin"
)

// Errors callers branch on; match them with errors.Is.
var (
	// ErrLogin means vCenter rejected the user name or password.
	ErrLogin = errors.New("vCenter login rejected")
	// ErrNotFound means the VM, snapshot or disk does not exist.
	ErrNotFound = errors.New("not found")
	// ErrSnapshotBusy means a snapshot create/remove task is already running on the VM.
	ErrSnapshotBusy = errors.New("a snapshot task is already running on the VM")
	// ErrInvalidChangeID means vCenter does not accept the changeId (CBT was reset or the
	// disk changed): the caller must fall back to a full copy.
	ErrInvalidChangeID = errors.New("changeId not accepted for this disk (CBT reset, off or not yet active)")
	// ErrInvalidReference means a VM reference has a shape no VM can have (a relative
	// inventory path, a '..' element): no retry finds it.
	ErrInvalidReference = errors.New("invalid VM reference")
)

// DefaultKeepAlive is how often an idle session is refreshed; vCenter drops idle
// sessions after 30 minutes by default.
const DefaultKeepAlive = 5 * time.Minute

// Config says how to reach vCenter. Password is read from a file by the caller and is
// never logged (Config redacts it in String and LogValue).
type Config struct {
	URL      string // https://vcenter.example or vcenter.example; /sdk is added
	User     string
	Password string
	// Thumbprint pins the server certificate: SHA-1 or SHA-256 of the DER certificate,
	// hex, colons optional. Any other certificate is refused, CA-signed or not.
	Thumbprint string
	// Insecure skips certificate verification; an explicit, loudly logged opt-in.
	Insecure  bool
	KeepAlive time.Duration // 0: DefaultKeepAlive
	Logger    *slog.Logger  // nil: slog.Default()
}

// String describes the config without the password.
func (c Config) String() string {
	return fmt.Sprintf("vsphere.Config{URL:%s User:%s Thumbprint:%s Insecure:%t}", c.URL, c.User, c.Thumbprint, c.Insecure)
}

// LogValue keeps the password out of structured logs.
func (c Config) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("url", c.URL),
		slog.String("user", c.User),
		slog.String("thumbprint", c.Thumbprint),
		slog.Bool("insecure", c.Insecure),
	)
}

// ThumbprintMismatchError means vCenter presents a certificate other than the pinned one.
type ThumbprintMismatchError = certpin.MismatchError

// Client is a logged-in vCenter session kept alive in the background.
type Client struct {
	vim      *vim25.Client
	soap     *soap.Client
	sessions *session.Manager
	keep     *keepalive.HandlerSOAP
	user     *url.Userinfo
	log      *slog.Logger
	about    types.AboutInfo
}

// Connect logs in to vCenter and starts the session keepalive.
func Connect(ctx context.Context, cfg Config) (*Client, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	u, err := soap.ParseURL(cfg.URL)
	if err != nil || u == nil {
		return nil, fmt.Errorf("parse vCenter URL %q: %v", cfg.URL, err)
	}
	// soap.ParseURL adds empty userinfo; credentials typed into the URL would leak
	// through logs and process listings.
	if u.User != nil && u.User.String() != "" && u.User.String() != ":" {
		return nil, fmt.Errorf("vCenter URL %s must not carry credentials: pass user and password file instead", u.Redacted())
	}
	u.User = nil
	if cfg.User == "" {
		return nil, fmt.Errorf("connect to vCenter %s: no user given", u.Host)
	}

	sc := soap.NewClient(u, cfg.Insecure)
	switch {
	case cfg.Insecure:
		log.Warn("vCenter certificate verification DISABLED (insecure opt-in): the connection can be intercepted",
			"url", u.String(), "user", cfg.User)
	case cfg.Thumbprint != "":
		want, err := certpin.Parse(cfg.Thumbprint)
		if err != nil {
			return nil, fmt.Errorf("connect to vCenter %s: %w", u.Host, err)
		}
		sc.SetThumbprint(u.Host, want.String())
		pinTransport(sc, u.Host, want)
	}

	vc, err := vim25.NewClient(ctx, sc)
	if err != nil {
		if soap.IsCertificateUntrusted(err) {
			return nil, fmt.Errorf("connect to vCenter %s: certificate not trusted; verify it and pin its thumbprint%s: %w",
				u.Host, presentedThumbprint(ctx, u.Host), err)
		}
		return nil, fmt.Errorf("connect to vCenter %s: %w", u.Host, err)
	}
	c := &Client{
		vim:   vc,
		soap:  sc,
		user:  url.UserPassword(cfg.User, cfg.Password),
		log:   log,
		about: vc.ServiceContent.About,
	}
	idle := cfg.KeepAlive
	if idle <= 0 {
		idle = DefaultKeepAlive
	}
	c.keep = keepalive.NewHandlerSOAP(vc.RoundTripper, idle, c.keepAlive)
	vc.RoundTripper = c.keep
	c.sessions = session.NewManager(vc)

	if err := c.sessions.Login(ctx, c.user); err != nil {
		if isInvalidLogin(err) {
			return nil, fmt.Errorf("log in to vCenter %s as %q: invalid user name or password: %w", u.Host, cfg.User, ErrLogin)
		}
		return nil, fmt.Errorf("log in to vCenter %s as %q: %w", u.Host, cfg.User, err)
	}
	log.Info("connected to vCenter", "url", u.String(), "user", cfg.User,
		"product", c.about.FullName, "instanceUuid", c.about.InstanceUuid)
	return c, nil
}

// keepAlive refreshes the session and logs in again when vCenter has dropped it, so a
// long-running worker survives a vCenter restart or session purge.
func (c *Client) keepAlive() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := methods.GetCurrentTime(ctx, c.soap)
	if err == nil {
		return nil
	}
	if !isNotAuthenticated(err) {
		c.log.Warn("vCenter keepalive failed", "error", err)
		return nil
	}
	c.log.Warn("vCenter session expired; logging in again")
	if err := c.sessions.Login(ctx, c.user); err != nil {
		c.log.Error("vCenter re-login failed", "error", err)
		return nil
	}
	return nil
}

// Close logs out and stops the keepalive.
func (c *Client) Close(ctx context.Context) error {
	defer c.keep.Stop()
	if err := c.sessions.Logout(ctx); err != nil {
		return fmt.Errorf("log out of vCenter: %w", err)
	}
	return nil
}

// Vim is the underlying govmomi client, for calls this package does not wrap.
func (c *Client) Vim() *vim25.Client { return c.vim }

// InstanceUUID identifies the vCenter (ServiceContent.About.InstanceUuid).
func (c *Client) InstanceUUID() string { return c.about.InstanceUuid }

// SessionCookie is the session cookie as "name=value", for HTTP requests (datastore
// file access) made outside the SOAP client.
func (c *Client) SessionCookie() (string, error) {
	ck := c.soap.SessionCookie()
	if ck == nil || ck.Value == "" {
		return "", errors.New("vCenter session cookie not set: not logged in")
	}
	return soap.SessionCookieName + "=" + ck.Value, nil
}

// pinTransport makes every TLS connection of the client accept exactly the pinned
// certificate. govmomi's own SetThumbprint only applies when CA verification fails,
// so a CA-signed impostor would pass; this does not.
func pinTransport(sc *soap.Client, host string, want certpin.Pin) {
	cfg := want.TLSConfig(host)
	tr := sc.DefaultTransport()
	tr.TLSClientConfig = cfg
	dialer := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 30 * time.Second}, Config: cfg}
	tr.DialTLSContext = dialer.DialContext
}

// presentedThumbprint names the certificate a server presents, so an operator can
// compare it with the one vCenter shows before pinning it.
func presentedThumbprint(ctx context.Context, host string) string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cert, err := certpin.Presented(ctx, host)
	if err != nil {
		return ""
	}
	sha1Print, _ := certpin.Thumbprints(cert.Raw)
	return " (server presents SHA-1 " + sha1Print + ")"
}

func isInvalidLogin(err error) bool { return fault.Is(err, &types.InvalidLogin{}) }

func isNotAuthenticated(err error) bool { return fault.Is(err, &types.NotAuthenticated{}) }

func isNotFound(err error) bool { return fault.Is(err, &types.ManagedObjectNotFound{}) }

// asMethodFault reports whether err carries a vSphere fault of type T, and returns it.
func asMethodFault[T types.BaseMethodFault](err error, target *T) bool {
	_, ok := fault.As(err, target)
	return ok
}

// IsRefused reports whether vCenter refused the request itself (an invalid argument or name,
// an unsupported operation, a missing privilege): sent again, it fails the same way.
func IsRefused(err error) bool {
	return fault.Is(err, &types.InvalidArgument{}) || fault.Is(err, &types.InvalidName{}) ||
		fault.Is(err, &types.NotSupported{}) || fault.Is(err, &types.NoPermission{})
}
