package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
)

// badRequestAudit is a gRPC stats handler that gives a record (rationed like
// other refusals) to the calls no handler saw: gRPC answers those itself,
// so without it a malformed request would leave no trace.
type badRequestAudit struct{ s *Server }

type handledKey struct{}

// handled is set once a handler took the call; it audits its own decisions.
type handled struct{ yes atomic.Bool }

func markHandled(ctx context.Context) {
	if h, ok := ctx.Value(handledKey{}).(*handled); ok {
		h.yes.Store(true)
	}
}

type methodKey struct{}

func (b badRequestAudit) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	ctx = context.WithValue(ctx, handledKey{}, &handled{})
	return context.WithValue(ctx, methodKey{}, info.FullMethodName)
}

func (b badRequestAudit) HandleRPC(ctx context.Context, st stats.RPCStats) {
	if _, ok := st.(*stats.InPayload); ok {
		firstMessageArrived(ctx)
		return
	}
	end, ok := st.(*stats.End)
	if !ok {
		return
	}
	firstMessageArrived(ctx) // releases the timer
	if end.Error == nil {
		return
	}
	if h, ok := ctx.Value(handledKey{}).(*handled); !ok || h.yes.Load() {
		return
	}
	method, _ := ctx.Value(methodKey{}).(string)
	event := method[strings.LastIndex(method, "/")+1:]
	if !strings.HasPrefix(method, "/hsmagent.v1.") || auditEvents[event] == "" {
		return // the health service, or no such method: no decision on keys
	}
	switch {
	case errors.Is(context.Cause(ctx), errNoRequest):
		b.s.auditRefusedCall(ctx, event, NoRequest, end.Error)
	case status.Code(end.Error) == codes.Canceled:
		// The client reset the call before its request: it asked for
		// nothing, and a reset flood must not fill the audit trail.
	default:
		b.s.auditMalformed(ctx, event, end.Error)
	}
}

func (badRequestAudit) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (badRequestAudit) HandleConn(context.Context, stats.ConnStats)                       {}

// auditEvents names the calls as their other audit records do.
var auditEvents = map[string]string{"Sign": "sign", "SignStream": "sign-stream", "ListKeys": "list", "WatchKeys": "watch"}

// auditMalformed records a request refused before or while it was decoded.
func (s *Server) auditMalformed(ctx context.Context, event string, err error) {
	s.auditRefusedCall(ctx, event, Malformed, err)
}

// auditRefusedCall records a call that ended before any request in it was
// looked at, with its outcome and the code the client got.
func (s *Server) auditRefusedCall(ctx context.Context, event string, o Outcome, err error) {
	p, perr := peerFrom(ctx)
	if perr != nil {
		return
	}
	if event == "Sign" {
		s.observer.Signed("", o, 0)
	}
	if !s.refusals.allow(p.UID, event, o.String()) {
		return
	}
	s.audit.write(ctx, slog.LevelWarn, auditEvents[event],
		slog.Int("uid", p.UID), slog.Int("gid", p.GID), slog.Int("pid", p.PID),
		slog.String("result", o.String()), slog.String("code", status.Code(err).String()),
		slog.String("request_id", newRequestID()))
}

// streamRecvFailed says whether a SignStream's Recv error is the client's
// malformed message rather than the end of the stream. (gRPC has cancelled
// the stream's context by then, so only the code tells.)
func streamRecvFailed(err error) bool {
	if errors.Is(err, io.EOF) {
		return false
	}
	switch status.Code(err) {
	case codes.Canceled, codes.DeadlineExceeded, codes.Unavailable:
		return false
	}
	return true
}
