// Package config reads each diskferry binary's settings from the environment
// (github.com/kelseyhightower/envconfig), applies documented defaults and validates them,
// reporting every problem at once with the variable it concerns.
//
// Every variable is spelled out in full (DISKFERRY_...) in its field's envconfig tag, and
// the doc comment of that field is its documentation.
//
// Secrets: a secret X can be given as DISKFERRY_X or read from the file named by
// DISKFERRY_X_FILE (trailing newlines are stripped). Setting both is an error rather than
// a silent precedence, so a stale value never shadows the one the operator meant. Prefer
// the file: environment variables show in /proc/<pid>/environ and in crash reports.
// Secrets are of type Secret, which never prints, logs or marshals its value.
package config

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"reflect"
	"strconv"
	"strings"

	"github.com/kelseyhightower/envconfig"

	"github.com/diskferry/diskferry/internal/tunnel"
)

// Temporal is how a binary reaches the Temporal frontend.
type Temporal struct {
	// DISKFERRY_TEMPORAL_ADDRESS is the frontend's host:port. Default 127.0.0.1:7233.
	Address string `envconfig:"DISKFERRY_TEMPORAL_ADDRESS" default:"127.0.0.1:7233"`
	// DISKFERRY_TEMPORAL_NAMESPACE is the Temporal namespace. Default "default".
	Namespace string `envconfig:"DISKFERRY_TEMPORAL_NAMESPACE" default:"default"`
	// DISKFERRY_TEMPORAL_TLS_CERT is the client certificate (PEM file) for mTLS. Optional;
	// set together with DISKFERRY_TEMPORAL_TLS_KEY.
	TLSCert string `envconfig:"DISKFERRY_TEMPORAL_TLS_CERT"`
	// DISKFERRY_TEMPORAL_TLS_KEY is the client certificate's private key (PEM file).
	TLSKey string `envconfig:"DISKFERRY_TEMPORAL_TLS_KEY"`
	// DISKFERRY_TEMPORAL_TLS_CA is the CA bundle (PEM file) that signed the frontend's
	// certificate. Optional; setting it alone enables TLS without a client certificate.
	TLSCA string `envconfig:"DISKFERRY_TEMPORAL_TLS_CA"`
	// DISKFERRY_TEMPORAL_TLS_SERVER_NAME overrides the name checked in the frontend's
	// certificate. Optional.
	TLSServerName string `envconfig:"DISKFERRY_TEMPORAL_TLS_SERVER_NAME"`
}

// TLSEnabled reports whether the Temporal connection uses TLS.
func (t Temporal) TLSEnabled() bool {
	return t.TLSCert != "" || t.TLSCA != "" || t.TLSServerName != ""
}

func (t Temporal) validate(v *validator) {
	v.hostPort("DISKFERRY_TEMPORAL_ADDRESS", t.Address, true)
	v.required("DISKFERRY_TEMPORAL_NAMESPACE", t.Namespace)
	if (t.TLSCert == "") != (t.TLSKey == "") {
		v.fail("DISKFERRY_TEMPORAL_TLS_CERT", errors.New("set together with DISKFERRY_TEMPORAL_TLS_KEY (both or neither)"))
	}
	v.readableFile("DISKFERRY_TEMPORAL_TLS_CERT", t.TLSCert)
	v.readableFile("DISKFERRY_TEMPORAL_TLS_KEY", t.TLSKey)
	v.readableFile("DISKFERRY_TEMPORAL_TLS_CA", t.TLSCA)
}

// Secret is a value that must never reach a log, an error, a workflow payload or a
// process argument. Its String, LogValue and MarshalText show only whether it is set.
type Secret string

const redacted = "[REDACTED]"

// Value returns the secret itself, for the one place that needs it.
func (s Secret) Value() string { return string(s) }

// String hides the value.
func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return redacted
}

// GoString hides the value from %#v.
func (s Secret) GoString() string { return strconv.Quote(s.String()) }

// LogValue hides the value from log/slog.
func (s Secret) LogValue() slog.Value { return slog.StringValue(s.String()) }

// MarshalText hides the value from encoding/json and friends.
func (s Secret) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// process fills spec from the environment. Every tag holds the full variable name and the
// prefix is empty, so envconfig never falls back to an unprefixed variable.
func process(spec any) error {
	if err := envconfig.Process("", spec); err != nil {
		var parseErr *envconfig.ParseError
		if errors.As(err, &parseErr) {
			return &VarError{Var: parseErr.KeyName, Err: fmt.Errorf("cannot parse %q as %s: %w", parseErr.Value, parseErr.TypeName, parseErr.Err)}
		}
		return err
	}
	return nil
}

// VarError is one invalid setting, naming its variable.
type VarError struct {
	Var string
	Err error
}

