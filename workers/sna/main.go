// Command sna is the source node appliance's worker: it polls diskferry-sna.<site> and runs
// the SNA activities (vSphere inspection and snapshots, nbdkit sources, the SSH tunnel to
// the hubs, the copy engine). Every setting comes from the environment (internal/config).
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"go.temporal.io/sdk/client"
	sdklog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/worker"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/activities/sna"
	"github.com/diskferry/diskferry/internal/config"
	"github.com/diskferry/diskferry/internal/tunnel"
	"github.com/diskferry/diskferry/internal/vsphere"
)

const (
	// sweepEvery is how often snapshots left behind by closed backup runs are removed.
	sweepEvery = 10 * time.Minute
	// stopTimeout lets running activities return (a copy flushes and heartbeats its
	// checkpoint) before the worker cancels them.
	stopTimeout = 20 * time.Second
)

func main() {
	cfg, err := config.LoadSNA()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err = run(ctx, cfg, log)
	stop()
	if err != nil {
		log.Error("sna worker failed", "error", err)
		os.Exit(1)
	}
}

// run connects to Temporal and vCenter, serves the site's queue until ctx ends, then stops
// the worker, closes the tunnels and logs out, in that order.
func run(ctx context.Context, cfg config.SNA, log *slog.Logger) error {
	log.Info("sna worker starting", "config", cfg)
	tlsCfg, err := cfg.TLS()
	if err != nil {
		return fmt.Errorf("temporal TLS: %w", err)
	}
	tc, err := client.DialContext(ctx, client.Options{
		HostPort:          cfg.Address,
		Namespace:         cfg.Namespace,
		ConnectionOptions: client.ConnectionOptions{TLS: tlsCfg},
		Logger:            sdklog.NewStructuredLogger(log.With("component", "temporal")),
	})
	if err != nil {
		return fmt.Errorf("connect to Temporal at %s (namespace %s): %w", cfg.Address, cfg.Namespace, err)
	}
	defer tc.Close()

	vc, err := vsphere.Connect(ctx, vsphere.Config{
		URL:        cfg.VCenterURL,
		User:       cfg.VCenterUser,
		Password:   cfg.VCenterPassword.Value(),
		Thumbprint: cfg.VCenterThumbprint,
		Insecure:   cfg.VCenterInsecure,
		Logger:     log.With("component", "vsphere"),
	})
	if err != nil {
		return err
	}
	defer func() {
		logoutCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if err := vc.Close(logoutCtx); err != nil {
			log.Warn("vCenter logout", "error", err)
		}
	}()

	settings, err := snaSettings(cfg)
	if err != nil {
		return err
	}
	tunnels := sna.NewTunnels(tunnelConfig(cfg), log.With("component", "tunnel"))
	defer func() {
		if err := tunnels.Close(); err != nil {
			log.Warn("close tunnels", "error", err)
		}
	}()
	acts := sna.New(vc, tunnels, settings, log.With("component", "activities"))

	queue := activities.SNAQueue(cfg.Site)
	w := worker.New(tc, queue, worker.Options{WorkerStopTimeout: stopTimeout, MaxHeartbeatThrottleInterval: sna.MaxHeartbeatThrottle})
	acts.Register(w)
	if err := w.Start(); err != nil {
		return fmt.Errorf("start worker on %s: %w", queue, err)
	}
	log.Info("sna worker polling", "taskQueue", queue)

	sw := &sweeper{vc: vc, workflows: tc, log: log.With("component", "sweep")}
	sw.sweep(ctx)
	ticker := time.NewTicker(sweepEvery)
	defer ticker.Stop()
	for {
		select {
		case <-ticker.C:
			sw.sweep(ctx)
		case <-ctx.Done():
			log.Info("sna worker stopping")
			w.Stop()
			log.Info("sna worker stopped")
			return nil
		}
	}
}

// tunnelConfig builds each hub's SSH tunnel settings; hubs differ only in their address.
func tunnelConfig(cfg config.SNA) func(hubID string) (tunnel.Config, error) {
	return func(hubID string) (tunnel.Config, error) {
		addr, err := cfg.HubSSHAddrFor(hubID)
		if err != nil {
			return tunnel.Config{}, err
		}
		return tunnel.Config{
			Addr:              addr,
			User:              cfg.HubSSHUser,
			KeyFile:           cfg.SSHKeyFile,
			KnownHostsFile:    cfg.SSHKnownHostsFile,
			KeepaliveInterval: cfg.SSHKeepalive,
			KeepaliveCountMax: cfg.SSHKeepaliveCount,
			Connections:       cfg.HubSSHConnections,
		}, nil
	}
}

func snaSettings(cfg config.SNA) (sna.Settings, error) {
	u, err := url.Parse(cfg.VCenterURL)
	if err != nil || u.Hostname() == "" {
		return sna.Settings{}, errors.New("DISKFERRY_VCENTER_URL: no host name for VDDK")
	}
	var port int
	if p := u.Port(); p != "" {
		if port, err = strconv.Atoi(p); err != nil {
			return sna.Settings{}, fmt.Errorf("DISKFERRY_VCENTER_URL: port %q: %w", p, err)
		}
	}
	return sna.Settings{
		Transport:       cfg.Transport,
		VDDKLibDir:      cfg.VDDKLibdir,
		VCenterHost:     u.Hostname(),
		VCenterPort:     port,
		VCenterUser:     cfg.VCenterUser,
		VCenterPassword: cfg.VCenterPassword.Value(),
		Thumbprint:      cfg.VCenterThumbprint,
		Insecure:        cfg.VCenterInsecure,
		Connections:     cfg.CopyConnections,
		RequestSize:     int64(cfg.CopyRequestSize),
		CheckpointEvery: cfg.CopyCheckpointInterval,
		MaxCopies:       cfg.MaxCopies,
		SiteBandwidth:   int64(cfg.SiteBandwidth),
	}, nil
}
