package config_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/diskferry/diskferry/internal/config"
)

// isolateEnv removes every DISKFERRY_ variable for the test (restored afterwards) and sets vars.
func isolateEnv(t *testing.T, vars map[string]string) {
	t.Helper()
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "DISKFERRY_") {
			t.Setenv(name, "") // registers the restore
			os.Unsetenv(name)
		}
	}
	for k, v := range vars {
		t.Setenv(k, v)
	}
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func with(base map[string]string, changes map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range base {
		out[k] = v
	}
	for k, v := range changes {
		if v == "<unset>" {
			delete(out, k)
			continue
		}
		out[k] = v
	}
	return out
}

const dsnSecret = "diskferry:hunter2@tcp(127.0.0.1:3306)/diskferry"

func hubEnv() map[string]string {
	return map[string]string{
		"DISKFERRY_HUB_ID":          "hub-1",
		"DISKFERRY_DB_DSN":          dsnSecret,
		"DISKFERRY_REPOSITORY_ROOT": "/srv/diskferry/",
	}
}

func TestLoadHubDefaults(t *testing.T) {
	isolateEnv(t, hubEnv())
	c, err := config.LoadHub()
	if err != nil {
		t.Fatalf("LoadHub: %v", err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"temporal address", c.Address, "127.0.0.1:7233"},
		{"namespace", c.Namespace, "default"},
		{"tls", c.TLSEnabled(), false},
		{"hub id", c.HubID, "hub-1"},
		{"dsn", c.DBDSN.Value(), dsnSecret},
		{"repository root cleaned", c.RepositoryRoot, "/srv/diskferry"},
		{"port min", c.PortMin, 10100},
		{"port max", c.PortMax, 10200},
		{"metrics", c.MetricsAddr, "127.0.0.1:9464"},
		{"log level", c.LogLevel, slog.LevelInfo},
		{"margin", c.Margin().Of(100 << 30), int64(1 << 30)},
		{"heartbeat", c.Heartbeat, 10 * time.Second},
	}
	for _, check := range checks {
		if check.got != check.want {
			t.Errorf("%s = %v, want %v", check.name, check.got, check.want)
		}
	}
}

func TestLoadHubOverrides(t *testing.T) {
	cert := writeFile(t, "cert.pem", "cert")
	key := writeFile(t, "key.pem", "key")
	ca := writeFile(t, "ca.pem", "ca")
	isolateEnv(t, with(hubEnv(), map[string]string{
		"DISKFERRY_TEMPORAL_ADDRESS":   "temporal.example:7233",
		"DISKFERRY_TEMPORAL_NAMESPACE": "backup",
		"DISKFERRY_TEMPORAL_TLS_CERT":  cert,
		"DISKFERRY_TEMPORAL_TLS_KEY":   key,
		"DISKFERRY_TEMPORAL_TLS_CA":    ca,
		"DISKFERRY_PORT_MIN":           "20000",
		"DISKFERRY_PORT_MAX":           "20000",
		"DISKFERRY_METRICS_ADDR":       "",
		"DISKFERRY_LOG_LEVEL":          "DEBUG",
		"DISKFERRY_HUB_HEARTBEAT":      "3s",
	}))
	c, err := config.LoadHub()
	if err != nil {
		t.Fatalf("LoadHub: %v", err)
	}
	if c.Address != "temporal.example:7233" || c.Namespace != "backup" || !c.TLSEnabled() || c.TLSCA != ca {
		t.Errorf("temporal settings not applied: %+v", c.Temporal)
	}
	if c.PortMin != 20000 || c.PortMax != 20000 {
		t.Errorf("one-port range = %d-%d, want 20000-20000", c.PortMin, c.PortMax)
	}
	if c.MetricsAddr != "" {
		t.Errorf("explicitly empty metrics address = %q, want disabled", c.MetricsAddr)
	}
	if c.LogLevel != slog.LevelDebug {
		t.Errorf("log level = %v, want DEBUG", c.LogLevel)
	}
	if c.Heartbeat != 3*time.Second {
		t.Errorf("heartbeat = %s, want 3s", c.Heartbeat)
	}
}

// expectErr asserts that err names the variable and says what is wrong.
func expectErr(t *testing.T, err error, variable, problem string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want %s: %s", variable, problem)
	}
	if !strings.Contains(err.Error(), variable+": ") || !strings.Contains(err.Error(), problem) {
		t.Fatalf("error %q does not say %s: ...%s", err, variable, problem)
	}
	var varErr *config.VarError
	if !errors.As(err, &varErr) {
		t.Fatalf("error %q holds no *config.VarError", err)
	}
}

