package server

import (
	"context"
	"errors"
	"time"
)

// The stream path sends each operation to the HSM from the goroutine that
// handles the item, without a goroutine and a timer of its own to enforce
// the HSM timeout: that cost a few microseconds of CPU and two goroutine
// hand-offs per signature. One watchdog per gate finds the operations past
// the timeout instead and answers for them.

// errAnswered is what doInline returns when the watchdog has already given
// the caller its timeout: the caller must not answer again.
var errAnswered = errors.New("agent: answered by the watchdog")

// flight is an operation inside the HSM, in the gate's list of them (oldest
// first: all have the same timeout, so the oldest expires first).
type flight struct {
	deadline   time.Time
	timedOut   func(*gateError) // answers the caller at the timeout
	expired    bool             // the watchdog took it; guarded by gate.mu
	prev, next *flight
}

// doInline is do for a caller that can be answered through timedOut: op runs
// in the calling goroutine, and if it is still running at the timeout the
// watchdog calls timedOut (once, from its own goroutine) and doInline,
// when op finally returns, returns errAnswered. A caller gone while op runs
// is answered when op returns, with the abandoned error.
func (g *gate) doInline(ctx context.Context, uid int, op func() ([]byte, error), timedOut func(*gateError)) ([]byte, error) {
	if ge := g.admit(ctx, uid); ge != nil {
		return nil, ge
	}
	f := &flight{deadline: time.Now().Add(g.timeout), timedOut: timedOut}
	g.mu.Lock()
	g.watchOnce.Do(func() { go g.watch() })
	if g.newest == nil {
		g.oldest = f
	} else {
		g.newest.next, f.prev = f, g.newest
	}
	g.newest = f
	g.mu.Unlock()

	sig, err := op()

	g.mu.Lock()
	expired := f.expired
	if !expired {
		g.unlink(f)
	}
	g.mu.Unlock()
	g.free(uid)
	if expired {
		g.stuckEnds()
		return nil, errAnswered
	}
	if ctx.Err() != nil {
		return nil, abandoned(ctx)
	}
	return sig, err
}

// unlink removes f from the list; g.mu is held.
func (g *gate) unlink(f *flight) {
	if f.prev == nil {
		g.oldest = f.next
	} else {
		f.prev.next = f.next
	}
	if f.next == nil {
		g.newest = f.prev
	} else {
		f.next.prev = f.prev
	}
	f.prev, f.next = nil, nil
}

// watch answers the operations past the timeout. It sleeps until the oldest
// one's deadline, or for a whole timeout when none is in flight: one that
// starts later cannot expire sooner. So it wakes about once per timeout,
// not once per operation.
func (g *gate) watch() {
	timer := time.NewTimer(g.timeout)
	defer timer.Stop()
	for {
		now := time.Now()
		var expired []*flight
		wait := g.timeout
		g.mu.Lock()
		for f := g.oldest; f != nil; f = g.oldest {
			if d := f.deadline.Sub(now); d > 0 {
				wait = d
				break
			}
			g.unlink(f)
			f.expired = true
			expired = append(expired, f)
		}
		g.mu.Unlock()
		for _, f := range expired {
			g.stuckStarts()
			f.timedOut(g.timeoutError())
		}
		timer.Reset(wait)
		select {
		case <-timer.C:
		case <-g.stop:
			return
		}
	}
}

// close ends the watchdog; operations still in the HSM are no longer timed.
func (g *gate) close() { g.stopOnce.Do(func() { close(g.stop) }) }
