package qemu

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/diskferry/diskferry/internal/childenv"
)

// FormatVMDK is VMware's disk format; Convert writes it streamOptimized (StreamOptimized).
const FormatVMDK = "vmdk"

// StreamOptimized is the vmdk subformat vSphere imports (compressed, no sparse grain tables).
const StreamOptimized = "subformat=streamOptimized"

// ErrStalled means qemu-img reported no progress for ConvertOptions.StallTimeout.
var ErrStalled = errors.New("qemu-img made no progress")

// ConvertOptions tunes Convert.
type ConvertOptions struct {
	// Options are the output format's -o options, e.g. StreamOptimized.
	Options string
	// OnProgress is called with qemu-img's percentage (0-100) as it advances; optional.
	OnProgress func(percent float64)
	// StallTimeout ends the conversion when qemu-img reports no progress for that long
	// (it reports every 1%); zero waits as long as ctx allows.
	StallTimeout time.Duration
}

// Convert writes the guest-visible content of src (through its backing chain) to dst as a
// standalone image of dst.Format. Both formats must be given: probing a guest-controlled raw
// image is unsafe. dst is created, or truncated when it exists, keeping its mode. qemu-img
// converts with cache=unsafe, so the caller syncs dst before trusting it.
func Convert(ctx context.Context, src, dst Image, opts ConvertOptions) error {
	if src.Format == "" || dst.Format == "" {
		return fmt.Errorf("convert %s to %s: both formats must be named", src.Path, dst.Path)
	}
	args := []string{"convert", "-p", "-f", src.Format, "-O", dst.Format}
	if opts.Options != "" {
		args = append(args, "-o", opts.Options)
	}
	args = append(args, src.Path, dst.Path)
	if _, err := runImgProgress(ctx, opts.OnProgress, opts.StallTimeout, args...); err != nil {
		return fmt.Errorf("convert %s to %s %s: %w", src.Path, dst.Format, dst.Path, err)
	}
	return nil
}

// CompareProgress is Compare reporting qemu-img's percentage as it reads, and bounded by
// stall like Convert.
func CompareProgress(ctx context.Context, a, b Image, onProgress func(percent float64), stall time.Duration) (CompareResult, error) {
	args := []string{"compare", "-p", "-U"}
	if a.Format != "" {
		args = append(args, "-f", a.Format)
	}
	if b.Format != "" {
		args = append(args, "-F", b.Format)
	}
	args = append(args, a.Path, b.Path)
	out, err := runImgProgress(ctx, onProgress, stall, args...)
	msg := strings.TrimSpace(out)
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

// progressLine is what qemu-img -p prints, each ended by '\r': "    (12.34/100%)".
var progressLine = regexp.MustCompile(`^\s*\((\d+(?:\.\d+)?)/100%\)\s*$`)

// runImgProgress runs qemu-img with -p among args, passes each percentage to onProgress and
// returns the rest of stdout. Without progress for stall (when positive) qemu-img is killed
// and the error wraps ErrStalled. Errors are classified as runImg's.
func runImgProgress(ctx context.Context, onProgress func(float64), stall time.Duration, args ...string) (string, error) {
	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var stderr bytes.Buffer
	cmd := exec.CommandContext(runCtx, qemuImg, args...)
	cmd.Env = childenv.Environ()
	cmd.Stderr = &stderr
	// qemu-img must not outlive a worker killed mid-conversion, writing on for nobody.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", qemuImg, args[0], err)
	}
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("%s %s: %w", qemuImg, args[0], err)
	}
	progressed := make(chan struct{}, 1)
	var rest strings.Builder
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		readProgress(stdout, &rest, func(p float64) {
			if onProgress != nil {
				onProgress(p)
			}
			select {
			case progressed <- struct{}{}:
			default:
			}
		})
	}()
	if stall > 0 {
		go watchStall(runCtx, cancel, progressed, stall)
	}
	<-readDone
	err = cmd.Wait()
	if err == nil {
		return rest.String(), nil
	}
	if cause := context.Cause(runCtx); errors.Is(cause, ErrStalled) && ctx.Err() == nil {
		return rest.String(), fmt.Errorf("%s %s: %w", qemuImg, args[0], cause)
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return rest.String(), fmt.Errorf("%s %s: %w", qemuImg, args[0], ctxErr)
	}
	return rest.String(), imgError(args[0], stderr.String(), err)
}

// readProgress splits qemu-img's stdout at '\r' and '\n', reporting progress lines and
// keeping the others.
func readProgress(r io.Reader, rest *strings.Builder, report func(float64)) {
	sc := bufio.NewScanner(r)
	sc.Split(func(data []byte, atEOF bool) (int, []byte, error) {
		if i := bytes.IndexAny(data, "\r\n"); i >= 0 {
			return i + 1, data[:i], nil
		}
		if atEOF && len(data) > 0 {
			return len(data), data, nil
		}
		return 0, nil, nil
	})
	for sc.Scan() {
		line := sc.Text()
		if m := progressLine.FindStringSubmatch(line); m != nil {
			if p, err := strconv.ParseFloat(m[1], 64); err == nil {
				report(p)
				continue
			}
		}
		if strings.TrimSpace(line) != "" {
			rest.WriteString(line)
			rest.WriteByte('\n')
		}
	}
	// A scanner error (a line longer than its buffer) leaves the rest unread: drain it so
	// qemu-img never blocks on a full pipe.
	_, _ = io.Copy(io.Discard, r)
}

// watchStall cancels with ErrStalled when nothing arrives on progressed for stall.
func watchStall(ctx context.Context, cancel context.CancelCauseFunc, progressed <-chan struct{}, stall time.Duration) {
	timer := time.NewTimer(stall)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-progressed:
			timer.Reset(stall)
		case <-timer.C:
			cancel(fmt.Errorf("%w for %s", ErrStalled, stall))
			return
		}
	}
}
