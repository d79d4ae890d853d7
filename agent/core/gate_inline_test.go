package core

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"
)

// TestInlineTimeoutAsOpReturns: an operation run inline (gate.do with late)
// that returns just as the HSM timeout fires leaves health SERVING and the
// stuck count at 0: the timer's NOT_SERVING, however slow to take effect,
// comes before the operation's return undoes it, never after.
func TestInlineTimeoutAsOpReturns(t *testing.T) {
	var mu sync.Mutex
	var calls []bool // setHealth's calls, in the order they took effect
	inFalse := make(chan struct{})
	trueSet := make(chan struct{})
	setHealth := func(serving bool) {
		if !serving {
			close(inFalse)
			// A NOT_SERVING slow to take effect: until the operation's
			// return has turned health back, or a while.
			select {
			case <-trueSet:
			case <-time.After(300 * time.Millisecond):
			}
		}
		mu.Lock()
		calls = append(calls, serving)
		mu.Unlock()
		if serving {
			close(trueSet)
		}
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	g := newGate(1, 1, 1, 20*time.Millisecond, log, newLimitLog(log), setHealth)
	answered := make(chan *gateError, 1)
	op := func() ([]byte, error) {
		<-inFalse // returns as the timeout is being taken
		return []byte("sig"), nil
	}
	_, err := g.do(context.Background(), 1000, op, func(ge *gateError) { answered <- ge })
	if err != errAnswered {
		t.Errorf("do returned %v; want errAnswered after the timeout's answer", err)
	}
	if ge := <-answered; ge.outcome != Timeout {
		t.Errorf("late answer %v; want the timeout", ge)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		n := len(calls)
		mu.Unlock()
		if n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("setHealth called %d times; want 2", n)
		}
		time.Sleep(time.Millisecond)
	}
	if calls[0] != false || calls[1] != true {
		t.Errorf("health set %v in that order; want [false true]: SERVING once the operation returned", calls)
	}
	if n := g.stuck.Load(); n != 0 {
		t.Errorf("stuck count %d after the operation returned; want 0", n)
	}
	if g.slots.inFlight() != 0 || len(g.byUID) != 0 {
		t.Errorf("slot or uid count not given back: %d slots, %v", g.slots.inFlight(), g.byUID)
	}
}
