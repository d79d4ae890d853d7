// Package framed is the agent's signing-connection transport: SignStream's
// messages in plain frames (wire.Preface) beside gRPC on the same socket,
// served by the same core (admission, limits, budget, audit and drain),
// without HTTP/2.
package framed

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"github.com/hsmagent/hsmagent/agent/transport/listen"
	"github.com/hsmagent/hsmagent/internal/rawsock"
)

// Server serves the framed signing connections a listen.Mux hands it.
type Server struct {
	core      *core.Core
	idleAfter time.Duration
	conns     connSet
}

// New returns a Server of c's streams that closes a connection which has
// sent nothing for idleAfter (once what it asked is answered).
func New(c *core.Core, idleAfter time.Duration) *Server {
	return &Server{core: c, idleAfter: idleAfter}
}

// Serve serves one signing connection, whose preface has been read, until
// it ends.
func (s *Server) Serve(pc *listen.Conn) {
	defer pc.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Raw calls (see rawsock): at one caller each of a signature's reads
	// and writes comes after an idle spell and would wake the runtime's
	// monitor on the signature's path.
	raw, err := rawsock.New(pc.UnixConn)
	if err != nil {
		return // closed already: no one to answer
	}
	fs := &frameStream{conn: pc, raw: raw, r: bufio.NewReaderSize(raw.Stream(), 4<<10), w: wire.FrameWriter{W: raw}, cancel: cancel, idleAfter: s.idleAfter}
	if stopping(s.core) || !s.conns.add(pc, cancel) {
		// Shutting down: gRPC refuses new streams now, and so does this,
		// with an answer: the client takes a connection closed unanswered
		// for a refusal of its stream, and would not know why.
		if fs.w.WriteRaw([]byte(wire.Preface)) == nil {
			fs.end(&core.Error{Code: core.CodeUnavailable, Msg: "agent: shutting down"})
		}
		return
	}
	defer s.conns.remove(pc)
	err = fs.w.WriteRaw([]byte(wire.Preface))
	if err == nil {
		err = s.core.ServeStream(ctx, pc.Peer, fs)
	}
	if fs.idle.Load() && err == nil {
		// Only what the client had not sent goes unanswered: it may send
		// it again on a new connection, and the Go client does.
		err = core.Errorf(core.CodeAborted, "agent: the signing connection sent nothing for %v; closed, every request on it answered", s.idleAfter)
	}
	if ctx.Err() != nil {
		return // the client is gone
	}
	fs.end(err)
}

func stopping(c *core.Core) bool {
	select {
	case <-c.Stopping():
		return true
	default:
		return false
	}
}

// end sends err, the stream's end, as the connection's status.
func (f *frameStream) end(err error) {
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	f.conn.SetWriteDeadline(time.Now().Add(time.Second))
	f.w.WriteFrame(&agentpb.SignStreamResponse{Results: []*agentpb.SignStreamResult{
		{Id: wire.StatusID, Code: int32(core.CodeOf(err)), Message: msg, RequestId: core.RequestIDOf(err)}}})
}

// frameStream is the core.Stream of a signing connection.
type frameStream struct {
	conn      *listen.Conn
	raw       *rawsock.Conn
	qbuf      []byte // the frame of a quick send
	tail      []byte // what of it the connection did not take (in qbuf)
	r         *bufio.Reader
	buf       []byte
	w         wire.FrameWriter
	cancel    context.CancelFunc
	watching  atomic.Bool // a watchHangup is under way
	idleAfter time.Duration
	idle      atomic.Bool // Recv ended the stream: nothing came for idleAfter
}

