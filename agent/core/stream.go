package core

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
)

// maxInFlightPerStream bounds the signatures one stream may have pending:
// beyond it the stream stops reading and the client waits. One full
// message's worth.
const maxInFlightPerStream = wire.MaxBatch

// maxBatch bounds the items of one SignStream message in either direction.
const maxBatch = wire.MaxBatch

// maxResponseBytes bounds a response message: gRPC holds up to 64 KiB of
// them for a client that does not read, in pooled buffers whose sizes jump
// from 16 to 32 KiB, so a larger message would waste half its buffer.
const maxResponseBytes = 16<<10 - 64

// Stream is one end of a stream of signatures, as a transport carries it:
// the gRPC SignStream call, or a framed signing connection. Recv returns
// io.EOF (or any error) at the end of the client's side, and a
// *MalformedError for input it could not decode.
type Stream interface {
	Send(*agentpb.SignStreamResponse) error
	Recv() (*agentpb.SignStreamRequest, error)
}

// Breaker is a Stream whose connection can be closed, so that what a
// client that stopped reading makes the transport hold is freed.
type Breaker interface {
	Break()
}

// ServeStream admits p's stream and serves it until the client ends it, it
// breaks or the core drains; ctx ends with the stream. A reader goroutine
// takes the stream's messages. An item whose key's signer is an
// AsyncSigner and that finds an HSM session free is sent to the HSM from
// the reader itself, and its answer audited and queued by whoever reads
// the HSM's answers, for the handler to send: no goroutine waits for it.
// Every other item goes to a worker, which signs in the HSM itself and
// queues its result. Whichever finds no send under way sends the queued
// results in one message, and goes on while more are queued: under load a
// message carries many results. On Drain the stream stops
// taking requests, answers those in flight and ends. The error is the
// stream's end: an *Error the core decided, or the transport's own.
func (c *Core) ServeStream(ctx context.Context, p Peer, stream Stream) error {
	release, err := c.admitStream(ctx, p)
	if err != nil {
		return err
	}
	defer release()
	return c.serveStream(ctx, p, stream)
}

func (c *Core) serveStream(ctx context.Context, p Peer, stream Stream) error {
	ss := &signStream{c: c, stream: stream, ctx: ctx, p: p,
		slots: make(chan struct{}, maxInFlightPerStream), changed: make(chan struct{}, 1), draining: make(chan struct{})}
	ss.quick, _ = stream.(QuickSender)
	// A client that stops reading (its flow-control window closed) blocks
	// Send once gRPC holds 64 KiB for the stream: after stallAfter without
	// a send completing, its connection is closed and what it held is freed.
	ss.stall = time.AfterFunc(time.Hour, ss.stalled)
	ss.stall.Stop()
	defer ss.stall.Stop()

	received := make(chan error, 1)
	go func() { received <- ss.receive() }()
	stopping := c.stopping
	for {
		select {
		case err := <-received:
			received = nil
			if err != nil {
				return ss.end(err)
			}
			ss.drain() // the client closed its side, or the stream broke
		case <-stopping:
			stopping = nil
			ss.drain()
		case <-ss.changed:
			ss.flushQueued()
		case <-ctx.Done():
			return ss.end(ctx.Err())
		}
		ss.mu.Lock()
		idle, failed, refused := ss.isDraining() && ss.pending == 0 && len(ss.outbox) == 0 && !ss.sending, ss.failed, ss.refused
		ss.mu.Unlock()
		switch {
		case failed != nil:
			return ss.end(failed)
		case idle && refused != nil:
			return ss.end(refused)
		case idle && c.isStopping():
			return &Error{Code: CodeUnavailable, Msg: "agent: shutting down"}
		case idle:
			return nil
		}
	}
}

// QuickSender is a Stream that can send without waiting for its client (a
// signing connection): the goroutine that reads the HSM's answers then sends
// a result itself when no send is under way, rather than waking the stream's
// handler to send it, which at one caller is a goroutine hand-off and a
// thread wake-up on every signature's path.
type QuickSender interface {
	// TrySend sends m as far as the connection takes it now, and reports
	// whether it took all of it. What it did not take waits for
	// FinishSend; no other send comes before.
	TrySend(*agentpb.SignStreamResponse) (sent bool, err error)
	// FinishSend sends what TrySend left, waiting as Send does.
	FinishSend() error
}

// HangupWatcher is a Stream that can notice its client hang up while
// nothing reads from it: a signing connection. (gRPC's transport reads all
// the time and ends the stream's context by itself.)
type HangupWatcher interface {
	// WatchHangup ends the stream's context if the client hangs up before
	// it sends anything more. It returns at once.
	WatchHangup()
}

