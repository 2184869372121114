package lab_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/workflows"
)

// BenchmarkBackupEndToEnd times full backups of a 2×64 MiB-disk VM through the real workers,
// tunnel, exports and catalog, from workflow start to result (target: at most 5 s each on
// the dev server). `make bench` runs it.
func BenchmarkBackupEndToEnd(b *testing.B) {
	l := lab.Start(b, lab.Options{Disks: 2, DiskSize: 64 << 20})
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
