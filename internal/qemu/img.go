// Package qemu wraps qemu-img (create, info, check, compare, map, convert) and supervises qemu-nbd
// exports of the hub's QCOW2 targets.
package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"github.com/diskferry/diskferry/internal/childenv"
)

const (
	qemuImg = "qemu-img"

	// FormatQCOW2 is the format of every target the hub writes.
	FormatQCOW2 = "qcow2"
	// FormatRaw is a plain disk image (test sources, flat files).
	FormatRaw = "raw"
)

var (
	// ErrImageLocked means another process (usually a qemu-nbd export) holds the image's write lock.
	ErrImageLocked = errors.New("image locked by another process")
	// ErrImageCorrupt means qemu-img check found corruptions or leaked clusters.
	ErrImageCorrupt = errors.New("image has corruptions or leaks")
)

// Image names a disk image and its format. An empty Format lets qemu-img probe it, which
// is unsafe for raw images whose content a guest controls; name the format where known.
type Image struct {
	Path   string
	Format string
}

// QCOW2 names a qcow2 image.
func QCOW2(path string) Image { return Image{Path: path, Format: FormatQCOW2} }

// Raw names a raw image.
func Raw(path string) Image { return Image{Path: path, Format: FormatRaw} }

// CreateImage creates an empty qcow2 of the given virtual size. It refuses to overwrite an
// existing file: qemu-img would silently replace a finished restore point.
func CreateImage(ctx context.Context, path string, virtualSize int64) error {
	if virtualSize <= 0 {
		return fmt.Errorf("create image %s: virtual size %d must be positive", path, virtualSize)
	}
	if err := createPrivate(path); err != nil {
		return fmt.Errorf("create image %s: %w", path, err)
	}
	if _, err := runImg(ctx, "create", "-q", "-f", FormatQCOW2, path, fmt.Sprint(virtualSize)); err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("create image %s: %w", path, err)
	}
	return nil
}

// CreateOverlay creates a qcow2 whose backing file is the qcow2 parent; it inherits the
// parent's virtual size. A relative parent is resolved by qemu against the overlay's directory.
func CreateOverlay(ctx context.Context, path, parent string) error {
	if parent == "" {
		return fmt.Errorf("create overlay %s: empty backing file", path)
	}
	if err := createPrivate(path); err != nil {
		return fmt.Errorf("create overlay %s: %w", path, err)
	}
	// -F is mandatory: without it qemu probes the backing format (and newer versions refuse).
	if _, err := runImg(ctx, "create", "-q", "-f", FormatQCOW2, "-b", parent, "-F", FormatQCOW2, path); err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("create overlay %s on %s: %w", path, parent, err)
	}
	return nil
}

// TargetMode is the mode of the images the hub creates: a restore point holds a VM's whole
// disk, so only the hub's user and group may read it (qemu-img alone would make it 0644).
const TargetMode fs.FileMode = 0o640

// createPrivate creates the empty file qemu-img then formats in place, so the image never
// exists with a wider mode. O_EXCL refuses any existing file or symlink there.
func createPrivate(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, TargetMode)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%w: refusing to overwrite", fs.ErrExist)
		}
		return err
	}
	if err := f.Close(); err != nil {
		_ = os.Remove(path)
		return err
	}
	return nil
}

// ImageInfo is the part of `qemu-img info` the hub uses.
type ImageInfo struct {
	Filename        string `json:"filename"`
	Format          string `json:"format"`
	VirtualSize     int64  `json:"virtual-size"`
	ActualSize      int64  `json:"actual-size"` // bytes allocated on the host file system
	ClusterSize     int64  `json:"cluster-size,omitempty"`
	BackingFile     string `json:"backing-filename,omitempty"`
	FullBackingFile string `json:"full-backing-filename,omitempty"`
	BackingFormat   string `json:"backing-filename-format,omitempty"`
	DirtyFlag       bool   `json:"dirty-flag"`
}

// Info reads an image's metadata. It passes -U (force share) so it also works on an image
// a qemu-nbd export holds open; the values are then a snapshot of a moving target.
func Info(ctx context.Context, path string) (ImageInfo, error) {
	out, err := runImg(ctx, "info", "-U", "--output=json", path)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("image info %s: %w", path, err)
	}
	info, err := decodeInfo(out)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("image info %s: %w", path, err)
	}
	return info, nil
}

func decodeInfo(out []byte) (ImageInfo, error) {
	var info ImageInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return ImageInfo{}, fmt.Errorf("decode: %w", err)
	}
	return info, nil
}

// CheckResult is `qemu-img check --output=json`.
type CheckResult struct {
	Filename           string `json:"filename"`
	Format             string `json:"format"`
	CheckErrors        int64  `json:"check-errors"`
	Corruptions        int64  `json:"corruptions"`
	Leaks              int64  `json:"leaks"`
	CorruptionsFixed   int64  `json:"corruptions-fixed"`
	LeaksFixed         int64  `json:"leaks-fixed"`
	ImageEndOffset     int64  `json:"image-end-offset"`
	TotalClusters      int64  `json:"total-clusters"`
	AllocatedClusters  int64  `json:"allocated-clusters"`
	FragmentedClusters int64  `json:"fragmented-clusters"`
	CompressedClusters int64  `json:"compressed-clusters"`
}

