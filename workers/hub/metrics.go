package main

import (
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.temporal.io/sdk/client"
)

// sdkMetrics exposes the Temporal SDK's metrics to Prometheus. The SDK picks names and tag
// sets at run time, and one name may come with different tags (the worker's, an activity's),
// which fixed prometheus vectors refuse; so each series is kept as it comes and Collect pads
// every family to the union of its label names. Counters get "_total" and timers become
// histograms in seconds, as Prometheus names them.
type sdkMetrics struct {
	mu     sync.Mutex
	series map[string]*series // by kind, name and tags
}

type metricKind int

const (
	kindCounter metricKind = iota
	kindGauge
	kindTimer
)

type series struct {
	kind    metricKind
	name    string
	labels  map[string]string
	value   float64  // counter, gauge
	count   uint64   // timer
	sum     float64  // timer, seconds
	buckets []uint64 // timer, per upper bound of timerBuckets (not cumulative)
}

// timerBuckets are the histogram bounds in seconds: SDK latencies run from milliseconds
// (polls, requests) to minutes (long activities).
var timerBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300}

func newSDKMetrics() *sdkMetrics { return &sdkMetrics{series: map[string]*series{}} }

// Handler is the client.MetricsHandler to give client.Options.
func (m *sdkMetrics) Handler() client.MetricsHandler { return metricsHandler{m: m} }

func (m *sdkMetrics) get(kind metricKind, name string, tags map[string]string) *series {
	name = promName(name)
	switch kind {
	case kindCounter:
		name = strings.TrimSuffix(name, "_total") + "_total"
	case kindTimer:
		name += "_seconds"
	}
	labels := make(map[string]string, len(tags))
	for k, v := range tags {
		labels[promName(k)] = v
	}
	var key strings.Builder
	key.WriteString(name)
	key.WriteByte(byte('0' + kind))
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		key.WriteString("\x00" + k + "\x00" + labels[k])
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.series[key.String()]
	if !ok {
		s = &series{kind: kind, name: name, labels: labels}
		if kind == kindTimer {
			s.buckets = make([]uint64, len(timerBuckets))
		}
		m.series[key.String()] = s
	}
	return s
}

// promName maps a name onto Prometheus' [a-zA-Z_:][a-zA-Z0-9_:]*.
func promName(s string) string {
	b := []byte(s)
	for i, c := range b {
		ok := c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || (i > 0 && c >= '0' && c <= '9')
		if !ok {
			b[i] = '_'
		}
	}
	if len(b) == 0 {
		return "_"
	}
	return string(b)
}

// Describe sends nothing: the set of series is only known at run time (an unchecked collector).
func (m *sdkMetrics) Describe(chan<- *prometheus.Desc) {}

// Collect sends every series, each family with one set of label names.
func (m *sdkMetrics) Collect(ch chan<- prometheus.Metric) {
	m.mu.Lock()
	defer m.mu.Unlock()
	families := map[string][]*series{}
	for _, s := range m.series {
		families[s.name] = append(families[s.name], s)
	}
	for name, members := range families {
		labelSet := map[string]bool{}
		for _, s := range members {
			for k := range s.labels {
				labelSet[k] = true
			}
		}
		labelNames := slices.Sorted(maps.Keys(labelSet))
		desc := prometheus.NewDesc(name, "Temporal SDK metric "+name+".", labelNames, nil)
		for _, s := range members {
			values := make([]string, len(labelNames))
			for i, k := range labelNames {
				values[i] = s.labels[k]
			}
			switch s.kind {
			case kindCounter:
				ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, s.value, values...)
			case kindGauge:
				ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, s.value, values...)
			case kindTimer:
				cumulative := make(map[float64]uint64, len(timerBuckets))
				var n uint64
				for i, bound := range timerBuckets {
					n += s.buckets[i]
					cumulative[bound] = n
				}
				ch <- prometheus.MustNewConstHistogram(desc, s.count, s.sum, cumulative, values...)
			}
		}
	}
}

func (m *sdkMetrics) add(s *series, v float64) {
	m.mu.Lock()
	s.value += v
	m.mu.Unlock()
}

func (m *sdkMetrics) set(s *series, v float64) {
	m.mu.Lock()
	s.value = v
	m.mu.Unlock()
}

func (m *sdkMetrics) observe(s *series, d time.Duration) {
	secs := d.Seconds()
	m.mu.Lock()
	defer m.mu.Unlock()
	s.count++
	s.sum += secs
	if i, _ := slices.BinarySearch(timerBuckets, secs); i < len(timerBuckets) {
		s.buckets[i]++
	}
}

// metricsHandler is the SDK's view of sdkMetrics with a set of tags.
type metricsHandler struct {
	m    *sdkMetrics
	tags map[string]string
}

func (h metricsHandler) WithTags(tags map[string]string) client.MetricsHandler {
	merged := maps.Clone(h.tags)
	if merged == nil {
		merged = map[string]string{}
	}
	maps.Copy(merged, tags)
	return metricsHandler{m: h.m, tags: merged}
}

func (h metricsHandler) Counter(name string) client.MetricsCounter {
	return counter{h.m, h.m.get(kindCounter, name, h.tags)}
}

func (h metricsHandler) Gauge(name string) client.MetricsGauge {
	return gauge{h.m, h.m.get(kindGauge, name, h.tags)}
}

func (h metricsHandler) Timer(name string) client.MetricsTimer {
	return timer{h.m, h.m.get(kindTimer, name, h.tags)}
}

type counter struct {
	m *sdkMetrics
	s *series
}

func (c counter) Inc(n int64) { c.m.add(c.s, float64(n)) }

type gauge struct {
	m *sdkMetrics
	s *series
}

func (g gauge) Update(v float64) { g.m.set(g.s, v) }

type timer struct {
	m *sdkMetrics
	s *series
}

func (t timer) Record(d time.Duration) { t.m.observe(t.s, d) }
