package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestSilenceCountsOnlyUnansweredQuietIntervals(t *testing.T) {
	s := silence{countMax: 3}
	steps := []struct {
		inbound  uint64
		awaiting bool
		dead     bool
	}{
		{0, false, false}, // idle, nothing asked: no evidence either way
		{0, false, false},
		{0, true, false}, // asked, silent: 1
		{0, true, false}, // 2
		{5, true, false}, // bytes arrived (data or the reply): the count starts over
		{5, true, false}, // 1
		{5, true, false}, // 2
		{5, true, true},  // 3 silent intervals with a keepalive waiting: dead
	}
	for i, step := range steps {
		if got := s.tick(step.inbound, step.awaiting); got != step.dead {
			t.Fatalf("tick %d (inbound %d, awaiting %v): dead = %v, want %v", i+1, step.inbound, step.awaiting, got, step.dead)
		}
	}
}

// fakeRequester stands in for the SSH connection: each keepalive request is announced on
// asked and answered with whatever the test sends on answer.
type fakeRequester struct {
	asked  chan struct{}
	answer chan error
	calls  atomic.Int32
}

func newFakeRequester() *fakeRequester {
	return &fakeRequester{asked: make(chan struct{}, 16), answer: make(chan error)}
}

func (f *fakeRequester) SendRequest(name string, wantReply bool, _ []byte) (bool, []byte, error) {
	if name != "keepalive@openssh.com" || !wantReply {
		return false, nil, errors.New("unexpected request " + name)
	}
	f.calls.Add(1)
	f.asked <- struct{}{}
	err := <-f.answer
	return false, nil, err
}

// keepaliveRun drives Manager.keepalive with explicit ticks.
type keepaliveRun struct {
	t       *testing.T
	ticks   chan time.Time
	ended   chan error
	inbound *atomic.Uint64
	reason  chan string
}

func startKeepalive(t *testing.T, countMax int, client requester) *keepaliveRun {
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		cfg:    Config{KeepaliveInterval: time.Second, KeepaliveCountMax: countMax},
		log:    slog.New(slog.DiscardHandler),
		ctx:    ctx,
		cancel: cancel,
	}
	r := &keepaliveRun{t: t, ticks: make(chan time.Time), ended: make(chan error, 1), inbound: new(atomic.Uint64), reason: make(chan string, 1)}
	go func() { r.reason <- m.keepalive(client, r.inbound, r.ticks, r.ended) }()
	t.Cleanup(func() {
		cancel()
		r.result()
	})
	return r
}

// tick delivers one interval's end; the keepalive must still be running to take it.
func (r *keepaliveRun) tick(what string) {
	r.t.Helper()
	select {
	case r.ticks <- time.Now():
	case reason := <-r.reason:
		r.reason <- reason
		r.t.Fatalf("%s: keepalive already stopped: %s", what, reason)
	}
}

// tryTick delivers one interval's end and reports true, or false once the keepalive has
// stopped.
func (r *keepaliveRun) tryTick() bool {
	select {
	case r.ticks <- time.Now():
		return true
	case reason := <-r.reason:
		r.reason <- reason
		return false
	}
}

func (r *keepaliveRun) result() string {
	r.t.Helper()
	select {
	case reason := <-r.reason:
		r.reason <- reason
		return reason
	case <-time.After(time.Minute):
		r.t.Fatal("keepalive did not stop")
		return ""
	}
}

// The counting itself, tick by tick: data in an interval resets it, silent intervals count
// only while a keepalive waits for its reply, and exactly KeepaliveCountMax of them in a row
// declare the connection dead.
func TestSilenceCountsOnlySilentIntervalsAwaitingReply(t *testing.T) {
	s := silence{countMax: 3}
	var inbound uint64
	for i := range 20 {
		inbound++
		if s.tick(inbound, true) {
			t.Fatalf("busy interval %d declared dead", i+1)
		}
	}
	for i := range 10 {
		if s.tick(inbound, false) {
			t.Fatalf("silent interval %d without a keepalive waiting declared dead", i+1)
		}
	}
	for i := range 2 {
		if s.tick(inbound, true) {
			t.Fatalf("silent interval %d of 3 declared dead", i+1)
		}
	}
	inbound++
	if s.tick(inbound, true) {
		t.Fatal("data after two silent intervals declared dead")
	}
	for i := range 3 {
		if dead := s.tick(inbound, true); dead != (i == 2) {
			t.Fatalf("silent interval %d of 3: dead %t", i+1, dead)
		}
	}
}

// A connection on which nothing ever arrives is declared dead after exactly
// KeepaliveCountMax intervals of its keepalive waiting.
func TestKeepaliveDropsSilentConnection(t *testing.T) {
	const countMax = 3
	hub := newFakeRequester()
	r := startKeepalive(t, countMax, hub)
	r.tick("first interval") // sends the keepalive
	<-hub.asked
	for i := range countMax - 1 {
		r.tick(fmt.Sprintf("silent interval %d", i+1))
	}
	r.tick("last silent interval")
	reason := r.result()
	if !strings.Contains(reason, "keepalive unanswered and nothing received from the hub for 3 intervals") {
		t.Fatalf("keepalive stopped with %q, want the silence named", reason)
	}
	close(hub.answer) // releases the request left waiting
}

// A keepalive reply queued behind data takes many intervals; the data arriving meanwhile
// proves the connection alive, with only one keepalive outstanding. Once the data stops too,
// the connection is declared dead. (The loop reads the counter some time after it took a
// tick, so a read may already hold the next interval's data and the following tick then
// sees none: the death may come one tick late, never early — the exact count is
// TestSilenceCountsOnlySilentIntervalsAwaitingReply's.)
func TestKeepaliveKeepsBusyConnectionAndDropsSilentOne(t *testing.T) {
	const countMax = 3
	hub := newFakeRequester()
	r := startKeepalive(t, countMax, hub)

	for i := range 20 {
		r.inbound.Add(1) // data arrived during this interval
		r.tick(fmt.Sprintf("busy interval %d", i+1))
	}
	<-hub.asked
	if got := hub.calls.Load(); got != 1 {
		t.Fatalf("%d keepalives outstanding at once, want 1", got)
	}

	silent := 0
	for r.tryTick() {
		silent++
		if silent > countMax+1 {
			t.Fatalf("still alive after %d silent intervals", silent)
		}
	}
	reason := r.result()
	if !strings.Contains(reason, "keepalive unanswered and nothing received from the hub for 3 intervals") {
		t.Fatalf("keepalive stopped with %q, want the silence named", reason)
	}
	close(hub.answer) // releases the request left waiting
}

func TestKeepaliveStopsOnFailedRequest(t *testing.T) {
	hub := newFakeRequester()
	r := startKeepalive(t, 3, hub)
	r.tick("first interval")
	<-hub.asked
	hub.answer <- errors.New("connection lost")
	if reason := r.result(); reason != "keepalive: connection lost" {
		t.Fatalf("keepalive stopped with %q, want the request's error", reason)
	}
}
