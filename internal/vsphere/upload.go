package vsphere

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/diskferry/diskferry/internal/certpin"
)

// Trust says how an HTTPS connection to the datastore endpoint checks the server: the
// pinned thumbprint, or no check at all as an explicit opt-in.
type Trust struct {
	Thumbprint string
	Insecure   bool
	// Logger warns on every upload that Insecure leaves unverified, as the curl source does
	// for reads; nil discards.
	Logger *slog.Logger
}

// tlsConfig trusts what the curl source trusts: the certificate matching the pin, fetched
// and made the only trust anchor, with the URL's host name checked against it.
func (t Trust) tlsConfig(ctx context.Context, hostport string) (*tls.Config, error) {
	if t.Insecure {
		log := t.Logger
		if log == nil {
			log = slog.New(slog.DiscardHandler)
		}
		log.Warn("INSECURE: datastore upload does not verify the server certificate (explicit opt-in)", "host", hostport)
		return &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: true}, nil // the operator's explicit opt-in
	}
	if t.Thumbprint == "" {
		return nil, errors.New("no certificate pin: set the vCenter thumbprint (or the insecure opt-in)")
	}
	pin, err := certpin.Parse(t.Thumbprint)
	if err != nil {
		return nil, err
	}
	leaf, err := pin.Fetch(ctx, hostport)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		host = hostport
	}
	cfg := pin.TLSConfig(hostport)
	// The pin check stays (VerifyConnection); the chain and host-name checks against the
	// pinned certificate come back, as curl does them.
	cfg.InsecureSkipVerify, cfg.RootCAs, cfg.ServerName = false, roots, host
	return cfg, nil
}

// UploadFlat writes a disk's whole flat file with one HTTP PUT to the datastore endpoint,
// its body the size bytes fill writes. The session cookie goes in a header, never in a log
// or an error. A full datastore answers with syscall.ENOSPC in the chain, a missing
// file or directory with ErrNotFound.
func UploadFlat(ctx context.Context, flat FlatDisk, size int64, trust Trust, fill func(io.Writer) error) error {
	u, err := url.Parse(flat.URL)
	if err != nil {
		return fmt.Errorf("upload %s: parse url: %w", flat.Path, err)
	}
	cfg, err := trust.tlsConfig(ctx, u.Host)
	if err != nil {
		return fmt.Errorf("upload %s to %s: %w", flat.Path, u.Host, err)
	}
	// Expect: 100-continue: a refusal (no session, no such file) comes back before the body
	// is sent, instead of the server hanging up mid-body with a reset the answer is lost in.
	tr := &http.Transport{TLSClientConfig: cfg, TLSHandshakeTimeout: 30 * time.Second, ResponseHeaderTimeout: 5 * time.Minute,
		ExpectContinueTimeout: 5 * time.Second, DisableKeepAlives: true, ForceAttemptHTTP2: false}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error {
		return errors.New("the datastore endpoint redirected an upload; refusing to follow")
	}}

	pr, pw := io.Pipe()
	fillErr := make(chan error, 1)
	go func() {
		err := fill(pw)
		pw.CloseWithError(err)
		fillErr <- err
	}()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, u.String(), pr)
	if err != nil {
		pr.CloseWithError(err)
		<-fillErr
		return fmt.Errorf("upload %s: %w", flat.Path, err)
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("Cookie", flat.Cookie)
	req.Header.Set("Expect", "100-continue")
	resp, httpErr := client.Do(req)
	if httpErr == nil {
		httpErr = uploadStatus(resp, flat.Path)
	}
	// A failed request leaves the filler blocked on the pipe; closing it ends the filler.
	pr.CloseWithError(errUploadEnded)
	fErr := <-fillErr
	// The filler's own failure (reading the point) is the cause; a pipe the request closed
	// (the server answered early, e.g. 401, and hung up) is not: then the answer is.
	requestEnded := errors.Is(fErr, errUploadEnded) || errors.Is(fErr, io.ErrClosedPipe)
	switch {
	case fErr != nil && !requestEnded:
		return fmt.Errorf("upload %s: %w", flat.Path, fErr)
	case httpErr != nil:
		return fmt.Errorf("upload %s to %s: %w", flat.Path, u.Host, httpErr)
	case fErr != nil:
		return fmt.Errorf("upload %s to %s: the datastore answered before the whole disk was sent", flat.Path, u.Host)
	}
	return nil
}

// errUploadEnded is what the filler's writes return once the request is over.
var errUploadEnded = errors.New("upload request ended")

func uploadStatus(resp *http.Response, path string) error {
	defer resp.Body.Close()
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		return nil
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	msg := fmt.Sprintf("datastore answered %s: %s", resp.Status, strings.TrimSpace(string(body)))
	switch resp.StatusCode {
	case http.StatusInsufficientStorage:
		return fmt.Errorf("%s: %w", msg, syscall.ENOSPC)
	case http.StatusNotFound:
		return fmt.Errorf("%s (%s): %w", msg, path, ErrNotFound)
	}
	return errors.New(msg)
}
