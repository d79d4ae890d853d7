package server

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// maxInFlightPerStream bounds the signatures one stream may have pending:
// beyond it the stream stops reading and the client waits.
const maxInFlightPerStream = 64

// maxBatch bounds the items of one SignStream message in either direction.
const maxBatch = 64

// maxResponseBytes bounds a response message: gRPC holds up to 64 KiB of
// them for a client that does not read, in pooled buffers whose sizes jump
// from 16 to 32 KiB, so a larger message would waste half its buffer.
const maxResponseBytes = 16<<10 - 64

// SignStream implements agentpb.AgentServer. Each item is signed in its own
// goroutine; results that complete while a message is being sent go out
// together in the next one. On shutdown the stream stops taking requests,
// answers those in flight and ends.
func (s *Server) SignStream(stream agentpb.Agent_SignStreamServer) error {
	markHandled(stream.Context())
	p, err := peerFrom(stream.Context())
	if err != nil {
		return status.Error(codes.Unauthenticated, err.Error())
	}
	ctx := stream.Context()
	release, err := s.admitStream(ctx, p)
	if err != nil {
		return err
	}
	defer release()
	requests := make(chan *agentpb.SignStreamRequest)
	go func() {
		// Ends when the client closes its side or the stream's context ends
		// (which happens when this handler returns).
		defer close(requests)
		for {
			msg, err := stream.Recv()
			if err != nil {
				if streamRecvFailed(err) {
					s.auditMalformed(ctx, "SignStream", err)
				}
				return
			}
			select {
			case requests <- msg:
			case <-ctx.Done():
				return
			}
		}
	}()

	results := make(chan *agentpb.SignStreamResult, maxInFlightPerStream+maxBatch)
	inFlight := 0
	// Sends run one at a time beside the loop, so that a client that stops
	// reading (its flow-control window closed) is noticed: after stallAfter
	// without a send completing, its connection is closed and what it held
	// is freed. Send blocks once gRPC holds 64 KiB for the stream.
	sent := make(chan error, 1)
	sending := false
	var stall *time.Timer
	var stalled <-chan time.Time
	defer func() {
		if stall != nil {
			stall.Stop()
		}
	}()
	var carry *agentpb.SignStreamResult // taken for a batch it did not fit in
	send := func(first *agentpb.SignStreamResult) {
		batch := []*agentpb.SignStreamResult{first}
		size := proto.Size(first)
	more:
		for len(batch) < maxBatch {
			select {
			case r := <-results:
				if size += proto.Size(r) + 3; size > maxResponseBytes { // 3: the field's tag and length
					carry = r
					break more
				}
				batch = append(batch, r)
			default:
				break more
			}
		}
		inFlight -= len(batch)
		sending = true
		if stall == nil {
			stall = time.NewTimer(s.stallAfter)
			stalled = stall.C
		} else {
			stall.Reset(s.stallAfter)
		}
		go func() { sent <- stream.Send(&agentpb.SignStreamResponse{Results: batch}) }()
	}
	draining := false
	stopping := s.stopping
	for {
		if draining && inFlight == 0 && !sending {
			if s.isStopping() {
				return status.Error(codes.Unavailable, "agent: shutting down")
			}
			return nil
		}
		var in <-chan *agentpb.SignStreamRequest
		if !draining && inFlight < maxInFlightPerStream {
			in = requests
		}
		var out <-chan *agentpb.SignStreamResult
		if !sending {
			if carry != nil {
				r := carry
				carry = nil
				send(r)
				continue
			}
			out = results
		}
		select {
		case msg, ok := <-in:
			if !ok {
				draining = true
				continue
			}
			items := msg.Items
			if len(items) > maxBatch {
				rid := newRequestID()
				s.auditStream(ctx, p, rid, len(items))
				return status.Error(codes.InvalidArgument,
					withRequestID(fmt.Sprintf("agent: %d signatures in one message; at most %d", len(items), maxBatch), rid))
			}
			for _, it := range items {
				inFlight++
				go func(id uint64, req *agentpb.SignRequest) {
					if req == nil {
						req = &agentpb.SignRequest{}
					}
					start := time.Now()
					rid := newRequestID()
					sig, code, err := s.sign(ctx, p, req)
					s.auditSign(ctx, p, req, rid, code, err, time.Since(start))
					r := &agentpb.SignStreamResult{Id: id, Signature: sig, Code: int32(code)}
					if err != nil {
						r.Message = withRequestID(err.Error(), rid)
					}
					results <- r // room for every item in flight: never blocks
				}(it.Id, it.Request)
			}
		case r := <-out:
			send(r)
		case err := <-sent:
			sending = false
			stall.Stop()
			if err != nil {
				return err
			}
		case <-stalled:
			s.limits.hit("stream send timeout", p.UID, int(s.stallAfter.Seconds()))
			// gRPC queues the stream's end behind the data the client does
			// not read, so only closing the connection frees what it holds.
			closeConn(ctx)
			return status.Errorf(codes.ResourceExhausted, "agent: the client read no results for %v; ending the stream", s.stallAfter)
		case <-stopping:
			draining, stopping = true, nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// auditStream records a SignStream message refused whole (too many items):
// its items were never looked at, so they have no sign records.
func (s *Server) auditStream(ctx context.Context, p Peer, rid string, items int) {
	result := codes.InvalidArgument.String()
	if !s.refusals.allow(p.UID, "sign-stream", result) {
		return
	}
	s.audit.write(ctx, slog.LevelWarn, "sign-stream",
		slog.Int("uid", p.UID), slog.Int("gid", p.GID), slog.Int("pid", p.PID),
		slog.Int("items", items), slog.String("result", result), slog.String("request_id", rid))
}

func (s *Server) isStopping() bool {
	select {
	case <-s.stopping:
		return true
	default:
		return false
	}
}
