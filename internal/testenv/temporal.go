package testenv

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"go.temporal.io/sdk/client"
	sdklog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/testsuite"
)

// TemporalSearchAttributes are diskferry's search attributes (docs/operations.md, Watching), registered on every
// test server as `--search-attribute Name=Keyword`.
var TemporalSearchAttributes = []string{"VMName", "Site", "BackupMode", "BackupStatus"}

// TemporalServer is a running Temporal dev server with a connected client.
type TemporalServer struct {
	Client    client.Client
	HostPort  string // frontend gRPC, 127.0.0.1:port
	Namespace string
}

// StartTemporal starts the Temporal dev server from .tools/bin/temporal (headless, in-memory,
// free ports on 127.0.0.1, diskferry's search attributes registered) and stops it on t.Cleanup.
func StartTemporal(t TB) *TemporalServer {
	t.Helper()
	return StartTemporalWith(t, TemporalOptions{})
}

// TemporalOptions shape the dev server.
type TemporalOptions struct {
	// UIPort serves the Web UI on 127.0.0.1:UIPort; 0 runs headless.
	UIPort int
	// WithoutSearchAttributes starts the server without diskferry's search attributes, as a
	// fresh deployment's server is before its init step registers them.
	WithoutSearchAttributes bool
}

// StartTemporalWith is StartTemporal with options.
func StartTemporalWith(t TB, opts TemporalOptions) *TemporalServer {
	t.Helper()
	bin := ToolPath(t, "temporal")

	var extra []string
	if !opts.WithoutSearchAttributes {
		for _, name := range TemporalSearchAttributes {
			extra = append(extra, "--search-attribute", name+"=Keyword")
		}
	}
	output := &syncBuffer{}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start := time.Now()
	srv, err := testsuite.StartDevServer(ctx, testsuite.DevServerOptions{
		ExistingPath: bin,
		ClientOptions: &client.Options{
			Namespace: "default",
			Logger:    quietSDKLogger(),
		},
		LogLevel:  "error",
		ExtraArgs: extra,
		EnableUI:  opts.UIPort != 0,
		UIPort:    uiPort(opts.UIPort),
		Stdout:    output,
		Stderr:    output,
	})
	if err != nil {
		t.Fatalf("start temporal dev server: %v\n%s", err, outputTail(output.Bytes(), 4000))
	}
	t.Logf("temporal dev server ready at %s in %s", srv.FrontendHostPort(), time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		srv.Client().Close()
		// Stop interrupts the process this test started and waits for it; the SDK keeps its PID.
		if err := srv.Stop(); err != nil {
			t.Logf("stop temporal dev server: %v", err)
		}
		if t.Failed() {
			t.Logf("temporal dev server output:\n%s", outputTail(output.Bytes(), 4000))
		}
	})
	return &TemporalServer{Client: srv.Client(), HostPort: srv.FrontendHostPort(), Namespace: "default"}
}

// quietSDKLogger keeps the SDK's info chatter out of test output; warnings still show.
func quietSDKLogger() sdklog.Logger {
	return sdklog.NewStructuredLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
}

// syncBuffer collects a child's output, written from the exec copy goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf.Bytes())
}

func uiPort(p int) string {
	if p == 0 {
		return ""
	}
	return strconv.Itoa(p)
}
