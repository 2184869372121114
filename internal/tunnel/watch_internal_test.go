package tunnel

import (
	"context"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// endedConn is an SSH connection that has already ended.
type endedConn struct{ ssh.Conn }

func (endedConn) Wait() error  { return nil }
func (endedConn) Close() error { return nil }

// A Close that runs after watch decided to redial but before it started the reconnect: watch
// used to see the cancelled context and return, leaking the WaitGroup slot it had taken for
// the reconnect, and Close then waited for it forever.
func TestCloseDuringConnectionLossReturns(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		cfg:      Config{Addr: "127.0.0.1:22", KeepaliveInterval: time.Second, DialTimeout: time.Second, MaxBackoff: time.Second},
		log:      slog.New(slog.DiscardHandler),
		ctx:      ctx,
		cancel:   cancel,
		slots:    []*slot{{}},
		forwards: map[int]*forward{1: {spec: Forward{Port: 1, Remote: "/run/nonexistent.sock"}, listener: l, conns: map[*pipe]struct{}{}}},
	}
	chans := make(chan ssh.NewChannel)
	reqs := make(chan *ssh.Request)
	close(chans)
	close(reqs)
	client := ssh.NewClient(endedConn{}, chans, reqs)

	cancel() // as Close does once watch has read closed == false
	m.wg.Add(1)
	m.watch(m.slots[0], &sshConn{Client: client}, new(atomic.Uint64))

	done := make(chan struct{})
	go func() {
		_ = m.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("Close did not return: a reconnect slot leaked")
	}
}
