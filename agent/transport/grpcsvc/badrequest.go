package grpcsvc

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"

	"github.com/hsmagent/hsmagent/agent/core"

	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
)

// badRequestAudit is a gRPC stats handler that gives a record (rationed like
// other refusals) to the calls no handler saw: gRPC answers those itself,
// so without it a malformed request would leave no trace.
type badRequestAudit struct{ s *Service }

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
	if _, known := auditEvents[event]; !strings.HasPrefix(method, "/hsmagent.v1.") || !known {
		return // the health service, or no such method: no decision on keys
	}
	p, err := peerFrom(ctx)
	if err != nil {
		return
	}
	code := core.Code(status.Code(end.Error))
	switch {
	case errors.Is(context.Cause(ctx), errNoRequest):
		b.s.core.RefusedCall(ctx, p, auditEvents[event], core.NoRequest, code)
	case code == core.CodeCanceled:
		// The client reset the call before its request: it asked for
		// nothing, and a reset flood must not fill the audit trail.
	default:
		b.s.core.RefusedCall(ctx, p, auditEvents[event], core.Malformed, code)
	}
}

func (badRequestAudit) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (badRequestAudit) HandleConn(context.Context, stats.ConnStats)                       {}

// auditEvents names the calls as their other audit records do.
var auditEvents = map[string]core.Event{"Sign": core.EventSign, "SignStream": core.EventSignStream,
	"ListKeys": core.EventList, "WatchKeys": core.EventWatch}
