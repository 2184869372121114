package limits_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/diskferry/diskferry/internal/blockcopy"
	"github.com/diskferry/diskferry/internal/limits"
	"github.com/diskferry/diskferry/internal/testenv"
)

const (
	benchLimit     = 50_000_000 / 8 // 50 Mbit/s in bytes
	benchOneCopy   = 96 << 20       // about 16 s at the limit
	benchShareCopy = 48 << 20       // each of two: about 16 s together at the limit
	wanTargetPort  = 10809
)

// BenchmarkBandwidthWAN measures the bandwidth limits on the emulated 100 Mbit/20 ms WAN
// link of internal/testenv: the copy engine reads random data from nbdkit on the SNA side
// and writes it across the link into an in-memory nbdkit on the hub side (a relay on each
// end carries the NBD connections over the link's TCP). Cases: an unlimited copy (what
// the link gives), one copy under a 50 Mbit limit (target: within 5 % of 50 Mbit), and
// two copies of different jobs under one 50 Mbit site limit (each about half, their sum
// within 5 % of 50 Mbit); and, to tell the limiter from the link, one limited copy without
// the link. Rates count the payload written from a copy's first data write to its end
// ("writing"; connecting over the link, block status and the final flush add a few
// hundred milliseconds that "run" includes).
//
//	sudo go test -run '^$' -bench '^BenchmarkBandwidthWAN$' -benchtime 1x ./internal/limits
func BenchmarkBandwidthWAN(b *testing.B) {
	// nbdkit --exit-with-parent dies with the OS thread that started it, and the link's
	// dials end the threads they switch into a namespace: one of those may be a thread
	// that had started an nbdkit. Started from this locked thread, they live as long as
	// the benchmark.
	runtime.LockOSThread()
	link := testenv.StartWANLink(b, testenv.WANOptions{})
	dir := testenv.ShortTempDir(b)
	hubAddr := net.JoinHostPort(testenv.WANHubIP, strconv.Itoa(wanTargetPort))
	listener, err := link.Listen(link.HubNS, hubAddr)
	if err != nil {
		b.Fatal(err)
	}

	// One in-memory target per copy, each behind its own relay socket on the SNA side;
	// the hub-side relay picks the target by the first byte the SNA-side relay sends.
	targets := make([]string, 2)
	for i := range targets {
		targets[i] = filepath.Join(dir, fmt.Sprintf("target%d.sock", i))
		testenv.StartNbdkitSocket(b, targets[i], "memory", testenv.NbdkitOptions{Params: []string{"size=" + strconv.Itoa(benchOneCopy)}})
	}
	relay(b, listener, func(c net.Conn) (net.Conn, error) {
		var which [1]byte
		if _, err := io.ReadFull(c, which[:]); err != nil || int(which[0]) >= len(targets) {
			return nil, fmt.Errorf("relay: bad target selector (%v)", err)
		}
		return net.Dial("unix", targets[which[0]])
	})
	snaSockets := make([]string, len(targets))
	for i := range targets {
		snaSockets[i] = filepath.Join(dir, fmt.Sprintf("sna%d.sock", i))
		l, err := net.Listen("unix", snaSockets[i])
		if err != nil {
			b.Fatal(err)
		}
		relay(b, l, func(net.Conn) (net.Conn, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			up, err := link.DialContext(ctx, link.SNANS, hubAddr)
			if err != nil {
				return nil, err
			}
			if _, err := up.Write([]byte{byte(i)}); err != nil {
				up.Close()
				return nil, err
			}
			return up, nil
		})
	}
	source := func(size int64) string {
		sock := filepath.Join(dir, fmt.Sprintf("src-%d-%d.sock", size, time.Now().UnixNano()))
		return testenv.StartNbdkitSocket(b, sock, "random", testenv.NbdkitOptions{Params: []string{"size=" + strconv.FormatInt(size, 10)}}).URI
	}
	// copyOnce returns the payload rate over the whole run (connect and final flush
	// included) and from the first data write on; target -1: the hub's first target
	// directly, without the link.
	copyOnce := func(src string, target int, throttle blockcopy.Throttle) (whole, writing float64, firstWrite time.Time) {
		first := &firstCall{}
		opts := blockcopy.Options{SkipDigest: true, Throttle: first}
		first.next = throttle
		dst := "nbd+unix:///?socket=" + targets[0]
		if target >= 0 {
			dst = "nbd+unix:///?socket=" + snaSockets[target]
		}
		cp, err := blockcopy.New(src, dst, opts)
		if err != nil {
			b.Fatal(err)
		}
		res, err := cp.Run(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		return float64(res.BytesWritten) / res.Duration.Seconds(), float64(res.BytesWritten) / time.Since(first.at()).Seconds(), first.at()
	}
	mbit := func(bytesPerSec float64) float64 { return bytesPerSec * 8 / 1e6 }
	srcOne, srcA, srcB := source(benchOneCopy), source(benchShareCopy), source(benchShareCopy)

	b.ResetTimer()
	for range b.N {
		unlimited, _, _ := copyOnce(srcOne, 0, nil)
		fmt.Printf("bench bandwidth unlimited link=100Mbit rtt=20ms copy=%.1fMbit/s (the link without a limit)\n", mbit(unlimited))

		local, localWriting, _ := copyOnce(srcOne, -1, limits.Pacer{limits.NewLimit(benchLimit)})
		fmt.Printf("bench bandwidth local-copy limit=50Mbit run=%.2fMbit/s writing=%.2fMbit/s ratio=%.3f (the limiter alone, no link)\n",
			mbit(local), mbit(localWriting), localWriting/benchLimit)

		_, dropsBefore := link.Dropped()
		one, oneWriting, _ := copyOnce(srcOne, 0, limits.Pacer{limits.NewLimit(benchLimit)})
		_, drops := link.Dropped()
		fmt.Printf("bench bandwidth one-copy limit=50Mbit run=%.2fMbit/s writing=%.2fMbit/s ratio=%.3f target=0.95..1.05 drops=%d\n",
			mbit(one), mbit(oneWriting), oneWriting/benchLimit, drops-dropsBefore)

		// Two jobs, each with a job limit above the link, under one site limit.
		site := limits.NewLimit(benchLimit)
		var jobs limits.Jobs
		rates := make([]float64, 2)
		firsts := make([]time.Time, 2)
		var wg sync.WaitGroup
		dropsBefore = drops
		for i, src := range []string{srcA, srcB} {
			job, release := jobs.Acquire(fmt.Sprintf("job-%d", i), 1_000_000_000/8)
			wg.Go(func() {
				defer release()
				_, rates[i], firsts[i] = copyOnce(src, i, limits.Pacer{job, site})
			})
		}
		wg.Wait()
		// From the first data write of either to the end of both.
		began := firsts[0]
		if firsts[1].Before(began) {
			began = firsts[1]
		}
		sum := float64(2*benchShareCopy) / time.Since(began).Seconds()
		_, drops = link.Dropped()
		fmt.Printf("bench bandwidth two-copies site-limit=50Mbit a=%.2fMbit/s b=%.2fMbit/s sum=%.2fMbit/s ratio=%.3f target=0.95..1.05 share-a=%.2f target~0.5 drops=%d\n",
			mbit(rates[0]), mbit(rates[1]), mbit(sum), sum/benchLimit, rates[0]/(rates[0]+rates[1]), drops-dropsBefore)
	}
	b.StopTimer()
	hubToSNA, snaToHub := link.Dropped()
	b.ReportMetric(float64(snaToHub+hubToSNA), "drops")
}

// firstCall notes when the first data write asked to go, then defers to next (nil: no limit).
type firstCall struct {
	once  sync.Once
	first time.Time
	next  blockcopy.Throttle
}

func (f *firstCall) WaitN(ctx context.Context, n int) error {
	f.once.Do(func() { f.first = time.Now() })
	if f.next == nil {
		return nil
	}
	return f.next.WaitN(ctx, n)
}

func (f *firstCall) at() time.Time {
	f.once.Do(func() { f.first = time.Now() })
	return f.first
}

// relay serves each connection of l by copying both ways to the connection dial returns.
func relay(b *testing.B, l net.Listener, dial func(net.Conn) (net.Conn, error)) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	track := func(c net.Conn) {
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
	}
	b.Cleanup(func() {
		l.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			down, err := l.Accept()
			if err != nil {
				return
			}
			track(down)
			wg.Go(func() {
				defer down.Close()
				up, err := dial(down)
				if err != nil {
					b.Log(err)
					return
				}
				track(up)
				defer up.Close()
				var pair sync.WaitGroup
				pair.Go(func() {
					_, _ = io.Copy(up, down)
					if cw, ok := up.(interface{ CloseWrite() error }); ok {
						_ = cw.CloseWrite()
					}
				})
				_, _ = io.Copy(down, up)
				if cw, ok := down.(interface{ CloseWrite() error }); ok {
					_ = cw.CloseWrite()
				}
				pair.Wait()
			})
		}
	})
}
