package limits_test

import (
	"context"
	"errors"
	"testing"

	"github.com/diskferry/diskferry/internal/limits"
)

func TestSlotsCapConcurrentHolders(t *testing.T) {
	s := limits.NewSlots(2)
	var releases []func()
	for i := range 2 {
		release, err := s.Acquire(t.Context(), func() { t.Errorf("copy %d waited with a free slot", i) })
		if err != nil {
			t.Fatal(err)
		}
		releases = append(releases, release)
	}
	if s.InUse() != 2 {
		t.Fatalf("%d slots in use, want 2", s.InUse())
	}

	waiting := make(chan struct{})
	got := make(chan error, 1)
	var third func()
	go func() {
		var err error
		third, err = s.Acquire(t.Context(), func() { close(waiting) })
		got <- err
	}()
	<-waiting // the third copy says it waits: both slots are held
	select {
	case err := <-got:
		t.Fatalf("the third copy got a slot while two were held (err %v)", err)
	default:
	}
	releases[0]()
	releases[0]() // released twice: must free one slot only
	if err := <-got; err != nil {
		t.Fatalf("third copy after a release: %v", err)
	}
	if s.InUse() != 2 {
		t.Fatalf("%d slots in use after one release and one take, want 2", s.InUse())
	}
	releases[1]()
	third()
	if s.InUse() != 0 {
		t.Fatalf("%d slots in use after every release, want 0", s.InUse())
	}
}

func TestSlotsWaitEndsWithItsContext(t *testing.T) {
	s := limits.NewSlots(1)
	release, err := s.Acquire(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	ctx, cancel := context.WithCancelCause(t.Context())
	cause := errors.New("backup cancelled")
	_, err = s.Acquire(ctx, func() { cancel(cause) })
	if !errors.Is(err, cause) {
		t.Fatalf("a cancelled wait returned %v, want its cause", err)
	}
	if s.InUse() != 1 {
		t.Fatalf("%d slots in use after a cancelled wait, want 1 (the wait took none)", s.InUse())
	}
}

func TestSlotsUnlimited(t *testing.T) {
	s := limits.NewSlots(0)
	for range 100 {
		if _, err := s.Acquire(t.Context(), func() { t.Fatal("unlimited slots made a copy wait") }); err != nil {
			t.Fatal(err)
		}
	}
	if s.Cap() != 0 {
		t.Fatalf("cap %d, want 0 (unlimited)", s.Cap())
	}
}
