// Package grpcsvc is the agent's gRPC transport: the hsmagent.v1 services
// (Agent, and Admin for the operator's lifecycle commands) and the health
// service over connections a listen.Mux hands it, each call answered by
// the signing core with the credentials read at accept.
package grpcsvc

import (
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"github.com/hsmagent/hsmagent/agent/transport/listen"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
)

// Options configure a Service.
type Options struct {
	// Version is sent to clients in the VersionHeader of ListKeys; empty sends none.
	Version string
	// IdleTimeout closes a connection that has had no call open for this long.
	IdleTimeout time.Duration
	// MaxStreamsPerConnection bounds the calls open at once on one connection.
	MaxStreamsPerConnection int
	// Handshake bounds the time from accept to the HTTP/2 preface, and
	// from a call's headers to its request.
	Handshake time.Duration
}

// Service serves hsmagent.v1 and health for a core.
type Service struct {
	agentpb.UnimplementedAgentServer
	core    *core.Core
	version string
	grpc    *grpc.Server
	health  *health.Server
}

// connBuffer is the read and write buffer of each connection: requests are
// at most wire.MaxRequestSize, and most are far smaller.
const connBuffer = 8 << 10

// New returns a Service of c; its health follows the core's.
func New(c *core.Core, o Options) *Service {
	s := &Service{core: c, version: o.Version}
	s.grpc = grpc.NewServer(
		grpc.Creds(peerCredentials{}),
		grpc.StatsHandler(badRequestAudit{s}),
		grpc.InTapHandle(requestTap(o.Handshake)),
		grpc.MaxHeaderListSize(maxHeaderListSize),
		grpc.MaxRecvMsgSize(wire.MaxRequestSize),
		grpc.NumStreamWorkers(uint32(4*runtime.GOMAXPROCS(0))),
		grpc.MaxSendMsgSize(wire.MaxMessageSize),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: o.IdleTimeout}),
		grpc.MaxConcurrentStreams(uint32(o.MaxStreamsPerConnection)),
		grpc.ConnectionTimeout(o.Handshake),
		// Small messages on a local socket: the smallest windows gRPC allows
		// (64 KiB, and no growth by bandwidth probing) and small buffers
		// bound what each connection and stream can make the agent hold.
		grpc.StaticStreamWindowSize(64<<10),
		grpc.StaticConnWindowSize(64<<10),
		grpc.ReadBufferSize(connBuffer),
		grpc.WriteBufferSize(connBuffer),
		grpc.SharedWriteBuffer(true),
	)
	agentpb.RegisterAgentServer(s.grpc, s)
	agentpb.RegisterAdminServer(s.grpc, adminService{core: c})
	s.health = health.NewServer()
	healthpb.RegisterHealthServer(s.grpc, s.health)
	// For callers in other languages (grpcurl list, describe): the
	// services' descriptors only; no key or caller is in them.
	reflection.Register(s.grpc)
	c.OnHealth(s.setHealth)
	return s
}

// setHealth reports the core's health under the empty service name and
// the agent's.
func (s *Service) setHealth(serving bool) {
	st := healthpb.HealthCheckResponse_SERVING
	if !serving {
		st = healthpb.HealthCheckResponse_NOT_SERVING
	}
	s.health.SetServingStatus("", st)
	s.health.SetServingStatus(agentpb.Agent_ServiceDesc.ServiceName, st)
}

// Serve serves the connections l accepts until Stop; l's connections should
// be listen.Conn, whose credentials the calls carry.
func (s *Service) Serve(l net.Listener) error {
	err := s.grpc.Serve(l)
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return err
}

// Shutdown reports NOT_SERVING, stops taking calls and waits for those
// open until ctx is done, then ends what is left.
func (s *Service) Shutdown(ctx context.Context) {
	s.health.Shutdown()
	done := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.grpc.Stop()
	}
}

// toStatus is the core's error as a gRPC status; an error of gRPC's own
// (a send that failed) is passed on as it is.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(codes.Code(core.CodeOf(err)), err.Error())
}

// RequestIDTrailer is the gRPC trailer that carries the request id of a
// call that failed (Sign, ListKeys; WatchKeys and SignStream when the call
// as a whole was refused), as written in its audit record. Answers carry
// theirs in a request_id field.
const RequestIDTrailer = "hsmagent-request-id"

func sendRequestID(ctx context.Context, id string) {
	// An error means the stream is gone: nobody is left to read it.
	_ = grpc.SetTrailer(ctx, metadata.Pairs(RequestIDTrailer, id))
}