func TestLoadHubRejects(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name     string
		changes  map[string]string
		variable string
		problem  string
	}{
		{"missing hub id", map[string]string{"DISKFERRY_HUB_ID": "<unset>"}, "DISKFERRY_HUB_ID", "required"},
		{"hub id with slash", map[string]string{"DISKFERRY_HUB_ID": "hub/1"}, "DISKFERRY_HUB_ID", "use letters"},
		{"inverted port range", map[string]string{"DISKFERRY_PORT_MIN": "10300"}, "DISKFERRY_PORT_MIN", "inverted port range"},
		{"port above 65535", map[string]string{"DISKFERRY_PORT_MAX": "70000"}, "DISKFERRY_PORT_MAX", "not 1-65535"},
		{"port not a number", map[string]string{"DISKFERRY_PORT_MIN": "low"}, "DISKFERRY_PORT_MIN", "cannot parse"},
		{"relative repository", map[string]string{"DISKFERRY_REPOSITORY_ROOT": "srv/backups"}, "DISKFERRY_REPOSITORY_ROOT", "absolute path"},
		{"missing repository", map[string]string{"DISKFERRY_REPOSITORY_ROOT": "<unset>"}, "DISKFERRY_REPOSITORY_ROOT", "required"},
		{"missing dsn", map[string]string{"DISKFERRY_DB_DSN": "<unset>"}, "DISKFERRY_DB_DSN", "required"},
		{"dsn and dsn file", map[string]string{"DISKFERRY_DB_DSN_FILE": writeFile(t, "dsn", dsnSecret)}, "DISKFERRY_DB_DSN", "not both"},
		{"dsn file missing", map[string]string{"DISKFERRY_DB_DSN": "<unset>", "DISKFERRY_DB_DSN_FILE": filepath.Join(dir, "nope")}, "DISKFERRY_DB_DSN_FILE", "read secret file"},
		{"dsn file empty", map[string]string{"DISKFERRY_DB_DSN": "<unset>", "DISKFERRY_DB_DSN_FILE": writeFile(t, "empty", "\n")}, "DISKFERRY_DB_DSN_FILE", "is empty"},
		{"retired export bind", map[string]string{"DISKFERRY_EXPORT_BIND": "127.0.0.1"}, "DISKFERRY_EXPORT_BIND", "no longer used: exports listen on unix sockets"},
		{"export cache unknown", map[string]string{"DISKFERRY_EXPORT_CACHE": "fast"}, "DISKFERRY_EXPORT_CACHE", "want none, writeback"},
		{"metrics without port", map[string]string{"DISKFERRY_METRICS_ADDR": "127.0.0.1"}, "DISKFERRY_METRICS_ADDR", "host:port"},
		{"temporal address bad port", map[string]string{"DISKFERRY_TEMPORAL_ADDRESS": "temporal:0"}, "DISKFERRY_TEMPORAL_ADDRESS", "not 1-65535"},
		{"empty namespace", map[string]string{"DISKFERRY_TEMPORAL_NAMESPACE": ""}, "DISKFERRY_TEMPORAL_NAMESPACE", "required"},
		{"tls cert without key", map[string]string{"DISKFERRY_TEMPORAL_TLS_CERT": writeFile(t, "c.pem", "c")}, "DISKFERRY_TEMPORAL_TLS_CERT", "both or neither"},
		{"tls ca unreadable", map[string]string{"DISKFERRY_TEMPORAL_TLS_CA": filepath.Join(dir, "ca.pem")}, "DISKFERRY_TEMPORAL_TLS_CA", "unreadable file"},
		{"tls key is a directory", map[string]string{"DISKFERRY_TEMPORAL_TLS_CERT": writeFile(t, "c2.pem", "c"), "DISKFERRY_TEMPORAL_TLS_KEY": dir}, "DISKFERRY_TEMPORAL_TLS_KEY", "is a directory"},
		{"log level unknown", map[string]string{"DISKFERRY_LOG_LEVEL": "loud"}, "DISKFERRY_LOG_LEVEL", "cannot parse"},
		{"margin unreadable", map[string]string{"DISKFERRY_REPOSITORY_MARGIN": "2GB"}, "DISKFERRY_REPOSITORY_MARGIN", "want a size such as 2GiB"},
		{"heartbeat too short", map[string]string{"DISKFERRY_HUB_HEARTBEAT": "100ms"}, "DISKFERRY_HUB_HEARTBEAT", "want 1s-10m"},
		{"heartbeat not a duration", map[string]string{"DISKFERRY_HUB_HEARTBEAT": "often"}, "DISKFERRY_HUB_HEARTBEAT", "cannot parse"},
		{"margin percentage too large", map[string]string{"DISKFERRY_REPOSITORY_MARGIN": "60%"}, "DISKFERRY_REPOSITORY_MARGIN", "not a percentage of 0-50"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			isolateEnv(t, with(hubEnv(), tc.changes))
			_, err := config.LoadHub()
			expectErr(t, err, tc.variable, tc.problem)
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("error leaks the DSN password: %v", err)
			}
		})
	}
}

func TestLoadHubReportsEveryProblemAtOnce(t *testing.T) {
	isolateEnv(t, with(hubEnv(), map[string]string{
		"DISKFERRY_HUB_ID":          "<unset>",
		"DISKFERRY_PORT_MIN":        "10300",
		"DISKFERRY_REPOSITORY_ROOT": "relative",
	}))
	_, err := config.LoadHub()
	for _, want := range []string{"DISKFERRY_HUB_ID", "DISKFERRY_PORT_MIN", "DISKFERRY_REPOSITORY_ROOT"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not mention %s", err, want)
		}
	}
}

