package lab_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/workflows"
)

// BenchmarkBackupEndToEnd times full backups of a 2×64 MiB-disk VM through the real workers,
// tunnel, exports and catalog, from workflow start to result (target: at most 5 s each on
// the dev server). `make bench` runs it.
func BenchmarkBackupEndToEnd(b *testing.B) {
	l := startLab(b, lab.Options{Disks: 2, DiskSize: 64 << 20})
	in := workflows.BackupInput{VM: l.VC.VMName, Site: l.Site, Mode: "full"}
	ctx := context.Background()
	var total time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		run, err := l.Temporal.Client.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
		if err != nil {
			b.Fatal(err)
		}
		if err := run.Get(ctx, nil); err != nil {
			b.Fatalf("backup: %v\n%s", err, tail(l.WorkerLog("sna")))
		}
		total += time.Since(start)
	}
	b.StopTimer()
	secs := total.Seconds() / float64(b.N)
	b.ReportMetric(secs, "s/backup")
	fmt.Printf("bench e2e-backup-2x64MiB seconds=%.2f target<=5 runs=%d\n", secs, b.N)
}

// BenchmarkConcurrent20 times 20 full backups of 2×64 MiB-disk VMs started at once, 10 per
// site on two sites, into two hubs: the wall time from the first start to the last result,
// and the median and 95th percentile of each backup's time from its start to its result.
// `make bench` runs it once.
func BenchmarkConcurrent20(b *testing.B) {
	const vms = 20
	l := startLab(b, lab.Options{VMs: vms, Sites: 2, Hubs: 2, Disks: 2, DiskSize: 64 << 20})
	ctx := context.Background()
	var wall time.Duration
	var each []time.Duration
	perHub := map[string]int{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		took := make([]time.Duration, vms)
		errs := make([]error, vms)
		results := make([]workflows.BackupResult, vms)
		var wg sync.WaitGroup
		for v, vm := range l.VC.VMs {
			in := workflows.BackupInput{VM: vm.Name, Site: l.Sites[v%len(l.Sites)].Name, Mode: "full"}
			wg.Add(1)
			go func() {
				defer wg.Done()
				begin := time.Now()
				run, err := l.Temporal.Client.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
				if err == nil {
					err = run.Get(ctx, &results[v])
				}
				took[v], errs[v] = time.Since(begin), err
			}()
		}
		wg.Wait()
		wall += time.Since(start)
		for v, err := range errs {
			if err != nil {
				b.Fatalf("backup of %s: %v\n%s", l.VC.VMs[v].Name, err, workerLogs(l))
			}
		}
		each = append(each, took...)
		for _, res := range results {
			perHub[res.HubID]++
		}
	}
	b.StopTimer()
	slices.Sort(each)
	p50, p95 := percentile(each, 50), percentile(each, 95)
	secs := wall.Seconds() / float64(b.N)
	b.ReportMetric(secs, "s/wall")
	b.ReportMetric(p50.Seconds(), "s/p50")
	b.ReportMetric(p95.Seconds(), "s/p95")
	var placed []string
	for _, h := range l.Hubs {
		placed = append(placed, fmt.Sprintf("%s:%d", h.ID, perHub[h.ID]))
	}
	fmt.Printf("bench concurrent20 vms=%d disks=2x64MiB sites=2 hubs=2 wall=%.1fs p50=%.1fs p95=%.1fs points=%s runs=%d\n",
		vms, secs, p50.Seconds(), p95.Seconds(), strings.Join(placed, ","), b.N)
}

// percentile is the p-th percentile of sorted durations (nearest rank).
func percentile(sorted []time.Duration, p int) time.Duration {
	rank := (p*len(sorted) + 99) / 100
	return sorted[max(rank, 1)-1]
}
