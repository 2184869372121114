package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/catalog"
	"github.com/diskferry/diskferry/internal/config"
	"github.com/diskferry/diskferry/internal/repo"
	"github.com/diskferry/diskferry/internal/testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.WithSharedMariaDB(m.Run)) }

func scrape(url string) (string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s", resp.Status, body)
	}
	return string(body), err
}

func TestRunServesMetricsAndStopsOnCancel(t *testing.T) {
	testenv.RequireCommand(t, "qemu-nbd")
	srv := testenv.StartTemporal(t)
	db := testenv.MariaDB(t)
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	cfg := config.Hub{
		Temporal:       config.Temporal{Address: srv.HostPort, Namespace: srv.Namespace},
		HubID:          "hub-test",
		DBDSN:          config.Secret(db.DSN),
		RepositoryRoot: filepath.Join(t.TempDir(), "repo"),
		RunDir:         filepath.Join(testenv.ShortTempDir(t), "run"),
		PortMin:        20100,
		PortMax:        20110,
		MetricsAddr:    metricsAddr,
		LogLevel:       slog.LevelWarn,
		Heartbeat:      time.Second,
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	}()

	// Both queues get pollers: the workers registered and started.
	for _, queue := range []string{activities.HubQueue, activities.HubHostQueue(cfg.HubID)} {
		require.Eventually(t, func() bool {
			resp, err := srv.Client.DescribeTaskQueue(ctx, queue, enumspb.TASK_QUEUE_TYPE_ACTIVITY)
			return err == nil && len(resp.GetPollers()) > 0
		}, 20*time.Second, 100*time.Millisecond, "no activity poller on %s", queue)
	}
	// The workflow poller starts on its own, possibly after the activity pollers.
	require.Eventually(t, func() bool {
		resp, err := srv.Client.DescribeTaskQueue(ctx, activities.HubQueue, enumspb.TASK_QUEUE_TYPE_WORKFLOW)
		return err == nil && len(resp.GetPollers()) > 0
	}, 20*time.Second, 100*time.Millisecond, "no workflow poller on %s", activities.HubQueue)

	var body string
	var err error
	require.Eventually(t, func() bool {
		body, err = scrape("http://" + metricsAddr + "/metrics")
		return err == nil && strings.Contains(body, "\ntemporal_")
	}, 20*time.Second, 200*time.Millisecond, "no temporal_ metrics: %v", err)
	for _, name := range []string{
		"diskferry_exports_running 0", "diskferry_port_leases 0", "diskferry_bytes_verified_total 0",
		"\ndiskferry_repository_free_bytes ", "\ndiskferry_repository_used_bytes ",
		"temporal_request_total{", "temporal_worker_start_total{",
	} {
		assert.Contains(t, body, name)
	}

	// The hub records itself at start and again at each heartbeat.
	store, err := catalog.Open(ctx, db.DSN, nil)
	require.NoError(t, err)
	defer store.Close()
	var first catalog.Hub
	require.Eventually(t, func() bool {
		first, err = findHub(ctx, store, cfg.HubID)
		return err == nil
	}, 20*time.Second, 100*time.Millisecond, "hub row: %v", err)
	assert.Positive(t, first.FreeBytes, "free bytes of the repository")
	assert.Positive(t, first.UsedBytes, "used bytes of the repository's file system")
	assert.False(t, first.LastSeen.IsZero())
	assert.Equal(t, catalog.PortRange{First: 20100, Last: 20110}, first.Ports)
	require.Eventually(t, func() bool {
		h, err := findHub(ctx, store, cfg.HubID)
		return err == nil && h.LastSeen.After(first.LastSeen)
	}, 20*time.Second, 100*time.Millisecond, "the heartbeat never refreshed last seen %s", first.LastSeen)

	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("run did not return after cancel")
	}
	_, err = scrape("http://" + metricsAddr + "/metrics")
	assert.Error(t, err, "the metrics endpoint is closed")
}

func findHub(ctx context.Context, store *catalog.Store, id string) (catalog.Hub, error) {
	hubs, err := store.ListHubs(ctx)
	if err != nil {
		return catalog.Hub{}, err
	}
	for _, h := range hubs {
		if h.ID == id && !h.LastSeen.IsZero() {
			return h, nil
		}
	}
	return catalog.Hub{}, fmt.Errorf("hub %s not seen in %v", id, hubs)
}

func TestSDKMetricsFamiliesWithDifferentTags(t *testing.T) {
	m := newSDKMetrics()
	h := m.Handler().WithTags(map[string]string{"namespace": "default"})
	h.Counter("temporal_request").Inc(2)
	h.WithTags(map[string]string{"operation": "Poll"}).Counter("temporal_request").Inc(3)
	h.Gauge("temporal-num.pollers").Update(4)
	h.Timer("temporal_activity_execution_latency").Record(30 * time.Millisecond)
	h.Timer("temporal_activity_execution_latency").Record(2 * time.Minute)

	registry := prometheus.NewRegistry()
	registry.MustRegister(m)
	families, err := registry.Gather()
	require.NoError(t, err)
	byName := map[string]int{}
	for _, f := range families {
		byName[f.GetName()] = len(f.GetMetric())
		switch f.GetName() {
		case "temporal_request_total":
			var total float64
			for _, metric := range f.GetMetric() {
				total += metric.GetCounter().GetValue()
				assert.Len(t, metric.GetLabel(), 2, "padded to the family's label names")
			}
			assert.Equal(t, 5.0, total)
		case "temporal_activity_execution_latency_seconds":
			hist := f.GetMetric()[0].GetHistogram()
			assert.Equal(t, uint64(2), hist.GetSampleCount())
			assert.InDelta(t, 120.03, hist.GetSampleSum(), 1e-9)
		}
	}
	assert.Equal(t, map[string]int{
		"temporal_request_total": 2, "temporal_num_pollers": 1, "temporal_activity_execution_latency_seconds": 1,
	}, byName)
}

// The repository gauges report the file system holding the repository, as statfs does.
func TestRepositoryGauges(t *testing.T) {
	testenv.Integration(t)
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=8m,mode=0700"); err != nil {
		testenv.Missing(t, "mount a tmpfs (needs root): %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	layout, err := repo.New(filepath.Join(dir, "repo"))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(layout.Root, "point"), make([]byte, 3<<20), 0o600))
	space, err := layout.Space()
	require.NoError(t, err)
	require.GreaterOrEqual(t, space.Used, int64(3<<20))

	log := slog.New(slog.DiscardHandler)
	registry := prometheus.NewRegistry()
	registry.MustRegister(
		repositoryGauge(log, layout, "diskferry_repository_free_bytes", "free", func(s repo.Space) int64 { return s.Free }),
		repositoryGauge(log, layout, "diskferry_repository_used_bytes", "used", func(s repo.Space) int64 { return s.Used }))
	families, err := registry.Gather()
	require.NoError(t, err)
	got := map[string]float64{}
	for _, f := range families {
		got[f.GetName()] = f.GetMetric()[0].GetGauge().GetValue()
	}
	assert.Equal(t, map[string]float64{
		"diskferry_repository_free_bytes": float64(space.Free),
		"diskferry_repository_used_bytes": float64(space.Used),
	}, got)
	assert.Equal(t, float64(8<<20), got["diskferry_repository_free_bytes"]+got["diskferry_repository_used_bytes"])
}
