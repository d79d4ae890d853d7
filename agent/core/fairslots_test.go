package core

import (
	"context"
	"slices"
	"testing"
	"time"
)

// TestFairSlotsTurnsAndReserve: with every session taken, freed sessions go
// to the waiting uids in turn, oldest first within a uid, whatever the order
// they queued in; the reserve (max/8) is taken only by exempt uids, and an
// exempt caller takes a reserved session at once while others wait.
func TestFairSlotsTurnsAndReserve(t *testing.T) {
	f := newFairSlots(8, func(uid int) bool { return uid == 0 })
	ctx := context.Background()
	for range 7 {
		if err := f.acquire(ctx, 1000); err != nil {
			t.Fatal(err)
		}
	}
	// uid 1000 is at max-reserve: its next one waits, root's gets the reserve.
	granted := make(chan int, 16)
	queue := func(uid int) {
		before := f.waitersNow()
		go func() { f.acquire(ctx, uid); granted <- uid }()
		for f.waitersNow() == before {
			time.Sleep(time.Millisecond)
		}
	}
	queue(1000)
	if err := f.acquire(ctx, 0); err != nil || f.inFlight() != 8 {
		t.Fatalf("root with others waiting: %v, %d in use; want the reserved session at once", err, f.inFlight())
	}
	for _, uid := range []int{1000, 1000, 1000, 1001, 1002} {
		queue(uid)
	}
	// Root's session given back is a reserved one: nobody waiting may take it.
	f.release()
	select {
	case uid := <-granted:
		t.Fatalf("uid %d took a reserved session", uid)
	case <-time.After(100 * time.Millisecond):
	}
	var got []int
	for range 6 {
		f.release() // one of uid 1000's first seven
		select {
		case uid := <-granted:
			got = append(got, uid)
		case <-time.After(5 * time.Second):
			t.Fatalf("no waiter granted after a release; granted so far %v", got)
		}
	}
	want := []int{1000, 1001, 1002, 1000, 1000, 1000} // queued 1000 x4, 1001, 1002
	if !slices.Equal(got, want) {
		t.Fatalf("granted in the order %v; want %v (uids in turn)", got, want)
	}
}

// TestFairSlotsCancelled: a waiter whose caller leaves is removed and its
// turn given to the others; the counts come back to zero.
func TestFairSlotsCancelled(t *testing.T) {
	f := newFairSlots(1, func(int) bool { return false })
	if err := f.acquire(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- f.acquire(ctx, 2) }()
	for f.waitersNow() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-errc; err == nil {
		t.Fatal("a cancelled waiter got a session")
	}
	f.release()
	if f.inFlight() != 0 || f.waitersNow() != 0 || len(f.ring) != 0 {
		t.Errorf("after release: %d in use, %d waiting, ring %v; want none", f.inFlight(), f.waitersNow(), f.ring)
	}
}
