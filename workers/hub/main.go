// Command hub is the diskferry hub worker: it runs the workflows and the host-agnostic hub
// activities on diskferry-hub, the activities bound to this host's files and qemu-nbd
// exports on diskferry-hub.<hubID>, and keeps exports, leases and catalog in agreement.
// Every setting comes from the environment (internal/config).
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.temporal.io/sdk/client"
	sdklog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/worker"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/hub"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/config"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/workflows"
)

const (
	// reconcileInterval is how often exports, leases and rows are compared after the start.
	reconcileInterval = time.Minute
	// reconcileTimeout bounds one reconcile pass; the next round goes on where it stopped.
	reconcileTimeout = 2 * time.Minute
	// workerStopTimeout lets running activities finish on shutdown before they are abandoned
	// to Temporal's retry.
	workerStopTimeout = 20 * time.Second
)

func main() {
	cfg, err := config.LoadHub()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, log); err != nil {
		log.Error("hub worker failed", "err", err)
		os.Exit(1)
	}
}

// run wires the hub worker and serves until ctx ends, then stops gracefully.
func run(ctx context.Context, cfg config.Hub, log *slog.Logger) error {
	log = log.With("hub", cfg.HubID)
	log.Info("hub worker starting", "config", cfg)
	heartbeat := cfg.Heartbeat // LoadHub checked it: 1s-10m

	store, err := catalog.Open(ctx, cfg.DBDSN.Value(), log)
	if err != nil {
		return err
	}
	defer store.Close()
	if err := store.Migrate(ctx); err != nil {
		return err
	}
	ports, err := catalog.NewPorts(store, catalog.PortRange{First: cfg.PortMin, Last: cfg.PortMax})
	if err != nil {
		return err
	}
	layout, err := repo.New(cfg.RepositoryRoot)
	if err != nil {
		return err
	}

	registry := prometheus.NewRegistry()
	sdk := newSDKMetrics()
	tlsConfig, err := cfg.TLS()
	if err != nil {
		return err
	}
	c, err := client.DialContext(ctx, client.Options{
		HostPort:          cfg.Address,
		Namespace:         cfg.Namespace,
		Logger:            sdklog.NewStructuredLogger(log),
		MetricsHandler:    sdk.Handler(),
		ConnectionOptions: client.ConnectionOptions{TLS: tlsConfig},
	})
	if err != nil {
		return fmt.Errorf("connect to temporal at %s: %w", cfg.Address, err)
	}
	defer c.Close()

	verified := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "diskferry_bytes_verified_total", Help: "Bytes of targets read back and verified against the copy's digest.",
	})
	acts, err := hub.New(store, ports, layout, hub.Settings{
		HubID: cfg.HubID, ExportCache: cfg.ExportCache, RunDir: cfg.RunDir,
		WorkflowClosed:   hub.WorkflowClosedFunc(c),
		PortsFree:        hub.PortsFreeFunc(c),
		RetentionRunning: hub.RetentionRunningFunc(c, workflows.RetentionWorkflowID),
		CountVerified:    func(n int64) { verified.Add(float64(n)) },
		RepositoryMargin: cfg.Margin(),
		HubHeartbeat:     heartbeat,
	}, log)
	if err != nil {
		return err
	}
	registry.MustRegister(sdk, verified,
		catalogGauge(log, "diskferry_exports_running", "qemu-nbd exports recorded for this hub.", func(ctx context.Context) (int, error) {
			exports, err := store.ListExports(ctx, cfg.HubID)
			return len(exports), err
		}),
		catalogGauge(log, "diskferry_port_leases", "Export ports leased on this hub.", func(ctx context.Context) (int, error) {
			leases, err := ports.ListLeases(ctx, cfg.HubID)
			return len(leases), err
		}),
		repositoryGauge(log, layout, "diskferry_repository_free_bytes",
			"Bytes available to the hub worker on the file system holding the repository.", func(s repo.Space) int64 { return s.Free }),
		repositoryGauge(log, layout, "diskferry_repository_used_bytes",
			"Bytes used on the file system holding the repository (its points and anything else on it).", func(s repo.Space) int64 { return s.Used }),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	if cfg.MetricsAddr != "" {
		stopMetrics, err := serveMetrics(cfg.MetricsAddr, registry, log)
		if err != nil {
			return err
		}
		defer stopMetrics()
	}

	// Before taking work: exports a previous run left are stopped or adopted.
	reconcile(ctx, acts, log)

	fatal := make(chan error, 2)
	// Heartbeats reach the server every few seconds, so a cancel reaches a verification soon.
	opts := worker.Options{WorkerStopTimeout: workerStopTimeout, MaxHeartbeatThrottleInterval: 5 * time.Second,
		OnFatalError: func(err error) { fatal <- err }}
	shared := worker.New(c, activities.HubQueue, opts)
	workflows.Register(shared)
	acts.RegisterShared(shared)
	host := worker.New(c, activities.HubHostQueue(cfg.HubID), opts)
	acts.RegisterHost(host)
	if err := shared.Start(); err != nil {
		return fmt.Errorf("start worker on %s: %w", activities.HubQueue, err)
	}
	defer shared.Stop()
	if err := host.Start(); err != nil {
		return fmt.Errorf("start worker on %s: %w", activities.HubHostQueue(cfg.HubID), err)
	}
	defer host.Stop()
	// Seen once it polls its host queue: placement may send new chains here from now on.
	if err := recordHub(ctx, store, layout, ports, cfg.HubID, heartbeat); err != nil {
		return err
	}
	log.Info("hub worker running", "queues", []string{activities.HubQueue, activities.HubHostQueue(cfg.HubID)})

	tick := time.NewTicker(reconcileInterval)
	defer tick.Stop()
	beat := time.NewTicker(heartbeat)
	defer beat.Stop()
	for {
		select {
		case <-ctx.Done():
			log.Info("hub worker stopping")
			return nil
		case err := <-fatal:
			return fmt.Errorf("worker: %w", err)
		case <-tick.C:
			reconcile(ctx, acts, log)
		case <-beat.C:
			// A missed heartbeat only makes the hub look down for new chains until the next.
			if err := recordHub(ctx, store, layout, ports, cfg.HubID, heartbeat); err != nil {
				log.Warn("hub heartbeat", "err", err)
			}
		}
	}
}

