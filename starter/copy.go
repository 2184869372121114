package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/config"
)

type copyFlags struct {
	connections       int
	requestSize       config.ByteSize
	changedAreas      string
	destinationIsZero bool
	digest            bool
	manifest          string
	verbose           bool
}

func newCopyCommand() *cobra.Command {
	var f copyFlags
	cmd := &cobra.Command{
		Use:   "copy SOURCE TARGET",
		Short: "Copy one NBD export to another (allocated extents only, zeros as zero requests)",
		Long: `Copy a disk between two NBD exports.

URIs: nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH,
nbds://USER@HOST:PORT/EXPORT?tls-psk-file=PATH (TLS with a pre-shared key file).
Without --changed-areas the whole disk is copied, reading only the source's allocated
extents; holes and all-zero blocks become zero requests on the target.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runCopy(cmd, args[0], args[1], f)
		},
	}
	fl := cmd.Flags()
	fl.IntVar(&f.connections, "connections", blockcopy.DefaultConnections, "connections per side (one where the server lacks multi-conn)")
	f.requestSize = blockcopy.DefaultRequestSize
	fl.Var(&f.requestSize, "request-size", "bytes per read/write request, a multiple of 1 MiB (at most 2MiB from vCenter)")
	fl.StringVar(&f.changedAreas, "changed-areas", "", `JSON file with the areas to copy: [{"start":N,"length":N}, ...]`)
	fl.BoolVar(&f.destinationIsZero, "destination-is-zero", false, "the target reads as zeros already: skip zero requests")
	fl.BoolVar(&f.digest, "digest", false, "also compute the SHA-256 digest a backup records (per 1 MiB block) and print it")
	fl.StringVar(&f.manifest, "manifest", "", "write the SHA-256 of every 1 MiB block to this new file (see diskferry verify)")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log the copy's steps to stderr")
	return cmd
}

func runCopy(cmd *cobra.Command, src, dst string, f copyFlags) error {
	opts := blockcopy.Options{
		Connections:       f.connections,
		RequestSize:       int64(f.requestSize),
		DestinationIsZero: f.destinationIsZero,
		SkipDigest:        !f.digest,
		Logger:            stderrLogger(cmd, f.verbose),
	}
	if f.changedAreas != "" {
		areas, err := readAreas(f.changedAreas)
		if err != nil {
			return err
		}
		opts.Areas = areas
	}
	var bar *progressbar.ProgressBar
	if isTerminal(cmd.OutOrStdout()) || isTerminal(cmd.ErrOrStderr()) {
		opts.ProgressInterval = 200 * time.Millisecond
		opts.OnProgress = func(p blockcopy.Progress) {
			if bar == nil {
				bar = progressbar.NewOptions64(p.BytesTotal, progressbar.OptionSetWriter(cmd.ErrOrStderr()),
					progressbar.OptionShowBytes(true), progressbar.OptionSetDescription("copy"),
					progressbar.OptionThrottle(200*time.Millisecond), progressbar.OptionClearOnFinish())
			}
			_ = bar.Set64(p.BytesDone)
		}
	}
	var manifest *manifestFile
	if f.manifest != "" {
		m, err := createManifest(f.manifest, blockcopy.DefaultBlockSize)
		if err != nil {
			return err
		}
		manifest = m
		opts.SkipDigest = false
		opts.OnBlock = m.Add
	}
	res, err := copyDisk(cmd, src, dst, opts)
	if bar != nil {
		_ = bar.Finish()
	}
	if manifest != nil {
		if err != nil {
			manifest.Discard()
		} else if err := manifest.Close(); err != nil {
			manifest.Discard()
			return fmt.Errorf("copy: the target is complete, but the manifest is not: %w", err)
		}
	}
	if err != nil {
		if res != nil {
			fmt.Fprintf(cmd.ErrOrStderr(), "copy stopped at checkpoint %d (%d of %d bytes done)\n",
				res.Checkpoint.Offset, res.BytesDone, res.BytesTotal)
		}
		return fmt.Errorf("copy: %w", err)
	}
	secs := res.Duration.Seconds()
	fmt.Fprintf(cmd.OutOrStdout(), "copied %d bytes in %.2fs: read %d, written %d, zeroed %d bytes, %.1f MB/s\n",
		res.BytesDone, secs, res.BytesRead, res.BytesWritten, res.BytesZeroed, float64(res.BytesDone)/1e6/max(secs, 1e-9))
	if f.digest {
		fmt.Fprintf(cmd.OutOrStdout(), "digest sha256-of-%d-byte-block-sha256s %s\n", res.BlockSize, res.Digest)
	}
	return nil
}

// stderrLogger logs warnings to stderr, and the steps too when verbose.
func stderrLogger(cmd *cobra.Command, verbose bool) *slog.Logger {
	level := slog.LevelWarn
	if verbose {
		level = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: level}))
}

// manifestFile is a manifest written to a new file while copying; it is removed when the
// copy fails, so a manifest on disk always describes a finished copy.
type manifestFile struct {
	*blockcopy.ManifestWriter
	f *os.File
}

func createManifest(path string, blockSize int64) (*manifestFile, error) {
	f, err := os.OpenFile(filepath.Clean(path), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create manifest: %w", err)
	}
	w, err := blockcopy.NewManifestWriter(f, blockSize)
	if err != nil {
		_ = f.Close()
		_ = os.Remove(f.Name())
		return nil, err
	}
	return &manifestFile{ManifestWriter: w, f: f}, nil
}

// Close makes the manifest durable.
func (m *manifestFile) Close() error {
	if err := m.Flush(); err != nil {
		return err
	}
	if err := m.f.Sync(); err != nil {
		return fmt.Errorf("sync manifest: %w", err)
	}
	if err := m.f.Close(); err != nil {
		return fmt.Errorf("close manifest: %w", err)
	}
	return nil
}

// Discard removes an unfinished manifest.
func (m *manifestFile) Discard() {
	_ = m.f.Close()
	_ = os.Remove(m.f.Name())
}

func copyDisk(cmd *cobra.Command, src, dst string, opts blockcopy.Options) (*blockcopy.Result, error) {
	c, err := blockcopy.New(src, dst, opts)
	if err != nil {
		return nil, err
	}
	return c.Run(cmd.Context())
}

// readAreas loads a changed-areas file.
func readAreas(path string) ([]blockcopy.Extent, error) {
	data, err := os.ReadFile(filepath.Clean(path))
	if err != nil {
		return nil, fmt.Errorf("read changed areas: %w", err)
	}
	var areas []blockcopy.Extent
	if err := json.Unmarshal(data, &areas); err != nil {
		return nil, fmt.Errorf("parse changed areas %s: %w", path, err)
	}
	if areas == nil {
		return nil, errors.New("changed areas file holds no array")
	}
	return areas, nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}
