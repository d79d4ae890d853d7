package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Signing connections (wire.Preface) carry SignStream's messages in plain
// frames beside gRPC on the same socket: the same admission, limits, budget,
// audit and drain, without HTTP/2.

// muxListener hands gRPC the connections that open with anything but the
// signing preface, and serves the others itself. Connections are admitted
// (limitListener) before their first bytes are read.
type muxListener struct {
	net.Listener // the limitListener
	s            *Server
	grpcConns    chan net.Conn
	done         chan struct{}
	closeOnce    sync.Once
	err          error // why accepting stopped; set before done is closed
}

func newMuxListener(l net.Listener, s *Server) *muxListener {
	m := &muxListener{Listener: l, s: s, grpcConns: make(chan net.Conn), done: make(chan struct{})}
	go m.run()
	return m
}

func (m *muxListener) run() {
	var delay time.Duration
	for {
		c, err := m.Listener.Accept()
		if te, ok := err.(interface{ Temporary() bool }); ok && te.Temporary() {
			// Out of file descriptors, say: try again, as gRPC's own loop would.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			select {
			case <-time.After(delay):
				continue
			case <-m.done:
				return
			}
		}
		if err != nil {
			m.closeWith(err)
			return
		}
		delay = 0
		go m.route(c)
	}
}

// Accept implements net.Listener for gRPC.
func (m *muxListener) Accept() (net.Conn, error) {
	select {
	case c := <-m.grpcConns:
		return c, nil
	case <-m.done:
		if m.err != nil {
			return nil, m.err
		}
		return nil, net.ErrClosed
	}
}

func (m *muxListener) Close() error {
	m.closeWith(nil)
	return nil
}

func (m *muxListener) closeWith(err error) {
	m.closeOnce.Do(func() {
		m.err = err
		close(m.done)
		m.Listener.Close()
	})
}

// route reads a connection's first bytes, within the handshake timeout, to
// tell a signing connection from a gRPC one.
func (m *muxListener) route(c net.Conn) {
	pc, ok := c.(*peerConn)
	if !ok {
		c.Close()
		return
	}
	head := make([]byte, len(wire.Preface))
	pc.SetReadDeadline(time.Now().Add(m.s.handshake))
	_, err := io.ReadFull(pc, head)
	pc.SetReadDeadline(time.Time{})
	if err != nil {
		// Closed, or silent past the handshake timeout before its first 8
		// bytes: gRPC would wait for the rest a handshake timeout more.
		pc.Close()
		return
	}
	if string(head) == wire.Preface {
		m.s.serveSignConn(pc)
		return
	}
	// gRPC reads the bytes again, and refuses what is not HTTP/2.
	select {
	case m.grpcConns <- &replayConn{peerConn: pc, head: head}:
	case <-m.done:
		pc.Close()
	}
}

// replayConn is a connection whose first bytes were read to route it.
type replayConn struct {
	*peerConn
	head []byte
}

func (c *replayConn) Read(b []byte) (int, error) {
	if len(c.head) > 0 {
		n := copy(b, c.head)
		c.head = c.head[n:]
		return n, nil
	}
	return c.peerConn.Read(b)
}

// serveSignConn serves one signing connection until it ends.
func (s *Server) serveSignConn(pc *peerConn) {
	defer pc.Close()
	ctx, cancel := context.WithCancel(peer.NewContext(context.Background(),
		&peer.Peer{Addr: pc.RemoteAddr(), AuthInfo: connAuth{pc.peer, pc}}))
	defer cancel()
	fs := &frameStream{conn: pc, r: bufio.NewReaderSize(pc, 4<<10), w: wire.FrameWriter{W: pc}, cancel: cancel, idleAfter: s.idleAfter}
	if s.isStopping() || !s.signConns.add(pc, cancel) {
		// Shutting down: gRPC refuses new streams now, and so does this.
		// Answered, not closed unanswered, which a client takes for an
		// agent without signing connections.
		if fs.w.WriteRaw([]byte(wire.Preface)) == nil {
			fs.end(status.Error(codes.Unavailable, "agent: shutting down"))
		}
		return
	}
	defer s.signConns.remove(pc)
	err := fs.w.WriteRaw([]byte(wire.Preface))
	if err == nil {
		var release func()
		if release, err = s.admitStream(ctx, pc.peer); err == nil {
			err = s.serveSignStream(ctx, pc.peer, fs)
			release()
		}
	}
	if fs.idle.Load() && err == nil {
		// Only what the client had not sent goes unanswered: it may send
		// it again on a new connection, and the Go client does.
		err = status.Errorf(codes.Aborted, "agent: the signing connection sent nothing for %v; closed, every request on it answered", s.idleAfter)
	}
	if fe := fs.malformed.Load(); fe != nil {
		// The code the client gets, in the audit record too.
		err = status.Error(codes.InvalidArgument, "agent: "+fe.Error())
		s.auditMalformed(ctx, "SignStream", err)
	}
	if ctx.Err() != nil {
		return // the client is gone
	}
	fs.end(err)
}

// end sends err, the stream's end, as the connection's status.
func (f *frameStream) end(err error) {
	st, _ := status.FromError(err)
	if errors.Is(err, context.Canceled) {
		st = status.New(codes.Canceled, err.Error())
	}
	f.conn.SetWriteDeadline(time.Now().Add(time.Second))
	f.w.WriteFrame(&agentpb.SignStreamResponse{Results: []*agentpb.SignStreamResult{
		{Id: wire.StatusID, Code: int32(st.Code()), Message: st.Message()}}})
}

// frameStream is the signStreamIO of a signing connection.
type frameStream struct {
	conn   *peerConn
	r      *bufio.Reader
	buf    []byte
	w      wire.FrameWriter
	cancel context.CancelFunc
	// malformed is set by Recv, and the connection's end says why. Atomic:
	// the stream may end (at Shutdown, say) with Recv still reading.
	malformed atomic.Pointer[wire.FrameError]
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
		f.malformed.Store(fe)
		// Ends the stream without the audit of serveSignStream's reader:
		// serveSignConn audits it and answers InvalidArgument.
		return nil, io.EOF
	}
	f.cancel()
	return nil, io.EOF
}

func (f *frameStream) Send(m *agentpb.SignStreamResponse) error { return f.w.WriteFrame(m) }

// watchHangup implements hangupWatcher, with one watch at a time: it ends
// when the client sends more (which the next Recv then reads), hangs up
// (which ends the stream's context) or the connection closes.
func (f *frameStream) watchHangup() {
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

// signConnSet tracks the open signing connections, so that Shutdown can wait
// for their drain and close what is left at its deadline.
type signConnSet struct {
	mu     sync.Mutex
	conns  map[*peerConn]context.CancelFunc // ends the connection's context
	closed bool
	wg     sync.WaitGroup
}

func (c *signConnSet) add(pc *peerConn, cancel context.CancelFunc) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	if c.conns == nil {
		c.conns = make(map[*peerConn]context.CancelFunc)
	}
	c.conns[pc] = cancel
	c.wg.Add(1)
	return true
}

func (c *signConnSet) remove(pc *peerConn) {
	c.mu.Lock()
	delete(c.conns, pc)
	c.mu.Unlock()
	c.wg.Done()
}

// shutdown takes no more connections and waits for the open ones to end
// until ctx is done, then closes them and ends their contexts, as gRPC's
// Stop does its streams': closing alone ends the context only through a
// read, and the stream's reader may have stopped already (draining), which
// would leave its signatures waiting for the HSM, and Shutdown for them.
func (c *signConnSet) shutdown(ctx context.Context) {
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