// signStream is the state of one SignStream call.
type signStream struct {
	c      *Core
	stream Stream
	ctx    context.Context
	p      Peer
	// slots bounds the signatures the stream may have pending or unsent:
	// past it the reader stops reading and the client waits.
	slots    chan struct{}
	changed  chan struct{} // wakes the handler to look at the state again
	draining chan struct{} // closed: take no more requests
	stall    *time.Timer
	sends    atomic.Int64 // sends begun and ended: odd while one is under way
	quick    QuickSender  // nil: every send is the handler's or a worker's

	mu      sync.Mutex
	pending int                         // items being signed
	outbox  []*agentpb.SignStreamResult // results not yet taken for a send
	sending bool
	// unfinished: a quick send left part of its message for the handler to
	// send (FinishSend); sending stays set until it has.
	unfinished bool
	closed     bool  // the handler returned or is returning: no more sends
	failed     error // a send failed or stalled: the handler returns it
	refused    error // the stream's end once drained: a message refused after its requests
}

// receive reads the stream's messages and starts their items, until the
// client closes its side (nil), the stream ends or breaks (nil), or a
// message is refused whole (its status).
func (ss *signStream) receive() error {
	for {
		msg, err := ss.stream.Recv()
		var malformed *MalformedError
		if errors.As(err, &malformed) {
			// The requests before it are answered, then the stream ends
			// with the transport's code.
			ss.c.RefusedCall(ss.ctx, ss.p, EventSignStream, Malformed, malformed.Code)
			ss.mu.Lock()
			ss.refused = &Error{Code: malformed.Code, Msg: "agent: " + malformed.Err.Error()}
			ss.mu.Unlock()
			return nil
		}
		if err != nil {
			return nil
		}
		if len(msg.Items) == 0 {
			// Nothing to sign costs the reader nothing to refuse but never
			// blocks it either: a client sending these in a loop would burn
			// the agent's CPU past the back-pressure of the slots.
			// The requests before it are answered, then the stream ends.
			err := &Error{Code: CodeInvalidArgument, Msg: "agent: a message with no signatures in it"}
			ss.c.RefusedCall(ss.ctx, ss.p, EventSignStream, Malformed, err.Code)
			ss.mu.Lock()
			ss.refused = err
			ss.mu.Unlock()
			return nil
		}
		if len(msg.Items) > maxBatch {
			rid := newRequestID()
			ss.c.auditStream(ss.ctx, ss.p, rid, len(msg.Items))
			return &Error{Code: CodeInvalidArgument, RequestID: rid,
				Msg: fmt.Sprintf("agent: %d signatures in one message; at most %d", len(msg.Items), maxBatch)}
		}
		for _, it := range msg.Items {
			select {
			case ss.slots <- struct{}{}:
			default:
				// Full: the reading stops until results go out. Meanwhile a
				// stream that can tell watches for its client hanging up, so
				// that what it asked for is not sent to the HSM after it.
				if w, ok := ss.stream.(HangupWatcher); ok {
					w.WatchHangup()
				}
				select {
				case ss.slots <- struct{}{}:
				case <-ss.draining:
					return nil
				case <-ss.ctx.Done():
					return nil
				}
			}
			ss.mu.Lock()
			if ss.isDraining() {
				ss.mu.Unlock()
				return nil
			}
			ss.pending++
			ss.mu.Unlock()
			id, req, timeout := it.Id, it.Request, time.Duration(it.TimeoutMs)*time.Millisecond
			if !ss.startAsync(id, req, timeout) {
				ss.c.workers.run(func() { ss.sign(id, req, timeout) })
			}
		}
	}
}

// sign signs one item and queues its result; at the HSM timeout the result
// is queued from the gate's timer and the HSM call is left to return. An
// item whose caller's timeout passes before the HSM takes it is not sent.
func (ss *signStream) sign(id uint64, req *agentpb.SignRequest, timeout time.Duration) {
	if req == nil {
		req = &agentpb.SignRequest{}
	}
	start := time.Now()
	rid := newRequestID()
	ctx := ss.ctx
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	// e is the key that signed (nil: none did), which the record names.
	answer := func(sig []byte, o Outcome, e *entry, err error) {
		if aerr := ss.c.auditSign(ctx, ss.p, req, e, rid, o, time.Since(start)); aerr != nil && err == nil {
			sig, o, err = nil, AuditDown, aerr // no signature leaves without its record
		}
		r := &agentpb.SignStreamResult{Id: id, Signature: sig, Code: int32(o.Code()), RequestId: rid}
		if err != nil {
			r.Message = err.Error()
		}
		ss.queue(r)
	}
	sig, o, e, err := ss.c.sign(ctx, ss.p, req, func(ge *gateError) { answer(nil, ge.outcome, nil, ge) })
	if !errors.Is(err, errAnswered) {
		answer(sig, o, e, err)
	}
}

// queue adds r to the results to send, and sends them unless a send is
// under way (whose sender will take r too).
func (ss *signStream) queue(r *agentpb.SignStreamResult) {
	ss.mu.Lock()
	ss.pending--
	ss.outbox = append(ss.outbox, r)
	if ss.sending || ss.closed {
		ss.mu.Unlock()
		return
	}
	ss.sending = true
	ss.mu.Unlock()
	ss.flush()
}

