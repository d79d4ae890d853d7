package agent

import (
	"context"
	"errors"
	"io"
	"math"
	"sync"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// maxBatch is the agent's limit of signatures per SignStream message.
const maxBatch = wire.MaxBatch

// call is one signature waiting for its result.
type call struct {
	result chan *agentpb.SignStreamResult // buffered; closed if the stream breaks
	// unread, set before result is closed: the agent never read the
	// request (its send failed, or the agent closed the stream saying it
	// answered all it read), so it may go again on a new stream.
	unread bool
}

// signStream multiplexes the Client's signatures over one SignStream. A
// caller that finds no send under way sends the requests queued so far
// itself, so that a lone signature costs no goroutine switch on its way out;
// under load one message carries the requests of many callers.
type signStream struct {
	stream signStreamIO
	cancel context.CancelFunc
	done   chan struct{} // closed when the stream broke

	mu      sync.Mutex
	pending map[uint64]*call
	nextID  uint64
	outbox  []*agentpb.SignStreamItem // requests not yet sent
	sending bool
	err     error // why the stream broke; set once
	// unread: the agent closed the stream saying it had answered every
	// request it read (Aborted: an idle signing connection), so a call
	// left unanswered was never read.
	unread bool
}

// maxInlineSends bounds the signatures pending on a stream for a caller to
// send by itself. Past the agent's limit per stream it stops reading, and a
// send may then wait for flow control longer than the caller's deadline:
// a goroutine of the stream's sends instead.
const maxInlineSends = 64

// streams holds the current stream and opens a new one when needed.
type streams struct {
	mu      sync.Mutex
	current *signStream
	opening chan struct{} // closed when an open attempt ends
	openErr error
}

// sign sends req over the current stream, opening one if needed, and waits
// for the result until ctx is done. A request the agent never read, on a
// stream it closed for idleness as the request went out, goes again on a
// new stream, a few times at most.
func (c *Client) sign(ctx context.Context, req *agentpb.SignRequest) (*agentpb.SignStreamResult, error) {
	r, unread, err := c.signOn(ctx, req)
	for try := 1; unread && try < maxUnreadRetries; try++ {
		r, unread, err = c.signOn(ctx, req)
	}
	return r, err
}

// maxUnreadRetries bounds the sends of one request the agent never read.
const maxUnreadRetries = 3

func (c *Client) signOn(ctx context.Context, req *agentpb.SignRequest) (_ *agentpb.SignStreamResult, unread bool, _ error) {
	st, err := c.stream(ctx)
	if err != nil {
		return nil, false, err
	}
	cl := &call{result: make(chan *agentpb.SignStreamResult, 1)}
	st.mu.Lock()
	if st.err != nil {
		st.mu.Unlock()
		return nil, true, st.err // never sent
	}
	st.nextID++
	st.pending[st.nextID] = cl
	st.outbox = append(st.outbox, &agentpb.SignStreamItem{Id: st.nextID, Request: req, TimeoutMs: timeoutMs(ctx)})
	inline, background := false, false
	if !st.sending {
		st.sending = true
		inline = len(st.pending) <= maxInlineSends
		background = !inline
	}
	st.mu.Unlock()
	switch {
	case inline:
		c.sendQueued(st, false)
	case background:
		go c.sendQueued(st, true)
	}
	select {
	case r, ok := <-cl.result:
		if !ok {
			return st.failure(cl)
		}
		return r, false, nil
	case <-st.done:
		// A call queued as the stream broke may never be sent or answered.
		select {
		case r, ok := <-cl.result:
			if ok {
				return r, false, nil
			}
		default:
		}
		return st.failure(cl)
	case <-ctx.Done():
		// The result, if it comes, lands in the buffered channel and is dropped.
		return nil, false, deadlineError(ctx)
	}
}

// timeoutMs is what is left of ctx's deadline, for the agent not to send
// the signature to the HSM once its caller has given up; 0 is no deadline.
func timeoutMs(ctx context.Context) uint32 {
	dl, ok := ctx.Deadline()
	if !ok {
		return 0
	}
	return uint32(min(max(time.Until(dl).Milliseconds(), 1), math.MaxUint32))
}

// failure is what a call on a broken stream returns: its error and
// whether the agent never read it.
func (st *signStream) failure(cl *call) (*agentpb.SignStreamResult, bool, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	return nil, cl.unread, st.err
}

func deadlineError(ctx context.Context) error {
	return &CallError{Op: "waiting for the agent", Code: codes.DeadlineExceeded.String(), StatusCode: codes.DeadlineExceeded, Msg: ctx.Err().Error()}
}

// stream returns the open stream, or opens one; waiting is bounded by ctx.
func (c *Client) stream(ctx context.Context) (*signStream, error) {
	c.streams.mu.Lock()
	if st := c.streams.current; st != nil {
		c.streams.mu.Unlock()
		return st, nil
	}
	opening := c.streams.opening
	if opening == nil {
		opening = make(chan struct{})
		c.streams.opening = opening
		go c.openStream(opening)
	}
	c.streams.mu.Unlock()
	select {
	case <-opening:
		c.streams.mu.Lock()
		defer c.streams.mu.Unlock()
		if st := c.streams.current; st != nil {
			return st, nil
		}
		return nil, callError("opening a signing stream", c.streams.openErr)
	case <-ctx.Done():
		return nil, deadlineError(ctx)
	}
}

// openStream runs without a caller's deadline: the stream outlives the call
// that opened it.
func (c *Client) openStream(done chan struct{}) {
	ctx, cancel := context.WithCancel(c.watchCtx)
	var stream signStreamIO
	var err error
	if !c.grpcStreams.Load() {
		stream, err = dialSignConn(ctx, c.path)
		if errors.Is(err, errNoSignConn) {
			c.grpcStreams.Store(true) // an older agent: gRPC's SignStream from now on
		}
	}
	if c.grpcStreams.Load() || errors.Is(err, errSignConnRefused) {
		var gs agentpb.Agent_SignStreamClient
		gs, err = c.api.SignStream(ctx)
		stream = grpcSignStream{gs}
	}
	c.streams.mu.Lock()
	defer c.streams.mu.Unlock()
	defer close(done)
	c.streams.opening = nil
	c.streams.openErr = err
	if err != nil {
		cancel()
		return
	}
	st := &signStream{stream: stream, cancel: cancel, done: make(chan struct{}), pending: make(map[uint64]*call)}
	c.streams.current = st
	go c.receive(st)
}

// grpcSignStream is the SignStream call as a signStreamIO: the status it
// ends with gets the request id of its trailer, as a signing connection's
// gets the one of its last result.
type grpcSignStream struct{ agentpb.Agent_SignStreamClient }

func (g grpcSignStream) Recv() (*agentpb.SignStreamResponse, error) {
	m, err := g.Agent_SignStreamClient.Recv()
	if err != nil && !errors.Is(err, io.EOF) {
		// The trailer is there once Recv has failed.
		err = withRequestID(err, trailerRequestID(g.Trailer()))
	}
	return m, err
}

// sendQueued sends the queued requests, up to maxBatch a message. Called
// inline by a caller it sends one message and leaves the rest, if any, to a
// goroutine; in that goroutine (all true) it sends until none is left.
func (c *Client) sendQueued(st *signStream, all bool) {
	for {
		st.mu.Lock()
		if len(st.outbox) == 0 || st.err != nil {
			st.sending = false
			st.mu.Unlock()
			return
		}
		// The agent ends a stream that sends more in one message.
		msg := &agentpb.SignStreamRequest{Items: wire.TakeBatch(&st.outbox, maxBatch, wire.MaxRequestSize)}
		st.mu.Unlock()
		if err := st.stream.Send(msg); err != nil {
			st.mu.Lock()
			for _, it := range msg.Items { // a frame cut short is never read
				if cl := st.pending[it.Id]; cl != nil {
					cl.unread = true
				}
			}
			st.mu.Unlock()
			c.dropStream(st, err)
			return
		}
		if !all {
			st.mu.Lock()
			more := len(st.outbox) > 0 && st.err == nil
			st.sending = more
			st.mu.Unlock()
			if more {
				go c.sendQueued(st, true)
			}
			return
		}
	}
}

func (c *Client) receive(st *signStream) {
	for {
		resp, err := st.stream.Recv()
		if err != nil {
			c.dropStream(st, err)
			return
		}
		st.mu.Lock()
		for _, r := range resp.Results {
			if cl := st.pending[r.Id]; cl != nil {
				delete(st.pending, r.Id)
				cl.result <- r
			}
		}
		st.mu.Unlock()
	}
}

// dropStream retires a broken stream and fails the calls waiting on it;
// the next signature opens a new stream.
func (c *Client) dropStream(st *signStream, cause error) {
	c.streams.mu.Lock()
	if c.streams.current == st {
		c.streams.current = nil
	}
	c.streams.mu.Unlock()
	st.cancel()
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.err != nil {
		return // already dropped
	}
	st.err = callError("signing", cause)
	st.unread = status.Code(cause) == codes.Aborted
	if errors.Is(cause, context.Canceled) {
		st.err = errors.New("agent: the client was closed")
	}
	close(st.done)
	for _, it := range st.outbox { // queued, never sent
		if cl := st.pending[it.Id]; cl != nil {
			cl.unread = true
		}
	}
	st.outbox = nil // their calls are pending too: failed below
	for id, cl := range st.pending {
		delete(st.pending, id)
		cl.unread = cl.unread || st.unread
		close(cl.result)
	}
}
