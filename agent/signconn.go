package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"github.com/hsmagent/hsmagent/internal/rawsock"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// signStreamIO is the client's end of a SignStream: a signing connection
// (wire.Preface), or the gRPC call with an agent that has none.
type signStreamIO interface {
	Send(*agentpb.SignStreamRequest) error
	Recv() (*agentpb.SignStreamResponse, error)
}

// signConnTimeout bounds connecting a signing connection and the agent's
// answer to its preface.
const signConnTimeout = 5 * time.Second

// errNoSignConn is an agent that answered a signing connection's preface
// with something else: gRPC's greeting, from an agent that speaks only gRPC.
var errNoSignConn = errors.New("agent: the agent does not take signing connections")

// errSignConnRefused is a signing connection that ended after connecting
// and before the agent's answer to its preface: closed or reset by an agent
// at its connection limit (of the uid, or in all) with the Client's gRPC
// connection admitted, say. (An agent without signing connections greets
// first: errNoSignConn.) That stream goes over gRPC, whose error, if it
// fails too, is the call's; the next stream tries a signing connection again.
var errSignConnRefused = errors.New("agent: the agent refused the signing connection")

// dialSignConn opens a signing connection; it is closed when ctx ends.
func dialSignConn(ctx context.Context, path string) (*frameStream, error) {
	d := net.Dialer{Timeout: signConnTimeout}
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		// Unavailable, as gRPC says of a connection it cannot make.
		return nil, status.Error(codes.Unavailable, explain(path, err).Error())
	}
	// Raw calls (see rawsock): a caller signing now and then would wake the
	// runtime's monitor with each read and write of its signatures.
	raw, err := rawsock.New(conn.(*net.UnixConn))
	if err != nil {
		conn.Close()
		return nil, status.Error(codes.Unavailable, explain(path, err).Error())
	}
	conn.SetDeadline(time.Now().Add(signConnTimeout)) // bounds the raw calls' waits too
	if _, err := raw.Write([]byte(wire.Preface)); err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: %v", errSignConnRefused, err)
	}
	r := bufio.NewReaderSize(raw.Stream(), 16<<10)
	head := make([]byte, len(wire.Preface))
	if _, err := io.ReadFull(r, head); err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: %v", errSignConnRefused, err)
	}
	if string(head) != wire.Preface {
		// An agent without signing connections answers with gRPC's
		// greeting, an HTTP/2 SETTINGS frame written before it reads the
		// client's preface, then closes the connection as not HTTP/2.
		conn.Close()
		return nil, errNoSignConn
	}
	conn.SetDeadline(time.Time{})
	context.AfterFunc(ctx, func() { conn.Close() })
	return &frameStream{ctx: ctx, conn: conn, r: r, w: wire.FrameWriter{W: raw}}, nil
}

// frameStream is the signStreamIO of a signing connection.
type frameStream struct {
	ctx  context.Context // ends when the Client closes; closes conn
	conn net.Conn
	r    *bufio.Reader
	buf  []byte
	w    wire.FrameWriter
}

// Send writes m; a connection that broke (the agent stopped, say) is
// Unavailable, as on gRPC.
func (f *frameStream) Send(m *agentpb.SignStreamRequest) error {
	if err := f.w.WriteFrame(m); err != nil {
		if f.ctx.Err() != nil {
			return f.ctx.Err() // closed by the Client
		}
		return status.Error(codes.Unavailable, "agent: the signing connection broke: "+err.Error())
	}
	return nil
}

// Recv returns the next results, or the agent's status for the stream's
// end as a gRPC status error, so that it reads as on the gRPC call.
func (f *frameStream) Recv() (*agentpb.SignStreamResponse, error) {
	m := &agentpb.SignStreamResponse{}
	var err error
	if f.buf, err = wire.ReadFrame(f.r, wire.MaxMessageSize, f.buf, m); err != nil {
		if f.ctx.Err() != nil {
			return nil, f.ctx.Err() // closed by the Client
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, status.Error(codes.Unavailable, "agent: the agent closed the signing connection")
		}
		var fe *wire.FrameError
		if errors.As(err, &fe) {
			return nil, status.Error(codes.Internal, "agent: the agent sent "+fe.Error())
		}
		return nil, status.Error(codes.Unavailable, "agent: the signing connection broke: "+err.Error())
	}
	for _, r := range m.Results {
		if r.Id == wire.StatusID {
			f.conn.Close()
			if r.Code == int32(codes.OK) {
				return nil, io.EOF
			}
			return nil, withRequestID(status.Error(codes.Code(r.Code), r.Message), r.RequestId)
		}
	}
	return m, nil
}
