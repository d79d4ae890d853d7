package grpcsvc

import (
	"context"
	"errors"
	"sync"
	"time"

	"google.golang.org/grpc/tap"
)

// maxHeaderListSize bounds the HTTP/2 headers of one gRPC call. gRPC's
// default (16 MiB) let a caller make the agent hold gigabytes with calls
// that send one large header each; the Go client sends well under 1 KiB.
const maxHeaderListSize = 16 << 10

// errNoRequest is the cause of a call's context ended by firstMessage.
var errNoRequest = errors.New("agent: the call's request did not arrive in time")

// firstMessage bounds the time from a call's headers to its first message:
// a call that is open but silent holds its headers and a goroutine, and
// gRPC's idle timeout does not count it (it only closes connections with no
// call open). Streams that have sent a message are bounded by their own
// limits (the send timeout, the stream budget).
type firstMessage struct {
	once  sync.Once
	timer *time.Timer
}

type firstMessageKey struct{}

// arrived disarms the bound of ctx's call, if it has one.
func firstMessageArrived(ctx context.Context) {
	if fm, ok := ctx.Value(firstMessageKey{}).(*firstMessage); ok {
		fm.once.Do(func() { fm.timer.Stop() })
	}
}

// requestTap is the gRPC tap that arms the bound on each new call.
func requestTap(after time.Duration) tap.ServerInHandle {
	return func(ctx context.Context, _ *tap.Info) (context.Context, error) {
		ctx, cancel := context.WithCancelCause(ctx)
		fm := &firstMessage{}
		fm.timer = time.AfterFunc(after, func() { cancel(errNoRequest) })
		return context.WithValue(ctx, firstMessageKey{}, fm), nil
	}
}