// Check runs a consistency check of a qcow2. The result is returned even when the image is
// damaged; the error then wraps ErrImageCorrupt. It does not force-share: checking an image
// that is still being written would report false damage.
func Check(ctx context.Context, path string) (CheckResult, error) {
	// Exit codes: 0 clean, 1 check failed to run, 2 corruptions, 3 leaks only. JSON comes on 0, 2, 3.
	out, runErr := runImg(ctx, "check", "--output=json", "-f", FormatQCOW2, path)
	var exit *exec.ExitError
	if runErr != nil && !(errors.As(runErr, &exit) && (exit.ExitCode() == 2 || exit.ExitCode() == 3)) {
		return CheckResult{}, fmt.Errorf("check image %s: %w", path, runErr)
	}
	var res CheckResult
	if err := json.Unmarshal(out, &res); err != nil {
		return CheckResult{}, fmt.Errorf("check image %s: decode: %w (%v)", path, err, runErr)
	}
	if res.Corruptions > 0 || res.Leaks > 0 || res.CheckErrors > 0 {
		return res, fmt.Errorf("check image %s: %w: %d corruptions, %d leaks, %d check errors",
			path, ErrImageCorrupt, res.Corruptions, res.Leaks, res.CheckErrors)
	}
	return res, nil
}

// CompareResult is the outcome of comparing two images' guest-visible content.
type CompareResult struct {
	Equal   bool
	Message string // qemu-img's verdict, e.g. "Content mismatch at offset 1048576!"
}

// Compare compares the guest-visible content of two images (an area beyond the shorter
// image must read as zeros). Both are opened with -U so served images can be compared.
func Compare(ctx context.Context, a, b Image) (CompareResult, error) {
	args := []string{"compare", "-U"}
	if a.Format != "" {
		args = append(args, "-f", a.Format)
	}
	if b.Format != "" {
		args = append(args, "-F", b.Format)
	}
	args = append(args, a.Path, b.Path)
	out, err := runImg(ctx, args...)
	msg := strings.TrimSpace(string(out))
	var exit *exec.ExitError
	switch {
	case err == nil:
		return CompareResult{Equal: true, Message: msg}, nil
	case errors.As(err, &exit) && exit.ExitCode() == 1:
		return CompareResult{Equal: false, Message: msg}, nil
	default:
		return CompareResult{}, fmt.Errorf("compare %s with %s: %w", a.Path, b.Path, err)
	}
}

// MapExtent is one entry of `qemu-img map --output=json`.
type MapExtent struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"` // 0: this image; n: the n-th backing file
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset,omitempty"` // host offset of allocated data
}

// Map lists an image's extents (allocation and zero status, through its backing chain).
func Map(ctx context.Context, img Image) ([]MapExtent, error) {
	args := []string{"map", "-U", "--output=json"}
	if img.Format != "" {
		args = append(args, "-f", img.Format)
	}
	out, err := runImg(ctx, append(args, img.Path)...)
	if err != nil {
		return nil, fmt.Errorf("map image %s: %w", img.Path, err)
	}
	var extents []MapExtent
	if err := json.Unmarshal(out, &extents); err != nil {
		return nil, fmt.Errorf("map image %s: decode: %w", img.Path, err)
	}
	return extents, nil
}

// MapLayer lists the extents of a qcow2's own layer: its backing file is not opened, so an
// extent is Present exactly where this image allocates clusters (Data for data clusters,
// Zero without Data for zero clusters) and everything else is absent. It does not force-share:
// an image some process is writing fails with ErrImageLocked instead of giving a moving map.
func MapLayer(ctx context.Context, path string) ([]MapExtent, error) {
	// backing: null is how qemu opens an overlay on its own; the json: filename is the one
	// command-line spelling of it that qemu-img map accepts.
	spec, err := json.Marshal(map[string]any{
		"driver":  FormatQCOW2,
		"backing": nil,
		"file":    map[string]string{"driver": "file", "filename": path},
	})
	if err != nil {
		return nil, fmt.Errorf("map layer of %s: %w", path, err)
	}
	out, err := runImg(ctx, "map", "--output=json", "json:"+string(spec))
	if err != nil {
		return nil, fmt.Errorf("map layer of %s: %w", path, err)
	}
	var extents []MapExtent
	if err := json.Unmarshal(out, &extents); err != nil {
		return nil, fmt.Errorf("map layer of %s: decode: %w", path, err)
	}
	return extents, nil
}

// runImg runs qemu-img and returns its stdout. A failure carries stderr and, for a lock
// conflict, wraps ErrImageLocked; the *exec.ExitError stays reachable with errors.As.
func runImg(ctx context.Context, args ...string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, qemuImg, args...)
	cmd.Env = childenv.Environ()
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	err := cmd.Run()
	if err == nil {
		return stdout.Bytes(), nil
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return stdout.Bytes(), fmt.Errorf("%s %s: %w", qemuImg, args[0], ctxErr)
	}
	return stdout.Bytes(), imgError(args[0], stderr.String(), err)
}

// imgError is a failed qemu-img command's error: stderr, ErrImageLocked for a lock
// conflict, syscall.ENOSPC for a full disk, and the *exec.ExitError.
func imgError(command, stderr string, err error) error {
	msg := strings.TrimSpace(stderr)
	if isLockError(msg) {
		return fmt.Errorf("%s %s: %w: %s (%w)", qemuImg, command, ErrImageLocked, msg, err)
	}
	// A full disk must read as ENOSPC to callers (no retry can fix it); qemu-img only says it.
	if strings.Contains(strings.ToLower(msg), syscall.ENOSPC.Error()) {
		return fmt.Errorf("%s %s: %s (%w, %w)", qemuImg, command, msg, syscall.ENOSPC, err)
	}
	return fmt.Errorf("%s %s: %s (%w)", qemuImg, command, msg, err)
}

func isLockError(stderr string) bool {
	return strings.Contains(stderr, `"write" lock`)
}
