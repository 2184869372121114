package lab_test

import (
	"os"
	"sync"
	"testing"

	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/internal/testenv"
)

// workers are the hub and SNA worker binaries every lab of this package runs, built once:
// even from Go's build cache each build is a link of several seconds, and twenty labs each
// paid it twice.
var workers struct {
	once  sync.Once
	dir   string
	built bool
}

func TestMain(m *testing.M) {
	code := m.Run()
	if workers.dir != "" {
		_ = os.RemoveAll(workers.dir)
	}
	os.Exit(code)
}

// startLab is lab.Start on the package's worker binaries.
func startLab(t testenv.TB, opts lab.Options) *lab.Lab {
	t.Helper()
	workers.once.Do(func() {
		dir, err := os.MkdirTemp("", "diskferry-lab-bin-")
		if err != nil {
			t.Fatalf("lab: directory for the worker binaries: %v", err)
		}
		workers.dir = dir
		lab.Build(t, dir, "./workers/hub", "diskferry-hub")
		lab.Build(t, dir, "./workers/sna", "diskferry-sna")
		workers.built = true
	})
	if !workers.built {
		t.Fatalf("lab: the worker binaries did not build (see the first test that started a lab)")
	}
	opts.BinDir = workers.dir
	return lab.Start(t, opts)
}