// ListKeys implements agentpb.AgentServer.
func (s *Service) ListKeys(ctx context.Context, _ *agentpb.ListKeysRequest) (*agentpb.ListKeysResponse, error) {
	markHandled(ctx)
	p, err := peerFrom(ctx)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	s.sendVersion(ctx)
	resp, rid, err := s.core.List(ctx, p)
	sendRequestID(ctx, rid)
	return resp, toStatus(err)
}

// WatchKeys implements agentpb.AgentServer.
func (s *Service) WatchKeys(_ *agentpb.WatchKeysRequest, stream agentpb.Agent_WatchKeysServer) error {
	markHandled(stream.Context())
	p, err := peerFrom(stream.Context())
	if err != nil {
		return status.Error(codes.Unauthenticated, err.Error())
	}
	err = s.core.Watch(stream.Context(), p, stream.Send)
	if rid := core.RequestIDOf(err); rid != "" {
		stream.SetTrailer(metadata.Pairs(RequestIDTrailer, rid))
	}
	return toStatus(err)
}

// Sign implements agentpb.AgentServer.
func (s *Service) Sign(ctx context.Context, req *agentpb.SignRequest) (*agentpb.SignResponse, error) {
	markHandled(ctx)
	p, err := peerFrom(ctx)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	a := s.core.Sign(ctx, p, req)
	sendRequestID(ctx, a.RequestID)
	if a.Err != nil {
		return nil, toStatus(a.Err)
	}
	return &agentpb.SignResponse{Signature: a.Signature, RequestId: a.RequestID}, nil
}

// SignStream implements agentpb.AgentServer.
func (s *Service) SignStream(stream agentpb.Agent_SignStreamServer) error {
	markHandled(stream.Context())
	p, err := peerFrom(stream.Context())
	if err != nil {
		return status.Error(codes.Unauthenticated, err.Error())
	}
	ctx := stream.Context()
	err = s.core.ServeStream(ctx, p, grpcStream{stream})
	if errors.Is(context.Cause(ctx), errNoRequest) {
		err = status.Error(codes.DeadlineExceeded, errNoRequest.Error())
		s.core.RefusedCall(ctx, p, core.EventSignStream, core.NoRequest, core.CodeDeadlineExceeded)
	}
	if rid := core.RequestIDOf(err); rid != "" {
		stream.SetTrailer(metadata.Pairs(RequestIDTrailer, rid))
	}
	return toStatus(err)
}

// grpcStream is the core.Stream of a SignStream call.
type grpcStream struct {
	agentpb.Agent_SignStreamServer
}

// Recv tells the core of a message gRPC could not decode (or that was
// over the size cap): the end of the stream, a reset or a deadline is not.
// (gRPC has cancelled the stream's context by then, so only the code tells.)
func (g grpcStream) Recv() (*agentpb.SignStreamRequest, error) {
	m, err := g.Agent_SignStreamServer.Recv()
	if err == nil || errors.Is(err, io.EOF) {
		return m, err
	}
	switch c := status.Code(err); c {
	case codes.Canceled, codes.DeadlineExceeded, codes.Unavailable:
		return nil, err
	default:
		return nil, &core.MalformedError{Code: core.Code(c), Err: err}
	}
}

// Break implements core.Breaker: gRPC queues the stream's end behind the
// data the client does not read, so only closing the connection frees
// what it holds.
func (g grpcStream) Break() {
	if p, ok := peer.FromContext(g.Context()); ok {
		if a, ok := p.AuthInfo.(connAuth); ok {
			a.conn.Close()
		}
	}
}

// peerCredentials reads SO_PEERCRED at accept time. It adds no encryption:
// the socket never leaves the host and its file mode guards who connects.
type peerCredentials struct{}

var _ credentials.TransportCredentials = peerCredentials{}

func (peerCredentials) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, connAuth{}, nil
}

func (peerCredentials) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	if pc, ok := listen.ConnOf(conn); ok { // read at accept
		return conn, connAuth{pc.Peer, pc}, nil
	}
	p, err := listen.ReadPeer(conn)
	if err != nil {
		return nil, nil, err
	}
	return conn, connAuth{Peer: p}, nil
}

func (peerCredentials) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}
func (c peerCredentials) Clone() credentials.TransportCredentials { return c }
func (peerCredentials) OverrideServerName(string) error           { return nil }

// connAuth is the AuthInfo of a connection: the peer, and the admitted
// connection (nil if it was not), for closing it when the peer stalls.
type connAuth struct {
	core.Peer
	conn *listen.Conn
}

func (connAuth) AuthType() string { return "peercred" }

func peerFrom(ctx context.Context) (core.Peer, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return core.Peer{}, errors.New("agent: no peer in context")
	}
	if a, ok := p.AuthInfo.(connAuth); ok {
		return a.Peer, nil
	}
	return core.Peer{}, errors.New("agent: connection has no peer credentials")
}
