package core

import (
	"crypto"
	"sync"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
)

// AsyncSigner is a signer that starts a signature and is told of its end,
// so that no goroutine of the agent waits while the HSM works: the HSM
// worker's signers, whose calls travel to another process. A KeyStore's
// signer that implements it is used so for the items of signature streams
// that find an HSM session free; the others, and single Sign calls, use
// Sign.
type AsyncSigner interface {
	// SignAsync signs as Sign would and calls done once with Sign's
	// results, perhaps before it returns. done does not block.
	SignAsync(digest []byte, opts crypto.SignerOpts, done func(sig []byte, err error))
}

// flight is a stream item in the HSM by way of an AsyncSigner. It is settled
// once: by the HSM's answer or by the HSM timeout, whichever comes first;
// a late answer after the timeout only gives the session back.
type flight struct {
	ss       *signStream
	id       uint64
	req      *agentpb.SignRequest
	rid      string
	e        *entry
	start    time.Time
	deadline time.Time // the caller's, zero for none
	timer    *time.Timer

	mu      sync.Mutex
	settled bool
}

// startAsync sends item id to the HSM without a goroutine of its own if
// its key's signer is an AsyncSigner and the gate admits it at once. It
// reports false, having done nothing, for everything else: requests the
// checks refuse, requests that must wait for a session or are refused by
// the gate. The goroutine path answers those as it always has.
func (ss *signStream) startAsync(id uint64, req *agentpb.SignRequest, timeout time.Duration) bool {
	c := ss.c
	if req == nil {
		return false
	}
	start := time.Now()
	e, opts, _, err := c.check(ss.p, req)
	if err != nil {
		return false
	}
	async, ok := e.signer.(AsyncSigner)
	if !ok || !c.gate.tryAdmit(ss.p.UID) {
		return false
	}
	f := &flight{ss: ss, id: id, req: req, rid: newRequestID(), e: e, start: start}
	if timeout > 0 {
		f.deadline = start.Add(timeout)
	}
	f.timer = time.AfterFunc(c.gate.timeout, f.timedOut)
	async.SignAsync(req.Digest, opts, f.done)
	return true
}

// done takes the HSM's answer.
func (f *flight) done(sig []byte, err error) {
	g := f.ss.c.gate
	f.mu.Lock()
	late := f.settled
	f.settled = true
	f.mu.Unlock()
	if late { // answered at the timeout: the session is free again
		g.free(f.ss.p.UID)
		g.leaveStuck()
		return
	}
	f.timer.Stop()
	g.free(f.ss.p.UID)
	var o Outcome
	switch {
	case f.ss.ctx.Err() != nil:
		ge := abandoned(f.ss.ctx)
		sig, o, err = nil, ge.outcome, ge
	case !f.deadline.IsZero() && time.Now().After(f.deadline):
		ge := &gateError{Expired, "agent: the caller went away before the HSM signed"}
		sig, o, err = nil, ge.outcome, ge
	default:
		sig, o, err = f.ss.c.signed(f.req, f.e, sig, err)
	}
	f.finish(sig, o, err)
}

// timedOut answers at the HSM timeout, as the goroutine path does.
func (f *flight) timedOut() {
	g := f.ss.c.gate
	f.mu.Lock()
	if f.settled {
		f.mu.Unlock()
		return
	}
	f.settled = true
	g.enterStuck() // under mu: done leaves it only after, never below zero
	f.mu.Unlock()
	ge := g.timedOut()
	f.finish(nil, ge.outcome, ge)
}

// finish audits the item's outcome and queues its result for the stream's
// handler to send: the goroutine that reads the HSM's answers must never
// wait for a client that does not read.
func (f *flight) finish(sig []byte, o Outcome, err error) {
	ss := f.ss
	if aerr := ss.c.auditSign(ss.ctx, ss.p, f.req, f.e, f.rid, o, time.Since(f.start)); aerr != nil && err == nil {
		sig, o, err = nil, AuditDown, aerr // no signature leaves without its record
	}
	r := &agentpb.SignStreamResult{Id: f.id, Signature: sig, Code: int32(o.Code()), RequestId: f.rid}
	if err != nil {
		r.Message = err.Error()
	}
	ss.mu.Lock()
	ss.pending--
	ss.outbox = append(ss.outbox, r)
	idle := !ss.sending && !ss.closed
	// Only the stream's last item in flight is sent so: while others are,
	// the handler sends (it gathers results that come meanwhile into one
	// message, and this goroutine goes on to the HSM's next answer).
	quick := idle && ss.quick != nil && ss.pending == 0
	ss.sending = ss.sending || quick
	ss.mu.Unlock()
	switch {
	case quick:
		ss.sendQuick()
	case idle:
		ss.wake()
	}
}

// flushQueued sends what finish queued, unless a send is under way (whose
// sender takes it too), and finishes what a quick send left. It runs in the
// stream's handler.
func (ss *signStream) flushQueued() {
	ss.mu.Lock()
	if ss.unfinished {
		ss.unfinished = false
		ss.mu.Unlock()
		if ss.finishQuick() {
			ss.flush() // sending is still set: send what queued meanwhile
		}
		return
	}
	if ss.sending || ss.closed || len(ss.outbox) == 0 {
		ss.mu.Unlock()
		return
	}
	ss.sending = true
	ss.mu.Unlock()
	ss.flush()
}
