package lab

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
)

// Runner lets a program (the demo) use the test helpers that start real parts: it collects
// their cleanups and turns a fatal report into an error returned by Run.
type Runner struct {
	log *slog.Logger

	mu       sync.Mutex
	cleanups []func()
	failed   bool
}

// NewRunner returns a runner logging to log.
func NewRunner(log *slog.Logger) *Runner { return &Runner{log: log} }

// runnerAbort carries a fatal report up to Run.
type runnerAbort struct{ msg string }

// Run calls f and returns the first fatal report it made as an error. Cleanups stay
// registered until Close.
func (r *Runner) Run(f func()) (err error) {
	defer func() {
		if v := recover(); v != nil {
			abort, ok := v.(runnerAbort)
			if !ok {
				panic(v)
			}
			err = errors.New(abort.msg)
		}
	}()
	f()
	return nil
}

// Close runs the cleanups, newest first.
func (r *Runner) Close() {
	r.mu.Lock()
	cleanups := r.cleanups
	r.cleanups = nil
	r.mu.Unlock()
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
}

func (r *Runner) Helper() {}

func (r *Runner) Cleanup(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cleanups = append(r.cleanups, f)
}

func (r *Runner) Errorf(format string, args ...any) {
	r.mu.Lock()
	r.failed = true
	r.mu.Unlock()
	r.log.Error(fmt.Sprintf(format, args...))
}

func (r *Runner) Fatalf(format string, args ...any) {
	r.mu.Lock()
	r.failed = true
	r.mu.Unlock()
	panic(runnerAbort{msg: fmt.Sprintf(format, args...)})
}

// Skipf means a part is missing: for a program that is as fatal as any other failure.
func (r *Runner) Skipf(format string, args ...any) { r.Fatalf(format, args...) }

func (r *Runner) Skip(args ...any) { r.Fatalf("%s", fmt.Sprint(args...)) }

func (r *Runner) Logf(format string, args ...any) { r.log.Debug(fmt.Sprintf(format, args...)) }

func (r *Runner) TempDir() string {
	dir, err := os.MkdirTemp("", "diskferry-lab")
	if err != nil {
		r.Fatalf("temp dir: %v", err)
	}
	r.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (r *Runner) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

func (r *Runner) Name() string { return "diskferry-lab" }
