package agent

import (
	"context"
	"errors"
	"sync"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"google.golang.org/grpc/codes"
)

// maxBatch matches the agent's limit of signatures per SignStream message.
const maxBatch = 64

// call is one signature waiting for its result.
type call struct {
	req    *agentpb.SignRequest
	result chan *agentpb.SignStreamResult // buffered; closed if the stream breaks
}

// signStream multiplexes the Client's signatures over one SignStream. A
// sender goroutine packs the calls queued while it was busy into one message,
// so under load a message each way serves several signatures.
type signStream struct {
	stream agentpb.Agent_SignStreamClient
	cancel context.CancelFunc
	queue  chan *call
	done   chan struct{} // closed when the stream broke

	mu      sync.Mutex
	pending map[uint64]*call
	nextID  uint64
	err     error // why the stream broke; set once
}

// streams holds the current stream and opens a new one when needed.
type streams struct {
	mu      sync.Mutex
	current *signStream
	opening chan struct{} // closed when an open attempt ends
	openErr error
}

// sign sends req over the current stream, opening one if needed, and waits
// for the result until ctx is done.
func (c *Client) sign(ctx context.Context, req *agentpb.SignRequest) (*agentpb.SignStreamResult, error) {
	st, err := c.stream(ctx)
	if err != nil {
		return nil, err
	}
	cl := &call{req: req, result: make(chan *agentpb.SignStreamResult, 1)}
	select {
	case st.queue <- cl:
	case <-st.done:
		return nil, st.failure()
	case <-ctx.Done():
		return nil, deadlineError(ctx)
	}
	select {
	case r, ok := <-cl.result:
		if !ok {
			return nil, st.failure()
		}
		return r, nil
	case <-st.done:
		// A call queued as the stream broke may never be sent or answered.
		select {
		case r, ok := <-cl.result:
			if ok {
				return r, nil
			}
		default:
		}
		return nil, st.failure()
	case <-ctx.Done():
		// The result, if it comes, lands in the buffered channel and is dropped.
		return nil, deadlineError(ctx)
	}
}

func (st *signStream) failure() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.err
}

func deadlineError(ctx context.Context) error {
	return &CallError{Op: "waiting for the agent", Code: codes.DeadlineExceeded.String(), Msg: ctx.Err().Error()}
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
	stream, err := c.api.SignStream(ctx)
	c.streams.mu.Lock()
	defer c.streams.mu.Unlock()
	defer close(done)
	c.streams.opening = nil
	c.streams.openErr = err
	if err != nil {
		cancel()
		return
	}
	st := &signStream{stream: stream, cancel: cancel, queue: make(chan *call, maxBatch), done: make(chan struct{}), pending: make(map[uint64]*call)}
	c.streams.current = st
	go c.send(st, ctx)
	go c.receive(st)
}

func (c *Client) send(st *signStream, ctx context.Context) {
	for {
		var first *call
		select {
		case first = <-st.queue:
		case <-ctx.Done():
			c.dropStream(st, ctx.Err())
			return
		}
		msg := &agentpb.SignStreamRequest{}
		st.mu.Lock()
		for cl := first; cl != nil; {
			st.nextID++
			st.pending[st.nextID] = cl
			msg.Items = append(msg.Items, &agentpb.SignStreamItem{Id: st.nextID, Request: cl.req})
			cl = nil
			if len(msg.Items) < maxBatch {
				select {
				case cl = <-st.queue:
				default:
				}
			}
		}
		st.mu.Unlock()
		if err := st.stream.Send(msg); err != nil {
			c.dropStream(st, err)
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
	if errors.Is(cause, context.Canceled) {
		st.err = errors.New("agent: the client was closed")
	}
	close(st.done)
	for id, cl := range st.pending {
		delete(st.pending, id)
		close(cl.result)
	}
	// Calls still queued never reached the agent: fail them too.
	for {
		select {
		case cl := <-st.queue:
			close(cl.result)
		default:
			return
		}
	}
}
