package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"
	"go.temporal.io/sdk/client"
	sdklog "go.temporal.io/sdk/log"

	"github.com/diskferry/diskferry/internal/config"
)

// dialTemporal connects to the Temporal frontend named by the environment (DISKFERRY_TEMPORAL_*).
func dialTemporal(ctx context.Context) (client.Client, error) {
	cfg, err := config.LoadCLI()
	if err != nil {
		return nil, err
	}
	tlsCfg, err := cfg.TLS()
	if err != nil {
		return nil, err
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))
	c, err := client.DialContext(ctx, client.Options{
		HostPort:          cfg.Address,
		Namespace:         cfg.Namespace,
		ConnectionOptions: client.ConnectionOptions{TLS: tlsCfg},
		Logger:            sdklog.NewStructuredLogger(logger),
	})
	if err != nil {
		return nil, fmt.Errorf("cannot reach Temporal at %s (namespace %s; set DISKFERRY_TEMPORAL_ADDRESS): %w", cfg.Address, cfg.Namespace, err)
	}
	return c, nil
}

// withTemporal turns a command body that needs a Temporal client into a cobra RunE: it
// dials before the body and closes the client after it.
func withTemporal(run func(cmd *cobra.Command, args []string, c client.Client) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		c, err := dialTemporal(cmd.Context())
		if err != nil {
			return err
		}
		defer c.Close()
		return run(cmd, args, c)
	}
}
