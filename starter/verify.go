package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/coverage"
	"github.com/diskferry/diskferry/internal/nbd"
	"github.com/diskferry/diskferry/internal/qemu"
)

type verifyFlags struct {
	manifest    string
	image       string
	connections int
	verbose     bool
}

func newVerifyCommand() *cobra.Command {
	var f verifyFlags
	cmd := &cobra.Command{
		Use:   "verify URI --manifest FILE [--image QCOW2]",
		Short: "Check an NBD export against the manifest of a copy, naming the blocks that differ",
		Long: `Read an NBD export over the blocks a manifest lists (written by diskferry copy
--manifest) and compare each block's SHA-256. Exits non-zero when a block differs, listing
the first 100.

The manifest covers only the blocks the copy wrote. With --image, the qcow2 file URI serves
(a restore point on this machine) is also proven to hold nothing else: its own clusters lie
inside those blocks, and the rest of a cluster a block ends in reads as zeros (or, for an
incremental point, as its parent, which is served read-only for the comparison).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runVerify(cmd, args[0], f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.manifest, "manifest", "", "the manifest file (required)")
	fl.StringVar(&f.image, "image", "", "the qcow2 file URI serves: also prove it holds nothing outside the manifest's blocks")
	fl.IntVar(&f.connections, "connections", blockcopy.DefaultConnections, "connections to the export")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log the read's steps to stderr")
	_ = cmd.MarkFlagRequired("manifest")
	return cmd
}

func runVerify(cmd *cobra.Command, uri string, f verifyFlags) error {
	v, err := blockcopy.VerifyManifest(cmd.Context(), uri, f.manifest, blockcopy.Options{
		Connections: f.connections,
		Logger:      stderrLogger(cmd, f.verbose),
	})
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	out := cmd.OutOrStdout()
	if v.Mismatches > 0 {
		for _, e := range v.First {
			fmt.Fprintf(out, "differs: offset %d length %d\n", e.Start, e.Length)
		}
		return fmt.Errorf("verify: %d of %d blocks differ", v.Mismatches, v.Blocks)
	}
	fmt.Fprintf(out, "verified %d blocks (%d bytes): all match\n", v.Blocks, v.Bytes)
	if f.image == "" {
		return nil
	}
	areas, _, err := blockcopy.ManifestAreas(f.manifest)
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	err = coverage.VerifyImage(cmd.Context(), f.image, areas, uri, readOnlyServer(cmd.ErrOrStderr()), nbd.Options{})
	var ranges *coverage.RangeError
	if errors.As(err, &ranges) {
		for i, e := range ranges.Ranges {
			if i == maxListed {
				fmt.Fprintf(out, "... %d more\n", len(ranges.Ranges)-maxListed)
				break
			}
			fmt.Fprintf(out, "outside: offset %d length %d\n", e.Start, e.Length)
		}
	}
	if err != nil {
		return fmt.Errorf("verify %s: %w", f.image, err)
	}
	fmt.Fprintf(out, "%s holds nothing outside those blocks\n", f.image)
	return nil
}

// maxListed is how many ranges outside the manifest verify lists, as for differing blocks.
const maxListed = 100

// readOnlyServer serves an image read-only on a unix socket in a new temporary directory,
// for reading an incremental point's parent; a failed stop is reported to warn.
func readOnlyServer(warn io.Writer) coverage.Server {
	return func(ctx context.Context, path string) (string, func(), error) {
		dir, err := os.MkdirTemp("", "diskferry-verify")
		if err != nil {
			return "", nil, err
		}
		exp, err := qemu.Start(ctx, qemu.ExportOptions{
			Path: path, Socket: filepath.Join(dir, "nbd.sock"), Name: "verify", Connections: coverage.Readers,
			PidFile: filepath.Join(dir, "nbd.pid"), ReadOnly: true,
		})
		if err != nil {
			_ = os.RemoveAll(dir)
			return "", nil, err
		}
		return exp.URI(), func() {
			if err := exp.Stop(context.WithoutCancel(ctx), qemu.DefaultStopTimeout); err != nil {
				fmt.Fprintf(warn, "stop the export of %s (pid %d): %v\n", path, exp.PID, err)
			}
			_ = os.RemoveAll(dir)
		}, nil
	}
}
