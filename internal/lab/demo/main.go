// Command demo is `make demo`: it runs diskferry's main job on an embedded lab (Temporal dev
// server with its Web UI, vcsim, MariaDB, sshd, the hub and SNA workers), drives it with the
// diskferry CLI — a full backup, changed blocks, an incremental — verifies both restore
// points against the source, restores the incremental point into a new VM and compares its
// disks with the source at that snapshot, prints a summary and cleans up. DISKFERRY_DEMO_KEEP=1 keeps the
// lab up for browsing until Ctrl-C.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/internal/qemu"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/workflows"
)

const uiPort = 8233

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	keep := os.Getenv("DISKFERRY_DEMO_KEEP") == "1"
	binDir, err := filepath.Abs("bin")
	if err != nil {
		fail(err)
	}
	runner := lab.NewRunner(log)
	defer runner.Close()
	err = runner.Run(func() { demo(runner, binDir, keep) })
	if err != nil {
		runner.Close()
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "demo failed: %v\n", err)
	os.Exit(1)
}

func demo(r *lab.Runner, binDir string, keep bool) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	started := time.Now()
	step("starting the lab: Temporal dev server + Web UI, MariaDB, vcsim, sshd, hub and SNA workers")
	l := lab.Start(r, lab.Options{Disks: 2, DiskSize: 256 << 20, VMName: "demo-vm01", UIPort: uiPort, BinDir: binDir})
	fmt.Printf("   %s\n", l)

	cli := func(args ...string) []byte {
		cmd := exec.CommandContext(ctx, filepath.Join(binDir, "diskferry"), args...)
		cmd.Env = append(os.Environ(), "DISKFERRY_TEMPORAL_ADDRESS="+l.Temporal.HostPort, "DISKFERRY_TEMPORAL_NAMESPACE="+l.Temporal.Namespace)
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			r.Fatalf("diskferry %v: %v\nhub log:\n%s\nsna log:\n%s", args, err, l.WorkerLog("hub"), l.WorkerLog("sna"))
		}
		return out
	}
	backup := func(label string) (workflows.BackupResult, map[int32]string) {
		sources := saveSources(r, l)
		step(label + ": diskferry backup start --vm " + l.VC.VMName + " --site " + l.Site + " --wait --json")
		var res workflows.BackupResult
		if err := json.Unmarshal(cli("backup", "start", "--vm", l.VC.VMName, "--site", l.Site, "--wait", "--json"), &res); err != nil {
			r.Fatalf("decode backup result: %v", err)
		}
		for _, d := range res.Disks {
			fmt.Printf("   disk %d: %s, read %d MiB, wrote %d MiB, zeroed %d MiB in %s -> %s\n", d.Key, d.Mode,
				d.BytesRead>>20, d.BytesWritten>>20, d.BytesZeroed>>20, d.Duration.Round(time.Millisecond), d.Path)
		}
		return res, sources
	}

	full, atFull := backup("full backup")
	step("changing blocks on both disks (CBT records them)")
	for _, d := range l.VC.Disks {
		for _, off := range []int64{8 << 20, 100 << 20, 200 << 20} {
			if _, err := l.VC.WriteRandom(d.Key, off, 1<<20); err != nil {
				r.Fatalf("change blocks: %v", err)
			}
		}
	}
	incr, atIncr := backup("incremental backup")

	step("verifying every restore point against the source at its snapshot (qemu-img compare)")
	verify(ctx, r, full, atFull)
	verify(ctx, r, incr, atIncr)
	step("checking the incremental point against its block manifests, nothing written outside them (diskferry verify --manifest --image)")
	for _, d := range incr.Disks {
		exp := testenv.StartQemuNBD(r, d.Path, testenv.QemuNBDOptions{Args: []string{"--read-only"}})
		fmt.Printf("   disk %d: %s", d.Key, cli("verify", "--manifest", repo.ManifestPath(d.Path), "--image", d.Path, exp.URI))
	}
	os.Stdout.Write(cli("backup", "list", "--vm", l.VC.VMName))

	step("changing blocks again, so the VM no longer holds what the incremental point holds")
	for _, d := range l.VC.Disks {
		if _, err := l.VC.WriteRandom(d.Key, 8<<20, 4<<20); err != nil {
			r.Fatalf("change blocks: %v", err)
		}
	}
	step("restoring the incremental point into a new VM: diskferry restore new-vm --point " + incr.PointID + " --json")
	var restored workflows.RestoreResult
	if err := json.Unmarshal(cli("restore", "new-vm", "--point", incr.PointID, "--json"), &restored); err != nil {
		r.Fatalf("decode restore result: %v", err)
	}
	step("reading the new VM " + restored.VMName + "'s disks back through the datastore and comparing them with the source at the incremental snapshot")
	_, flats, err := l.VMDisks(ctx, restored.VMMoref, r.TempDir())
	if err != nil {
		r.Fatalf("read the restored VM's disks: %v", err)
	}
	for _, d := range restored.Disks {
		cmp, err := qemu.Compare(ctx, qemu.Raw(atIncr[d.PointKey]), qemu.Raw(flats[d.VMKey]))
		if err != nil {
			r.Fatalf("compare restored disk %d: %v", d.VMKey, err)
		}
		if !cmp.Equal {
			r.Fatalf("restored disk %d differs from the source at the incremental snapshot: %s", d.VMKey, cmp.Message)
		}
		fmt.Printf("   %s disk %d (from point disk %d, %d MiB in %s): identical to the source at the snapshot\n",
			restored.VMName, d.VMKey, d.PointKey, d.BytesRead>>20, d.Duration.Round(time.Millisecond))
	}

	fmt.Printf("\nWeb UI: http://127.0.0.1:%d/namespaces/default/workflows?query=VMName%%3D%%22%s%%22\n", uiPort, l.VC.VMName)
	fmt.Printf("demo passed in %s: full point %s, incremental point %s (parent %s), restored into VM %s\n",
		time.Since(started).Round(time.Second), full.PointID, incr.PointID, full.PointID, restored.VMName)
	if keep {
		fmt.Println("lab kept up (DISKFERRY_DEMO_KEEP=1); press Ctrl-C to stop it and clean up")
		<-ctx.Done()
	}
}

func step(msg string) { fmt.Printf("==> %s\n", msg) }

// saveSources copies each disk's flat file now: vcsim makes no delta disks, so the demo
// keeps the content as of the snapshot to verify against.
func saveSources(r *lab.Runner, l *lab.Lab) map[int32]string {
	dir := r.TempDir()
	out := map[int32]string{}
	for _, d := range l.VC.Disks {
		dst := filepath.Join(dir, filepath.Base(d.FlatPath))
		if err := copyFile(d.FlatPath, dst); err != nil {
			r.Fatalf("save source of disk %d: %v", d.Key, err)
		}
		out[d.Key] = dst
	}
	return out
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func verify(ctx context.Context, r *lab.Runner, res workflows.BackupResult, sources map[int32]string) {
	for _, d := range res.Disks {
		cmp, err := qemu.Compare(ctx, qemu.Raw(sources[d.Key]), qemu.QCOW2(d.Path))
		if err != nil {
			r.Fatalf("compare disk %d of point %s: %v", d.Key, res.PointID, err)
		}
		if !cmp.Equal {
			r.Fatalf("disk %d of point %s differs from the source: %s", d.Key, res.PointID, cmp.Message)
		}
		fmt.Printf("   point %s disk %d: identical to the source\n", res.PointID, d.Key)
	}
}
