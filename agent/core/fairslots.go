package core

import (
	"context"
	"slices"
	"sync"
)

// fairSlots hands out the HSM's sessions: at most max at once; the last
// reserve of them only to root and the agent's own user, so that their
// signatures get a session at once however many other callers wait; and
// when callers wait, a freed session goes to the uids in turn (one waiter
// of each uid per round, oldest first within a uid), so that one uid's
// backlog does not delay the others' signatures behind all of it.
type fairSlots struct {
	max, reserve int
	exempt       func(uid int) bool

	mu     sync.Mutex
	inUse  int
	queues map[int][]*slotWaiter // uids with waiters, oldest first
	ring   []int                 // those uids, in their turn
	next   int                   // index in ring of the next uid served
}

type slotWaiter struct {
	uid     int
	ready   chan struct{} // closed when granted
	granted bool
}

func newFairSlots(max int, exempt func(int) bool) *fairSlots {
	return &fairSlots{max: max, reserve: max / 8, exempt: exempt, queues: map[int][]*slotWaiter{}}
}

// fits reports whether uid may take a session now.
func (f *fairSlots) fits(uid int) bool {
	if f.exempt(uid) {
		return f.inUse < f.max
	}
	return f.inUse < f.max-f.reserve
}

// acquire waits for a session for uid until ctx ends.
func (f *fairSlots) acquire(ctx context.Context, uid int) error {
	f.mu.Lock()
	// Waiters exist only while none of them fits (release grants them
	// first), so a caller that fits now passes nobody who could go.
	if f.fits(uid) {
		f.inUse++
		f.mu.Unlock()
		return nil
	}
	w := &slotWaiter{uid: uid, ready: make(chan struct{})}
	if len(f.queues[uid]) == 0 {
		f.ring = append(f.ring, uid)
	}
	f.queues[uid] = append(f.queues[uid], w)
	f.mu.Unlock()
	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if w.granted { // granted as ctx ended: give it on
		f.inUse--
		f.grant()
	} else {
		f.remove(w)
	}
	return ctx.Err()
}

// tryAcquire takes a session for uid if one is free for it now.
func (f *fairSlots) tryAcquire(uid int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.fits(uid) { // waiters exist only while none fits: nobody is passed
		return false
	}
	f.inUse++
	return true
}

// release gives a session back and hands it on.
func (f *fairSlots) release() {
	f.mu.Lock()
	f.inUse--
	f.grant()
	f.mu.Unlock()
}

// grant hands free sessions to waiters, a uid at a time in turn.
func (f *fairSlots) grant() {
	for f.inUse < f.max && len(f.ring) > 0 {
		granted := false
		for i := range f.ring {
			idx := (f.next + i) % len(f.ring)
			uid := f.ring[idx]
			if !f.fits(uid) {
				continue
			}
			q := f.queues[uid]
			w := q[0]
			f.queues[uid] = q[1:]
			w.granted = true
			close(w.ready)
			f.inUse++
			if len(q) == 1 {
				f.dropUID(idx)
				f.next = idx // the uid after it has moved into idx
			} else {
				f.next = idx + 1
			}
			if f.next >= len(f.ring) {
				f.next = 0
			}
			granted = true
			break
		}
		if !granted {
			return // only callers the reserve keeps out are waiting
		}
	}
}

// remove takes a waiter whose caller left out of its queue.
func (f *fairSlots) remove(w *slotWaiter) {
	q := f.queues[w.uid]
	i := slices.Index(q, w)
	if i < 0 {
		return
	}
	f.queues[w.uid] = slices.Delete(q, i, i+1)
	if len(f.queues[w.uid]) == 0 {
		f.dropUID(slices.Index(f.ring, w.uid))
	}
}

func (f *fairSlots) dropUID(idx int) {
	uid := f.ring[idx]
	delete(f.queues, uid)
	f.ring = slices.Delete(f.ring, idx, idx+1)
	if idx < f.next {
		f.next--
	}
	if f.next >= len(f.ring) {
		f.next = 0
	}
}

// inFlight is the number of sessions in use.
func (f *fairSlots) inFlight() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.inUse
}

// waitersNow counts the callers waiting (for the tests).
func (f *fairSlots) waitersNow() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, q := range f.queues {
		n += len(q)
	}
	return n
}