// Recv reads the next request. The client never half-closes: the end of
// its side is the end of the connection, and ends the stream's context so
// that what it asked for and the HSM has not started is not signed.
func (f *frameStream) Recv() (*agentpb.SignStreamRequest, error) {
	m := &agentpb.SignStreamRequest{}
	var err error
	// Bounds the wait for the next frame (and a frame trickled in); a
	// connection that sends nothing is not kept for ever.
	f.conn.SetReadDeadline(time.Now().Add(f.idleAfter))
	f.buf, err = wire.ReadFrame(f.r, wire.MaxRequestSize, f.buf, m)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		f.idle.Store(true)
		return nil, io.EOF // drained: what was asked is answered, then Aborted
	}
	if err == nil {
		for _, it := range m.Items {
			if it.Id == wire.StatusID {
				err = &wire.FrameError{Msg: fmt.Sprintf("a signature with id %d, which is reserved for the connection's status; ids start at 1", wire.StatusID)}
				break
			}
		}
	}
	if err == nil {
		return m, nil
	}
	var fe *wire.FrameError
	if errors.As(err, &fe) {
		return nil, &core.MalformedError{Code: core.CodeInvalidArgument, Err: fe}
	}
	f.cancel()
	return nil, io.EOF
}

// Send implements core.Stream; the core finishes a quick send first.
func (f *frameStream) Send(m *agentpb.SignStreamResponse) error { return f.w.WriteFrame(m) }

// TrySend implements core.QuickSender. The core makes one send at a time,
// so qbuf and tail need no lock.
func (f *frameStream) TrySend(m *agentpb.SignStreamResponse) (bool, error) {
	var err error
	if f.qbuf, err = wire.AppendFrame(f.qbuf[:0], m); err != nil {
		return false, err
	}
	n, err := f.raw.TryWrite(f.qbuf)
	if err != nil {
		return false, err
	}
	f.tail = f.qbuf[n:]
	return len(f.tail) == 0, nil
}

// FinishSend implements core.QuickSender.
func (f *frameStream) FinishSend() error {
	if len(f.tail) == 0 {
		return nil
	}
	_, err := f.raw.Write(f.tail)
	f.tail = nil
	return err
}

// Break implements core.Breaker.
func (f *frameStream) Break() { f.conn.Close() }

// WatchHangup implements core.HangupWatcher, with one watch at a time: it
// ends when the client sends more (which the next Recv then reads), hangs
// up (which ends the stream's context) or the connection closes.
func (f *frameStream) WatchHangup() {
	if !f.watching.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer f.watching.Store(false)
		if peerHungUp(f.conn.UnixConn) {
			f.cancel()
		}
	}()
}

// connSet tracks the open signing connections, so that Shutdown can wait
// for their drain and close what is left at its deadline.
type connSet struct {
	mu     sync.Mutex
	conns  map[*listen.Conn]context.CancelFunc // ends the connection's context
	closed bool
	wg     sync.WaitGroup
}

func (c *connSet) add(pc *listen.Conn, cancel context.CancelFunc) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	if c.conns == nil {
		c.conns = make(map[*listen.Conn]context.CancelFunc)
	}
	c.conns[pc] = cancel
	c.wg.Add(1)
	return true
}

func (c *connSet) remove(pc *listen.Conn) {
	c.mu.Lock()
	delete(c.conns, pc)
	c.mu.Unlock()
	c.wg.Done()
}

// Shutdown takes no more connections and waits for the open ones to end
// until ctx is done, then closes them and ends their contexts, as gRPC's
// Stop does its streams': closing alone ends the context only through a
// read, and the stream's reader may have stopped already (draining), which
// would leave its signatures waiting for the HSM, and Shutdown for them.
func (s *Server) Shutdown(ctx context.Context) { s.conns.shutdown(ctx) }

func (c *connSet) shutdown(ctx context.Context) {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	done := make(chan struct{})
	go func() { c.wg.Wait(); close(done) }()
	select {
	case <-done:
		return
	case <-ctx.Done():
	}
	c.mu.Lock()
	for pc, cancel := range c.conns {
		cancel()
		pc.Close()
	}
	c.mu.Unlock()
	<-done
}