func TestSecretFromFile(t *testing.T) {
	file := writeFile(t, "dsn", dsnSecret+"\r\n\n")
	isolateEnv(t, with(hubEnv(), map[string]string{"DISKFERRY_DB_DSN": "<unset>", "DISKFERRY_DB_DSN_FILE": file}))
	c, err := config.LoadHub()
	if err != nil {
		t.Fatalf("LoadHub: %v", err)
	}
	if c.DBDSN.Value() != dsnSecret {
		t.Fatalf("DSN from file = %q, want %q (trailing newlines stripped)", c.DBDSN.Value(), dsnSecret)
	}
	if c.DBDSNFile != file {
		t.Fatalf("DBDSNFile = %q, want %q", c.DBDSNFile, file)
	}
}

func TestSecretsNeverPrint(t *testing.T) {
	isolateEnv(t, with(snaEnv(t), map[string]string{"DISKFERRY_VCENTER_PASSWORD": "s3cr3t-pw"}))
	sna, err := config.LoadSNA()
	if err != nil {
		t.Fatalf("LoadSNA: %v", err)
	}
	isolateEnv(t, hubEnv())
	hub, err := config.LoadHub()
	if err != nil {
		t.Fatalf("LoadHub: %v", err)
	}
	isolateEnv(t, map[string]string{"DISKFERRY_DB_DSN": dsnSecret})
	cli, err := config.LoadCLI()
	if err != nil {
		t.Fatalf("LoadCLI: %v", err)
	}

	for name, c := range map[string]any{"sna": sna, "hub": hub, "cli": cli} {
		var logged bytes.Buffer
		slog.New(slog.NewJSONHandler(&logged, nil)).Info("config", "config", c)
		slog.New(slog.NewTextHandler(&logged, nil)).Info("config", "config", c)
		asJSON, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		renderings := map[string]string{
			"slog": logged.String(),
			"json": string(asJSON),
			"%v":   fmt.Sprintf("%v", c),
			"%+v":  fmt.Sprintf("%+v", c),
			"%#v":  fmt.Sprintf("%#v", c),
			"%s":   fmt.Sprintf("%s", c),
		}
		for how, out := range renderings {
			if strings.Contains(out, "hunter2") || strings.Contains(out, "s3cr3t-pw") {
				t.Errorf("%s config printed with %s leaks a secret: %s", name, how, out)
			}
		}
		if !strings.Contains(logged.String(), "[REDACTED]") || !strings.Contains(logged.String(), "DISKFERRY_TEMPORAL_ADDRESS") {
			t.Errorf("%s config log lacks the redaction marker or variable names: %s", name, logged.String())
		}
	}
	if !strings.Contains(hub.String(), "DISKFERRY_HUB_ID=hub-1") || !strings.Contains(hub.String(), "DISKFERRY_DB_DSN=[REDACTED]") {
		t.Errorf("hub String() = %s", hub.String())
	}
}

func TestSecretShowsWhetherSet(t *testing.T) {
	if got := config.Secret("").String(); got != "" {
		t.Errorf("empty secret renders %q, want empty", got)
	}
	if got := config.Secret("x").String(); got != "[REDACTED]" {
		t.Errorf("set secret renders %q, want [REDACTED]", got)
	}
	if got := config.Secret("x").Value(); got != "x" {
		t.Errorf("Value() = %q, want the secret", got)
	}
}

func TestLoadCLI(t *testing.T) {
	isolateEnv(t, nil)
	c, err := config.LoadCLI()
	if err != nil {
		t.Fatalf("LoadCLI with nothing set: %v", err)
	}
	if c.Address != "127.0.0.1:7233" || c.Namespace != "default" || c.DBDSN != "" || c.LogLevel != slog.LevelWarn {
		t.Errorf("CLI defaults = %+v", c)
	}

	isolateEnv(t, map[string]string{"DISKFERRY_DB_DSN_FILE": writeFile(t, "dsn", dsnSecret+"\n")})
	c, err = config.LoadCLI()
	if err != nil || c.DBDSN.Value() != dsnSecret {
		t.Fatalf("LoadCLI with DSN file: %v, dsn set %v", err, c.DBDSN != "")
	}

	isolateEnv(t, map[string]string{"DISKFERRY_DB_DSN": dsnSecret, "DISKFERRY_DB_DSN_FILE": writeFile(t, "dsn2", dsnSecret)})
	_, err = config.LoadCLI()
	expectErr(t, err, "DISKFERRY_DB_DSN", "not both")

	isolateEnv(t, map[string]string{"DISKFERRY_TEMPORAL_ADDRESS": "no-port"})
	_, err = config.LoadCLI()
	expectErr(t, err, "DISKFERRY_TEMPORAL_ADDRESS", "host:port")
}
