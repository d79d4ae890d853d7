package core

import (
	"sync"
	"testing"
	"time"
)

// TestWorkersReusedAndBounded: calls run in workers that stay for the next
// call, at most maxIdle of them once the calls have returned.
func TestWorkersReusedAndBounded(t *testing.T) {
	w := newWorkers(4)
	var wg sync.WaitGroup
	release := make(chan struct{})
	for range 16 {
		wg.Add(1)
		w.run(func() { defer wg.Done(); <-release })
	}
	if n := w.alive.Load(); n != 16 {
		t.Fatalf("%d workers for 16 calls in progress, want 16", n)
	}
	close(release)
	wg.Wait()
	deadline := time.Now().Add(5 * time.Second)
	for w.idle.Load() != 4 || w.alive.Load() != 4 {
		if time.Now().After(deadline) {
			t.Fatalf("after the calls: %d idle of %d workers; want 4 of 4", w.idle.Load(), w.alive.Load())
		}
		time.Sleep(time.Millisecond)
	}
	for range 100 {
		done := make(chan struct{})
		w.run(func() { close(done) })
		<-done
		for w.idle.Load() != 4 { // back in the pool
			time.Sleep(10 * time.Microsecond)
		}
	}
	if n := w.alive.Load(); n != 4 {
		t.Errorf("%d workers after 100 calls one at a time; the 4 idle ones should have taken them", n)
	}
}