// flush sends the queued results, a message at a time, until none is left.
func (ss *signStream) flush() {
	for {
		msg := ss.nextMessage()
		if msg == nil {
			return
		}
		if !ss.send(func() error { return ss.stream.Send(msg) }) {
			return
		}
	}
}

// nextMessage takes the queued results of the next message off the outbox,
// giving back their slots; nil, with the sending ended, when none is left.
func (ss *signStream) nextMessage() *agentpb.SignStreamResponse {
	ss.mu.Lock()
	if len(ss.outbox) == 0 || ss.closed {
		ss.sending = false
		// The handler waits for the last send only when ending.
		ending := ss.isDraining() || ss.closed
		ss.mu.Unlock()
		if ending {
			ss.wake()
		}
		return nil
	}
	batch := wire.TakeBatch(&ss.outbox, maxBatch, maxResponseBytes)
	ss.mu.Unlock()
	for range batch {
		<-ss.slots
	}
	return &agentpb.SignStreamResponse{Results: batch}
}

// send makes one send that may wait for the client, bounded by stallAfter.
// It reports false, having ended the sending, if the send failed.
func (ss *signStream) send(send func() error) bool {
	ss.sends.Add(1)
	ss.stall.Reset(ss.c.stallAfter)
	err := send()
	ss.stall.Stop()
	ss.sends.Add(1)
	if err != nil {
		ss.sendFailed(err)
		return false
	}
	return true
}

func (ss *signStream) sendFailed(err error) {
	ss.fail(err)
	ss.mu.Lock()
	ss.sending = false
	ss.mu.Unlock()
	ss.wake()
}

// sendQuick sends the queued results as far as the connection takes them
// without waiting, in the goroutine that reads the HSM's answers, which must
// never wait for a client that does not read: what the connection does not
// take at once is the handler's to finish. The caller has set sending.
func (ss *signStream) sendQuick() {
	for {
		msg := ss.nextMessage()
		if msg == nil {
			return
		}
		sent, err := ss.quick.TrySend(msg)
		if err != nil {
			ss.sendFailed(err)
			return
		}
		if !sent {
			ss.mu.Lock()
			ss.unfinished = true // sending stays set: the handler finishes
			ss.mu.Unlock()
			ss.wake()
			return
		}
	}
}

// finishQuick sends what a quick send left; false if that failed.
func (ss *signStream) finishQuick() bool {
	return ss.send(ss.quick.FinishSend)
}

// stalled runs when a send has not completed for stallAfter.
func (ss *signStream) stalled() {
	if ss.sends.Load()%2 == 0 {
		return // the send completed as the timer fired
	}
	ss.c.limits.hit("stream send timeout", ss.p.UID, int(ss.c.stallAfter.Seconds()))
	ss.fail(Errorf(CodeResourceExhausted, "agent: the client read no results for %v; ending the stream", ss.c.stallAfter))
	// gRPC queues the stream's end behind the data the client does not
	// read, so only closing the connection frees what it holds.
	if b, ok := ss.stream.(Breaker); ok {
		b.Break()
	}
}

func (ss *signStream) fail(err error) {
	ss.mu.Lock()
	if ss.failed == nil {
		ss.failed = err
	}
	ss.mu.Unlock()
	ss.wake()
}

func (ss *signStream) wake() {
	select {
	case ss.changed <- struct{}{}:
	default:
	}
}

// drain stops taking requests; those in flight are still answered.
func (ss *signStream) drain() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if !ss.isDraining() {
		close(ss.draining)
	}
}

// isDraining reports whether drain has run; ss.mu orders it with pending.
func (ss *signStream) isDraining() bool {
	select {
	case <-ss.draining:
		return true
	default:
		return false
	}
}

// end stops all sends before the handler returns err: gRPC forbids sending
// on a stream whose handler has returned. A send under way is waited for;
// it ends when the stream's context does, or at the stall timeout.
func (ss *signStream) end(err error) error {
	ss.drain()
	ss.mu.Lock()
	ss.closed = true
	sending := ss.sending
	ss.mu.Unlock()
	for sending {
		ss.mu.Lock()
		unfinished := ss.unfinished
		ss.unfinished = false
		ss.mu.Unlock()
		if unfinished {
			// A frame cut short would garble the transport's last words.
			if ss.finishQuick() {
				ss.mu.Lock()
				ss.sending = false
				ss.mu.Unlock()
			}
			break
		}
		<-ss.changed
		ss.mu.Lock()
		sending = ss.sending
		ss.mu.Unlock()
	}
	return err
}

// auditStream records a SignStream message refused whole (too many items):
// its items were never looked at, so they have no sign records.
func (c *Core) auditStream(ctx context.Context, p Peer, rid string, items int) {
	result := CodeInvalidArgument.String()
	if !c.refusals.allow(p.UID, EventSignStream, result) {
		return
	}
	c.audit.write(ctx, slog.LevelWarn, EventSignStream.String(),
		slog.Int("uid", p.UID), slog.Int("gid", p.GID), slog.Int("pid", p.PID),
		slog.Int("items", items), slog.String("result", result), slog.String("request_id", rid))
}
