package core

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// gate admits operations into the key store: at most maxInFlight at once
// (the HSM's sessions, handed out fairly across uids with a reserve for
// root and the agent's user: fairSlots), at most maxWaiting queued behind them, at most
// perUID of one uid waiting or in flight (so that one caller cannot fill the
// queue and starve the others), none for a caller that has gone, and none
// while an operation is stuck in the HSM past the timeout. It is the only
// place that waits for the HSM.
type gate struct {
	slots      *fairSlots
	waiting    atomic.Int64
	maxWaiting int64
	perUID     int
	timeout    time.Duration
	stuck      atomic.Int64 // operations past the timeout, still inside the HSM
	log        *slog.Logger
	limits     *limitLog
	setHealth  func(serving bool)
	failures   sampler // "signing failed" lines: HSM errors other than the gate's

	mu    sync.Mutex
	byUID map[int]int // operations waiting or in the HSM, per uid
}

func newGate(maxInFlight, maxWaiting, perUID int, timeout time.Duration, log *slog.Logger, limits *limitLog, setHealth func(bool)) *gate {
	return &gate{slots: newFairSlots(maxInFlight, privileged), maxWaiting: int64(maxWaiting), perUID: perUID, timeout: timeout,
		log: log, limits: limits, setHealth: setHealth, byUID: make(map[int]int), failures: sampler{interval: time.Second}}
}

// enter counts an operation of uid unless uid has its share already.
func (g *gate) enter(uid int) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.byUID[uid] >= g.perUID {
		return false
	}
	g.byUID[uid]++
	return true
}

func (g *gate) leave(uid int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.byUID[uid]--; g.byUID[uid] <= 0 {
		delete(g.byUID, uid)
	}
}

// gateError is a refusal or failure decided by the agent (the gate, the
// access check, the audit trail) with its outcome.
type gateError struct {
	outcome Outcome
	msg     string
}

func (e *gateError) Error() string { return e.msg }

// withID is the error as the caller of request rid gets it.
func (e *gateError) withID(rid string) *Error {
	return &Error{Code: e.outcome.Code(), Msg: e.msg, RequestID: rid}
}

type signResult struct {
	sig []byte
	err error
}

// errAnswered is what do returns, once op has returned, for an operation
// whose caller already had the gate's timeout through late.
var errAnswered = errors.New("agent: answered at the HSM timeout")

// do runs op for uid when the HSM may take it. op's own error is returned
// as is; the gate's refusals and failures are *gateError.
//
// With late nil, op runs in a goroutine of its own and do returns at the
// timeout or when ctx ends, whichever comes first. With late set, op runs in
// the calling goroutine, which saves two goroutine switches per signature:
// at the timeout late gets the gate's error at once, and do returns
// errAnswered when op has returned.
func (g *gate) do(ctx context.Context, uid int, op func() ([]byte, error), late func(*gateError)) ([]byte, error) {
	free, err := g.admit(ctx, uid)
	if err != nil {
		return nil, err
	}
	if late != nil {
		return g.inline(ctx, op, free, late)
	}
	done := make(chan signResult, 1)
	go func() {
		sig, err := op()
		done <- signResult{sig, err}
	}()
	timer := time.NewTimer(g.timeout)
	defer timer.Stop()
	select {
	case r := <-done:
		free()
		return r.sig, r.err
	case <-ctx.Done():
		go func() { <-done; free() }()
		return nil, abandoned(ctx)
	case <-timer.C:
		g.enterStuck()
		go func() {
			<-done
			free()
			g.leaveStuck()
		}()
		return nil, g.timedOut()
	}
}

func (g *gate) inline(ctx context.Context, op func() ([]byte, error), free func(), late func(*gateError)) ([]byte, error) {
	// settled by op's return or by the timeout, whichever comes first. The
	// timeout enters the stuck count under mu, so that op's return, should
	// it come meanwhile, leaves it only after: never below zero, and health
	// turned back to SERVING after NOT_SERVING, not before.
	var mu sync.Mutex
	settled := false
	timer := time.AfterFunc(g.timeout, func() {
		mu.Lock()
		if settled {
			mu.Unlock()
			return
		}
		settled = true
		g.enterStuck()
		mu.Unlock()
		late(g.timedOut())
	})
	sig, err := op()
	mu.Lock()
	timedOut := settled
	settled = true
	mu.Unlock()
	if timedOut {
		free()
		g.leaveStuck()
		return nil, errAnswered
	}
	timer.Stop()
	free()
	if ctx.Err() != nil { // nobody to take the signature
		return nil, abandoned(ctx)
	}
	return sig, err
}

// admit waits for an HSM slot for uid; free gives it back.
func (g *gate) admit(ctx context.Context, uid int) (free func(), err error) {
	if n := g.stuck.Load(); n > 0 {
		return nil, &gateError{HSMDown, fmt.Sprintf(
			"agent: the HSM is not answering (%d operation(s) stuck for more than %v); failing fast until it recovers", n, g.timeout)}
	}
	if !g.enter(uid) {
		g.limits.hit("signatures per uid", uid, g.perUID)
		return nil, &gateError{CallerBusy, fmt.Sprintf(
			"agent: uid %d already has %d signatures waiting for the HSM or in it; try again later", uid, g.perUID)}
	}
	// The uid's place is given back with the HSM slot: an operation its
	// caller abandoned still occupies the HSM until it returns.
	free = func() { g.free(uid) }
	if g.waiting.Add(1) > g.maxWaiting {
		g.waiting.Add(-1)
		g.leave(uid)
		g.limits.hit("signatures waiting", -1, int(g.maxWaiting))
		return nil, &gateError{Busy, fmt.Sprintf(
			"agent: %d signatures are already waiting for the HSM; try again later", g.maxWaiting)}
	}
	if err := g.slots.acquire(ctx, uid); err != nil {
		g.waiting.Add(-1)
		g.leave(uid)
		return nil, abandoned(ctx)
	}
	g.waiting.Add(-1)
	if ctx.Err() != nil { // gone while we took the slot: never send it to the HSM
		free()
		return nil, abandoned(ctx)
	}
	return free, nil
}

// tryAdmit takes an HSM slot for uid if it may have one without waiting;
// g.free(uid) gives it back. Whatever would wait or be refused is left to
// admit, which answers it.
func (g *gate) tryAdmit(uid int) bool {
	if g.stuck.Load() > 0 || !g.enter(uid) {
		return false
	}
	if !g.slots.tryAcquire(uid) {
		g.leave(uid)
		return false
	}
	return true
}

func (g *gate) free(uid int) { g.slots.release(); g.leave(uid) }

func (g *gate) timedOut() *gateError {
	return &gateError{Timeout, fmt.Sprintf("agent: the HSM did not answer within %v", g.timeout)}
}

// enterStuck counts an operation past the timeout until leaveStuck, turning
// health to NOT_SERVING on the first and back on the last, with one log line each.
func (g *gate) enterStuck() {
	if g.stuck.Add(1) == 1 {
		g.log.Error("the HSM stopped answering: an operation is stuck past the HSM timeout; refusing new signatures until it returns", "hsm_timeout", g.timeout)
		g.setHealth(false)
	}
}

func (g *gate) leaveStuck() {
	if g.stuck.Add(-1) == 0 {
		g.log.Info("the HSM answers again")
		g.setHealth(true)
	}
}

func abandoned(ctx context.Context) *gateError {
	o := Cancelled
	if ctx.Err() == context.DeadlineExceeded {
		o = Expired
	}
	return &gateError{o, "agent: the caller went away before the HSM signed"}
}
