package config_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/diskferry/diskferry/internal/config"
)

// selfSigned writes a throwaway certificate and key as PEM files.
func selfSigned(t *testing.T) (certPath, keyPath string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "temporal.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IsCA:         true,
		DNSNames:     []string{"temporal.test"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPath = writeFile(t, "cert.pem", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	keyPath = writeFile(t, "key.pem", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})))
	return certPath, keyPath
}

func TestTemporalTLS(t *testing.T) {
	off, err := config.Temporal{Address: "127.0.0.1:7233"}.TLS()
	if err != nil || off != nil {
		t.Fatalf("TLS() without TLS settings = %v, %v; want nil, nil", off, err)
	}

	cert, key := selfSigned(t)
	cfg, err := config.Temporal{TLSCert: cert, TLSKey: key, TLSCA: cert, TLSServerName: "temporal.test"}.TLS()
	if err != nil {
		t.Fatalf("TLS(): %v", err)
	}
	if len(cfg.Certificates) != 1 || cfg.RootCAs == nil || cfg.ServerName != "temporal.test" {
		t.Fatalf("TLS() = certs %d, roots %v, server name %q", len(cfg.Certificates), cfg.RootCAs != nil, cfg.ServerName)
	}

	notPEM := writeFile(t, "ca.txt", "not a certificate")
	if _, err := (config.Temporal{TLSCA: notPEM}).TLS(); err == nil || !strings.Contains(err.Error(), "DISKFERRY_TEMPORAL_TLS_CA") {
		t.Fatalf("TLS() with a non-PEM CA: %v, want an error naming DISKFERRY_TEMPORAL_TLS_CA", err)
	}
	if _, err := (config.Temporal{TLSCert: cert, TLSKey: cert}).TLS(); err == nil || !strings.Contains(err.Error(), "DISKFERRY_TEMPORAL_TLS_CERT/KEY") {
		t.Fatalf("TLS() with a certificate as key: %v, want an error naming the variables", err)
	}
}
