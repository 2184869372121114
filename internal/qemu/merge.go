package qemu

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"time"
)

// DefaultMergeStall is how long a commit or rebase may report no progress before it is
// killed: qemu-img reports every 1%, so half an hour without a report is a hung process
// (a dead NFS mount, a stuck disk), not a slow one.
const DefaultMergeStall = 30 * time.Minute

// MergeOptions tunes Commit and Rebase.
type MergeOptions struct {
	// OnProgress is called with qemu-img's percentage (0-100) as it advances; optional.
	OnProgress func(percent float64)
	// Stall ends qemu-img when it reports no progress for that long; zero is DefaultMergeStall.
	Stall time.Duration
}

func (o MergeOptions) stall() time.Duration {
	if o.Stall > 0 {
		return o.Stall
	}
	return DefaultMergeStall
}

// Commit writes the guest-visible content of the qcow2 top, through its backing chain down
// to base, into base: afterwards base reads as top did. base must be in top's backing chain;
// empty base means top's immediate backing file. top is left as it was (-d): it still reads
// the same through base, so a kept point built on top never sees a moment where it differs,
// and a killed commit can simply run again. Files between base and top read garbage after a
// commit to a deeper base; only files nobody keeps may lie there.
func Commit(ctx context.Context, top, base string, opts MergeOptions) error {
	args := []string{"commit", "-p", "-d", "-f", FormatQCOW2}
	if base != "" {
		args = append(args, "-b", base)
	}
	if _, err := runImgProgress(ctx, opts.OnProgress, opts.stall(), append(args, top)...); err != nil {
		return fmt.Errorf("commit %s into %s: %w", top, displayBase(base), err)
	}
	return nil
}

// Rebase makes the qcow2 path back onto backing (a qcow2), or onto nothing when backing is
// empty (a flatten), keeping its guest-visible content: qemu-img copies into path every
// cluster where the old and the new backing chain differ before it rewrites the header, so
// path reads the same at every instant and a killed rebase can simply run again.
//
// The copy runs writethrough (-t): with qemu-img's default writeback cache the new header
// can reach the file while the L2 entries of the copied clusters are still only in the
// killed process's memory, and path then reads its new backing where the old one differed.
func Rebase(ctx context.Context, path, backing string, opts MergeOptions) error {
	args := []string{"rebase", "-p", "-t", "writethrough", "-f", FormatQCOW2, "-b", backing}
	if backing != "" {
		args = append(args, "-F", FormatQCOW2)
	}
	if _, err := runImgProgress(ctx, opts.OnProgress, opts.stall(), append(args, path)...); err != nil {
		return fmt.Errorf("rebase %s onto %s: %w", path, displayBase(backing), err)
	}
	return nil
}

// Flatten makes the qcow2 path standalone, copying into it what its backing chain provides.
func Flatten(ctx context.Context, path string, opts MergeOptions) error {
	return Rebase(ctx, path, "", opts)
}

// RebaseUnsafe rewrites only the backing file name in path's header (-u). It is correct only
// when backing reads exactly as the current backing file does, e.g. after that file was
// committed into backing.
func RebaseUnsafe(ctx context.Context, path, backing string) error {
	if backing == "" {
		return fmt.Errorf("unsafe rebase of %s: empty backing file", path)
	}
	if _, err := runImg(ctx, "rebase", "-u", "-f", FormatQCOW2, "-b", backing, "-F", FormatQCOW2, path); err != nil {
		return fmt.Errorf("unsafe rebase of %s onto %s: %w", path, backing, err)
	}
	return nil
}

// BackingFile is the backing file path's header names, resolved against its directory, or
// "" for a standalone image.
func BackingFile(ctx context.Context, path string) (string, error) {
	out, err := runImg(ctx, "info", "--output=json", "-f", FormatQCOW2, path)
	if err != nil {
		return "", fmt.Errorf("backing file of %s: %w", path, err)
	}
	info, err := decodeInfo(out)
	if err != nil {
		return "", fmt.Errorf("backing file of %s: %w", path, err)
	}
	if info.FullBackingFile != "" {
		return info.FullBackingFile, nil
	}
	return info.BackingFile, nil
}

func displayBase(base string) string {
	if base == "" {
		return "its backing file"
	}
	return base
}

// RepairLeaks frees the clusters a killed qemu-img allocated in the qcow2 path but never
// referenced (`qemu-img check -r leaks`): wasted space, harmless to the content, which a
// merge run again would otherwise leave behind. It repairs nothing else; corruption is an
// error wrapping ErrImageCorrupt.
func RepairLeaks(ctx context.Context, path string) error {
	// Exit codes: 0 clean after repair, 1 check failed to run, 2 corruptions, 3 leaks left.
	_, err := runImg(ctx, "check", "-q", "-r", "leaks", "-f", FormatQCOW2, path)
	var exit *exec.ExitError
	if errors.As(err, &exit) && (exit.ExitCode() == 2 || exit.ExitCode() == 3) {
		return fmt.Errorf("repair leaks of %s: %w: %v", path, ErrImageCorrupt, err)
	}
	if err != nil {
		return fmt.Errorf("repair leaks of %s: %w", path, err)
	}
	return nil
}
