package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/diskferry/diskferry/internal/blockcopy"
)

type verifyFlags struct {
	manifest    string
	connections int
	verbose     bool
}

func newVerifyCommand() *cobra.Command {
	var f verifyFlags
	cmd := &cobra.Command{
		Use:   "verify URI --manifest FILE",
		Short: "Check an NBD export against the manifest of a copy, naming the blocks that differ",
		Long: `Read an NBD export over the blocks a manifest lists (written by diskferry copy
--manifest) and compare each block's SHA-256. Exits non-zero when a block differs, listing
the first 100.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runVerify(cmd, args[0], f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.manifest, "manifest", "", "the manifest file (required)")
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
	if v.Mismatches == 0 {
		fmt.Fprintf(out, "verified %d blocks (%d bytes): all match\n", v.Blocks, v.Bytes)
		return nil
	}
	for _, e := range v.First {
		fmt.Fprintf(out, "differs: offset %d length %d\n", e.Start, e.Length)
	}
	return fmt.Errorf("verify: %d of %d blocks differ", v.Mismatches, v.Blocks)
}