func (e *VarError) Error() string { return e.Var + ": " + e.Err.Error() }
func (e *VarError) Unwrap() error { return e.Err }

// validator collects every problem so an operator fixes them in one round.
type validator struct{ errs []error }

func (v *validator) fail(name string, err error) {
	v.errs = append(v.errs, &VarError{Var: name, Err: err})
}

func (v *validator) err(what string) error {
	if len(v.errs) == 0 {
		return nil
	}
	return fmt.Errorf("%s configuration: %w", what, errors.Join(v.errs...))
}

// retired fails a variable an older release read, so a forgotten setting does not pass
// for one that still works.
func (v *validator) retired(name, why string) {
	if _, set := os.LookupEnv(name); set {
		v.fail(name, fmt.Errorf("no longer used: %s; remove it", why))
	}
}

func (v *validator) required(name, value string) bool {
	if strings.TrimSpace(value) == "" {
		v.fail(name, errors.New("required but not set"))
		return false
	}
	return true
}

func (v *validator) hostPort(name, value string, required bool) {
	if value == "" {
		if required {
			v.fail(name, errors.New("required but not set"))
		}
		return
	}
	host, port, err := net.SplitHostPort(value)
	if err != nil {
		v.fail(name, fmt.Errorf("want host:port, got %q: %w", value, err))
		return
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		v.fail(name, fmt.Errorf("port %q of %q is not 1-65535", port, value))
	}
	if host == "" {
		v.fail(name, fmt.Errorf("host missing in %q", value))
	}
}

// readableFile checks that a set path can be opened and read now, so a typo or a wrong
// mode shows at start rather than at the first backup.
func (v *validator) readableFile(name, path string) {
	if path == "" {
		return
	}
	f, err := os.Open(path)
	if err != nil {
		v.fail(name, fmt.Errorf("unreadable file: %w", err))
		return
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		v.fail(name, fmt.Errorf("unreadable file: %w", err))
		return
	}
	if info.IsDir() {
		v.fail(name, fmt.Errorf("%s is a directory, want a file", path))
		return
	}
	if _, err := f.Read(make([]byte, 1)); err != nil && info.Size() > 0 {
		v.fail(name, fmt.Errorf("unreadable file %s: %w", path, err))
	}
}

// privateKeyFile checks a private key file is readable and, as ssh demands, accessible to
// its owner only.
func (v *validator) privateKeyFile(name, path string) {
	v.readableFile(name, path)
	if info, err := os.Stat(path); err == nil {
		if err := tunnel.CheckKeyMode(path, info.Mode()); err != nil {
			v.fail(name, err)
		}
	}
}

// secret resolves a secret from its variable or its *_FILE variable.
func (v *validator) secret(name string, value *Secret, file string) {
	fileVar := name + "_FILE"
	if *value != "" && file != "" {
		v.fail(name, fmt.Errorf("set either %s or %s, not both", name, fileVar))
		return
	}
	if file == "" {
		return
	}
	data, err := os.ReadFile(file)
	if err != nil {
		v.fail(fileVar, fmt.Errorf("read secret file: %w", err))
		return
	}
	s := strings.TrimRight(string(data), "\r\n")
	if s == "" {
		v.fail(fileVar, fmt.Errorf("secret file %s is empty", file))
		return
	}
	*value = Secret(s)
}

// logValue renders a configuration as its variables; Secret fields show as redacted.
func logValue(spec any) slog.Value {
	var attrs []slog.Attr
	var walk func(reflect.Value)
	walk = func(rv reflect.Value) {
		rt := rv.Type()
		for i := range rt.NumField() {
			field, value := rt.Field(i), rv.Field(i)
			if !field.IsExported() {
				continue
			}
			if field.Anonymous && value.Kind() == reflect.Struct {
				walk(value)
				continue
			}
			name := field.Tag.Get("envconfig")
			if name == "" {
				continue
			}
			if lv, ok := value.Interface().(slog.LogValuer); ok {
				attrs = append(attrs, slog.Any(name, lv.LogValue()))
				continue
			}
			if s, ok := value.Interface().(fmt.Stringer); ok {
				attrs = append(attrs, slog.String(name, s.String()))
				continue
			}
			attrs = append(attrs, slog.Any(name, value.Interface()))
		}
	}
	walk(reflect.ValueOf(spec))
	return slog.GroupValue(attrs...)
}

// render prints a configuration as NAME=value pairs, secrets redacted.
func render(spec any) string {
	attrs := logValue(spec).Group()
	parts := make([]string, len(attrs))
	for i, a := range attrs {
		parts[i] = a.Key + "=" + a.Value.Resolve().String()
	}
	return strings.Join(parts, " ")
}
