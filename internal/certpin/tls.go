package certpin

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
)

// MismatchError means the server presents a certificate other than the pinned one.
type MismatchError struct {
	Host         string
	Expected     string
	ActualSHA1   string
	ActualSHA256 string
}

func (e *MismatchError) Error() string {
	return fmt.Sprintf("certificate of %s does not match the pinned thumbprint: expected %s, server presents SHA-1 %s (SHA-256 %s)",
		e.Host, e.Expected, e.ActualSHA1, e.ActualSHA256)
}

// check accepts exactly the certificate with this thumbprint.
func (p Pin) check(host string, cert *x509.Certificate) error {
	if p.Matches(cert.Raw) {
		return nil
	}
	sha1Print, sha256Print := Thumbprints(cert.Raw)
	return &MismatchError{Host: host, Expected: p.String(), ActualSHA1: sha1Print, ActualSHA256: sha256Print}
}

// TLSConfig trusts exactly the pinned certificate, CA-signed or not: the pin replaces the
// chain and host-name checks, so neither a CA-signed impostor nor a missing CA matters.
// This is the one place pinning switches Go's own verification off, and only for the pin.
func (p Pin) TLSConfig(host string) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, // replaced by the exact pin check in VerifyConnection
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return fmt.Errorf("%s presented no certificate", host)
			}
			return p.check(host, cs.PeerCertificates[0])
		},
	}
}

// Fetch connects to hostport (port 443 when missing) and returns the certificate it
// presents, checked against the pin; nothing is sent over the connection.
func (p Pin) Fetch(ctx context.Context, hostport string) (*x509.Certificate, error) {
	return presented(ctx, hostport, p.TLSConfig(hostport))
}

// Presented returns the certificate hostport presents, unchecked, to tell an operator which
// thumbprint the server has; nothing is sent over the connection and nothing is trusted.
func Presented(ctx context.Context, hostport string) (*x509.Certificate, error) {
	return presented(ctx, hostport, &tls.Config{InsecureSkipVerify: true}) // read only, see above
}

func presented(ctx context.Context, hostport string, cfg *tls.Config) (*x509.Certificate, error) {
	if _, _, err := net.SplitHostPort(hostport); err != nil {
		hostport = net.JoinHostPort(hostport, "443")
	}
	dialer := tls.Dialer{Config: cfg}
	conn, err := dialer.DialContext(ctx, "tcp", hostport)
	if err != nil {
		return nil, fmt.Errorf("certificate of %s: %w", hostport, err)
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return nil, fmt.Errorf("certificate of %s: %w", hostport, errors.New("none presented"))
	}
	return certs[0], nil
}