// recordHub records in the catalog that the hub is alive, with its repository's free and
// used bytes (what the repository metrics report) and its port range (which any hub worker
// leases its ports from). It takes at most one heartbeat, so a hanging catalog never delays
// the next one or the reconcile.
func recordHub(ctx context.Context, store *catalog.Store, layout repo.Layout, ports *catalog.Ports, hubID string,
	heartbeat time.Duration) error {
	space, err := layout.Space()
	if err != nil {
		return fmt.Errorf("hub heartbeat: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, heartbeat)
	defer cancel()
	return store.RecordHub(ctx, catalog.Hub{ID: hubID, FreeBytes: space.Free, UsedBytes: space.Used, Ports: ports.Range()})
}

// reconcile logs rather than fails: the next round retries, and a hub that cannot reach
// Temporal for a moment must still serve its running exports.
func reconcile(ctx context.Context, acts *hub.Activities, log *slog.Logger) {
	// A pass holds the export lock: one stuck on a hanging catalog must not block exports
	// from starting and stopping for longer than this.
	ctx, cancel := context.WithTimeout(ctx, reconcileTimeout)
	defer cancel()
	report, err := acts.Reconcile(ctx)
	if err != nil {
		log.Error("reconcile exports", "err", err)
	}
	log.Info("exports reconciled", "reaped", len(report.Reaped), "stopped", report.Stopped,
		"forgotten", report.Forgotten, "registered", report.Registered, "restarted", report.Restarted,
		"verifiers", report.Verifiers, "abandoned", report.Abandoned, "swept", report.Swept)
}

// catalogGauge reads a count from the catalog at scrape time; a failed read reports nothing.
func catalogGauge(log *slog.Logger, name, help string, count func(context.Context) (int, error)) prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n, err := count(ctx)
		if err != nil {
			log.Warn("metrics: read catalog", "metric", name, "err", err)
		}
		return float64(n)
	})
}

// repositoryGauge reads the repository's file system at scrape time; a failed read reports
// nothing.
func repositoryGauge(log *slog.Logger, layout repo.Layout, name, help string, value func(repo.Space) int64) prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 {
		space, err := layout.Space()
		if err != nil {
			log.Warn("metrics: read repository space", "metric", name, "err", err)
			return 0
		}
		return float64(value(space))
	})
}

// serveMetrics serves /metrics on addr and returns the function that shuts it down. It
// listens before returning, so a taken address fails the start.
func serveMetrics(addr string, registry *prometheus.Registry, log *slog.Logger) (func(), error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics endpoint: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(registry, promhttp.HandlerOpts{Registry: registry}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics endpoint", "err", err)
		}
	}()
	log.Info("metrics endpoint listening", "addr", l.Addr().String())
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-done
	}, nil
}
