package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// TLS returns the TLS configuration for the Temporal frontend, or nil when TLS is off.
func (t Temporal) TLS() (*tls.Config, error) {
	if !t.TLSEnabled() {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.TLSServerName}
	if t.TLSCert != "" || t.TLSKey != "" {
		cert, err := tls.LoadX509KeyPair(t.TLSCert, t.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("DISKFERRY_TEMPORAL_TLS_CERT/KEY: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if t.TLSCA != "" {
		pem, err := os.ReadFile(t.TLSCA)
		if err != nil {
			return nil, fmt.Errorf("DISKFERRY_TEMPORAL_TLS_CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("DISKFERRY_TEMPORAL_TLS_CA: %w", errors.New("no PEM certificate in "+t.TLSCA))
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}
