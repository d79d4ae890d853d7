// Package server is the agent's side of the socket: it serves signatures made
// by a KeyStore (the HSM token through hsm/hsmstore, the in-memory
// MemoryStore, or anything else that hands out crypto.Signers) to local processes, after checking each caller's peer credentials against
// a Policy, and writes an audit record for every signature.
package server

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Options configure a Server. Zero values are usable.
type Options struct {
	// Logger receives operational logs; nil means slog.Default().
	Logger *slog.Logger
	// Audit receives one record per decision (signature, refusal, listing),
	// numbered by a seq field; nil means Logger. A record its handler fails
	// to write fails the request it records (Unavailable), and the agent
	// refuses requests, reporting NOT_SERVING, until the trail can be
	// written again.
	Audit *slog.Logger
	// AuditFailOpen keeps signing while the audit trail cannot be written:
	// the records are lost (their seq numbers show as gaps), the log says
	// so once per outage. Off by default: no signature without its record.
	AuditFailOpen bool
	// Policy says who may use which key; nil means only the agent's own user and root.
	Policy *Policy
	// MaxInFlight bounds the signatures inside the key store at once: the
	// HSM's session pool. 0 means DefaultMaxInFlight.
	MaxInFlight int
	// MaxWaiting bounds the signatures queued behind them; more are refused
	// at once with ResourceExhausted. 0 means DefaultMaxWaiting.
	MaxWaiting int
	// HSMTimeout bounds each signature inside the key store; past it the
	// caller gets Unavailable and the agent reports NOT_SERVING until the
	// operation returns. 0 means DefaultHSMTimeout.
	HSMTimeout time.Duration
	// Now is the clock of the certificate expiry warnings; nil means time.Now.
	Now func() time.Time
	// Version is sent to clients in the VersionHeader of ListKeys; empty sends none.
	Version string
	// Observer is told of signatures, reloads and HSM health, for metrics; nil: nobody.
	Observer Observer

	// The limits below keep any user who can connect to the socket from
	// denying the agent to the others. Each is logged once when first hit
	// and once when it has cleared.

	// MaxConnections bounds the open connections of all callers; more are
	// closed at accept. The last eighth is kept for root and the agent's own
	// user. It is lowered to fit the open-file limit. 0 means
	// DefaultMaxConnections.
	MaxConnections int
	// MaxConnectionsPerUID bounds the open connections of one uid other
	// than root and the agent's own. 0 means DefaultMaxConnectionsPerUID.
	MaxConnectionsPerUID int
	// MaxStreamsPerConnection bounds the calls open at once on one
	// connection (HTTP/2 concurrent streams); a client queues the others.
	// 0 means DefaultMaxStreamsPerConnection.
	MaxStreamsPerConnection int
	// IdleTimeout closes a connection that has had no call open for this
	// long, and a signing connection that has sent nothing for this long.
	// 0 means DefaultIdleTimeout.
	IdleTimeout time.Duration
	// StreamSendTimeout ends a SignStream whose client has read nothing for
	// this long while results wait for it, so that a client that never reads
	// holds the stream's memory only that long. 0 means
	// DefaultStreamSendTimeout.
	StreamSendTimeout time.Duration
	// MaxSignaturesPerUID bounds the signatures of one uid waiting for the
	// HSM or in it; more are refused at once with ResourceExhausted, so one
	// caller cannot fill the queue ahead of the others. 0 means
	// DefaultMaxSignaturesPerUID.
	MaxSignaturesPerUID int
	// AuditRefusalBurst is how many refusals of one uid are audited one
	// record each before the rest are counted: then one more record a second,
	// and a "refusals suppressed" record with the count per reason every
	// second. 0 means DefaultAuditRefusalBurst.
	AuditRefusalBurst int
	// MaxSignStreams bounds the SignStreams open at once for all callers
	// (their unread results are what a client can make the agent hold); the
	// last eighth is kept for root and the agent's own user. 0 means
	// DefaultMaxSignStreams.
	MaxSignStreams int
	// MaxSignStreamsPerUID bounds the SignStreams one uid other than root and
	// the agent's own may hold open. 0 means DefaultMaxSignStreamsPerUID.
	MaxSignStreamsPerUID int
	// ConnectionRatePerUID bounds the connections per second one uid other
	// than root and the agent's own may open (bursts of twice as many);
	// more are closed at accept. 0 means DefaultConnectionRatePerUID.
	ConnectionRatePerUID int
}

// Server serves the hsmagent.v1 API.
type Server struct {
	agentpb.UnimplementedAgentServer
	store  KeyStore
	log    *slog.Logger
	audit  *auditLog
	grpc   *grpc.Server
	health *health.Server

	observer Observer
	version  string
	expiry   *expiryWatch // warns in the log before certificates expire

	keyChanges keyChanges    // reloads after a key was replaced in the store (keychange.go)
	gate       *gate         // admits signatures into the key store
	conns      *connLimits   // admits connections
	connRate   *connRate     // bounds how fast each uid connects
	watchers   *connLimits   // admits WatchKeys streams
	streams    *connLimits   // admits SignStreams
	limits     *limitLog     // logs each limit once when hit and once when cleared
	refusals   *refusalAudit // bounds the audit records of refusals
	listings   *refusalAudit // bounds the audit records of ListKeys and WatchKeys
	stallAfter time.Duration // StreamSendTimeout
	idleAfter  time.Duration // IdleTimeout
	handshake  time.Duration // handshakeTimeout
	signConns  signConnSet
	workers    *workers

	healthMu sync.Mutex // orders health updates

	reloadMu sync.Mutex // serialises reloads
	state    atomic.Pointer[state]
	stopping chan struct{} // closed by Shutdown: ends watch streams
	stopOnce sync.Once
}

// state is an immutable snapshot of keys and policy, replaced as a whole on reload.
type state struct {
	policy   *Policy
	keys     map[string]*entry
	labels   []string
	revision uint64
	changed  chan struct{} // closed when this state is replaced
	// What a caller's revision is made of (visibleTo): when the rules last
	// changed, and when each key it no longer has was removed.
	policyAt uint64
	gone     map[string]uint64
}

type entry struct {
	signer    crypto.Signer
	rsaPub    *rsa.PublicKey // nil for EC keys
	proto     *agentpb.Key
	changedAt uint64 // the revision that brought this key or chain
}

// New loads the store's keys and returns a server ready to Serve.
func New(store KeyStore, opts Options) (*Server, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Audit == nil {
		opts.Audit = opts.Logger
	}
	if opts.Policy == nil {
		var err error
		if opts.Policy, err = NewPolicy(nil); err != nil {
			return nil, err
		}
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.MaxWaiting <= 0 {
		opts.MaxWaiting = DefaultMaxWaiting
	}
	if opts.HSMTimeout <= 0 {
		opts.HSMTimeout = DefaultHSMTimeout
	}
	if opts.Observer == nil {
		opts.Observer = nopObserver{}
	}
	orDefault(&opts.MaxConnections, DefaultMaxConnections)
	orDefault(&opts.MaxConnectionsPerUID, DefaultMaxConnectionsPerUID)
	orDefault(&opts.MaxStreamsPerConnection, DefaultMaxStreamsPerConnection)
	orDefault(&opts.IdleTimeout, DefaultIdleTimeout)
	orDefault(&opts.StreamSendTimeout, DefaultStreamSendTimeout)
	orDefault(&opts.MaxSignaturesPerUID, DefaultMaxSignaturesPerUID)
	orDefault(&opts.AuditRefusalBurst, DefaultAuditRefusalBurst)
	orDefault(&opts.MaxSignStreams, DefaultMaxSignStreams)
	orDefault(&opts.MaxSignStreamsPerUID, DefaultMaxSignStreamsPerUID)
	orDefault(&opts.ConnectionRatePerUID, DefaultConnectionRatePerUID)
	opts.MaxConnections = fdLimit(opts.MaxConnections, opts.Logger)
	s := &Server{store: store, log: opts.Logger, stopping: make(chan struct{}), stallAfter: opts.StreamSendTimeout,
		idleAfter: opts.IdleTimeout, handshake: handshakeTimeout, version: opts.Version, observer: opts.Observer}
	s.audit = newAuditLog(opts.Audit, opts.Logger, opts.AuditFailOpen, s.setAuditWritable)
	if opts.AuditFailOpen {
		opts.Logger.Warn("audit_fail_open is set: if the audit trail cannot be written, signatures go on WITHOUT audit records")
	}
	s.limits = newLimitLog(opts.Logger)
	s.refusals = newRefusalAudit(s.audit, "refusals suppressed", opts.AuditRefusalBurst)
	// Listings cost a caller nothing either, and have their own ration so
	// that a client listing often does not use up its refusals' records.
	s.listings = newRefusalAudit(s.audit, "listings suppressed", opts.AuditRefusalBurst)
	s.conns = newConnLimits(opts.MaxConnections, opts.MaxConnectionsPerUID)
	s.connRate = newConnRate(opts.ConnectionRatePerUID)
	s.streams = newConnLimits(opts.MaxSignStreams, opts.MaxSignStreamsPerUID)
	s.watchers = newConnLimits(maxWatchers, maxWatchersPerUID)
	s.gate = newGate(opts.MaxInFlight, opts.MaxWaiting, opts.MaxSignaturesPerUID, opts.HSMTimeout, opts.Logger, s.limits, s.setHSMServing)
	// As many idle workers as signatures the HSM takes at once.
	s.workers = newWorkers(opts.MaxInFlight)
	s.expiry = newExpiryWatch(opts.Now, opts.Logger)
	if err := s.load(opts.Policy); err != nil {
		return nil, err
	}
	s.grpc = grpc.NewServer(
		grpc.Creds(peerCredentials{}),
		grpc.StatsHandler(badRequestAudit{s}),
		grpc.InTapHandle(requestTap(s.handshake)),
		grpc.MaxHeaderListSize(maxHeaderListSize),
		grpc.MaxRecvMsgSize(wire.MaxRequestSize),
		grpc.NumStreamWorkers(uint32(4*runtime.GOMAXPROCS(0))),
		grpc.MaxSendMsgSize(wire.MaxMessageSize),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: opts.IdleTimeout}),
		grpc.MaxConcurrentStreams(uint32(opts.MaxStreamsPerConnection)),
		grpc.ConnectionTimeout(s.handshake),
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
	s.health = health.NewServer()
	healthpb.RegisterHealthServer(s.grpc, s.health)
	return s, nil
}

// connBuffer is the read and write buffer of each connection: requests are
// at most wire.MaxRequestSize, and most are far smaller.
const connBuffer = 8 << 10

func orDefault[T int | time.Duration](v *T, def T) {
	if *v <= 0 {
		*v = def
	}
}

// HSMAnswering reports whether no operation is stuck in the HSM past the
// HSM timeout: what the agent's health and systemd's watchdog follow.
func (s *Server) HSMAnswering() bool { return s.gate.stuck.Load() == 0 }

// setHSMServing is the gate's report: false while an operation is stuck.
func (s *Server) setHSMServing(serving bool) {
	s.observer.HSMServing(serving)
	s.updateHealth()
}

// setAuditWritable is the audit trail's report: false during an outage.
func (s *Server) setAuditWritable(writable bool) {
	s.observer.AuditWritable(writable)
	s.updateHealth()
}

// updateHealth reports the agent's health: NOT_SERVING while the HSM is
// stuck, or while the audit trail cannot be written and requests are
// refused for it.
func (s *Server) updateHealth() {
	s.healthMu.Lock()
	defer s.healthMu.Unlock()
	st := healthpb.HealthCheckResponse_SERVING
	if !s.HSMAnswering() || s.audit.refusing() {
		st = healthpb.HealthCheckResponse_NOT_SERVING
	}
	s.health.SetServingStatus("", st)
	s.health.SetServingStatus(agentpb.Agent_ServiceDesc.ServiceName, st)
}

// Serve accepts connections on l until Shutdown.
func (s *Server) Serve(l net.Listener) error {
	// Read here, not in the goroutine, which Shutdown does not wait for:
	// a test changing the interval would race with an earlier agent's.
	go s.watchExpiry(expiryCheckEvery)
	err := s.grpc.Serve(newMuxListener(&limitListener{Listener: l, s: s}, s))
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return err
}

// Shutdown stops accepting connections, ends watch streams and waits for
// in-flight signatures until ctx is done, then closes what is left.
func (s *Server) Shutdown(ctx context.Context) {
	s.health.Shutdown()
	s.stopOnce.Do(func() { close(s.stopping) })
	done := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.grpc.Stop()
	}
	s.signConns.shutdown(ctx)
	s.refusals.stop()
	s.listings.stop()
	s.audit.close()
}

// Reload reads the keys and chains again and installs policy (nil keeps the
// current one). On error the previous state stays in force.
func (s *Server) Reload(policy *Policy) error {
	if policy == nil {
		policy = s.state.Load().policy
	}
	return s.load(policy)
}

// Revision counts the reloads that changed a key, a chain or the access rules.
func (s *Server) Revision() uint64 { return s.state.Load().revision }

func (s *Server) load(policy *Policy) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	keys, err := s.store.Keys()
	if err != nil {
		return err
	}
	old := s.state.Load()
	next := &state{policy: policy, keys: make(map[string]*entry, len(keys)), changed: make(chan struct{})}
	for _, k := range keys {
		if k.Label == "" {
			continue // unlabelled objects cannot be asked for
		}
		pk, err := keyProto(k)
		if err != nil {
			return err
		}
		e := &entry{proto: pk}
		if rp, ok := k.Public.(*rsa.PublicKey); ok {
			e.rsaPub = rp
		}
		// Keep the signer of an unchanged key: it holds a warm handle. A new
		// id is another key object, which the old signer refuses (KeyChangedError).
		if old != nil {
			if prev := old.keys[k.Label]; prev != nil && bytes.Equal(prev.proto.PublicKey, pk.PublicKey) && bytes.Equal(prev.proto.Id, pk.Id) {
				e.signer = prev.signer
			}
		}
		if e.signer == nil {
			if e.signer, err = s.store.Signer(k.Label); err != nil {
				return err
			}
		}
		next.keys[k.Label] = e
		next.labels = append(next.labels, k.Label)
	}
	sort.Strings(next.labels)
	next.gone = map[string]uint64{}
	if old != nil {
		next.revision, next.policyAt = old.revision, old.policyAt
		policyChanged := !old.policy.sameAs(policy)
		if policyChanged || !sameKeys(old, next) {
			next.revision++
		}
		if policyChanged {
			next.policyAt = next.revision
		}
		for label, at := range old.gone {
			next.gone[label] = at
		}
		for label := range old.keys {
			if next.keys[label] == nil {
				next.gone[label] = next.revision
			}
		}
	}
	for label, e := range next.keys {
		delete(next.gone, label)
		e.changedAt = next.revision
		if old != nil {
			if prev := old.keys[label]; prev != nil && proto.Equal(prev.proto, e.proto) {
				e.changedAt = prev.changedAt
			}
		}
	}
	s.state.Store(next)
	if old != nil {
		close(old.changed)
	}
	s.keysLoaded(next)
	s.observer.KeysLoaded(keys)
	return nil
}

func keyProto(k Key) (*agentpb.Key, error) {
	spki, err := x509.MarshalPKIXPublicKey(k.Public)
	if err != nil {
		return nil, fmt.Errorf("agent: key %q: encoding public key: %w", k.Label, err)
	}
	pk := &agentpb.Key{Label: k.Label, Id: k.ID, Algorithm: wire.Algorithm(k.Public), PublicKey: spki}
	for _, c := range k.Chain {
		pk.CertificateChain = append(pk.CertificateChain, c.Raw)
	}
	if len(k.Chain) > 0 {
		pk.NotAfterUnix = k.Chain[0].NotAfter.Unix()
	}
	return pk, nil
}

func sameKeys(a, b *state) bool {
	if len(a.keys) != len(b.keys) {
		return false
	}
	for label, ea := range a.keys {
		eb, ok := b.keys[label]
		if !ok || !proto.Equal(ea.proto, eb.proto) {
			return false
		}
	}
	return true
}

// ListKeys implements agentpb.AgentServer.
func (s *Server) ListKeys(ctx context.Context, _ *agentpb.ListKeysRequest) (*agentpb.ListKeysResponse, error) {
	markHandled(ctx)
	p, err := peerFrom(ctx)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	s.sendVersion(ctx)
	rid := newRequestID()
	sendRequestID(ctx, rid)
	resp, hidden := s.state.Load().visibleTo(p)
	if err := s.auditList(ctx, "list", p, rid, len(resp.Keys), hidden); err != nil {
		return nil, status.Error(codes.Unavailable, withRequestID(auditUnavailable().Error(), rid))
	}
	return resp, nil
}

// visibleTo returns the keys p may use and how many others it does not see.
// The revision is p's own: the last reload that changed what p sees (a key
// or chain it may use, added, changed or removed, or the rules), so that it
// says nothing of keys p may not use.
func (st *state) visibleTo(p Peer) (*agentpb.ListKeysResponse, int) {
	resp := &agentpb.ListKeysResponse{}
	rev := st.policyAt
	hidden := 0
	for _, label := range st.labels {
		if e := st.keys[label]; st.policy.Allowed(p, label) {
			resp.Keys = append(resp.Keys, e.proto)
			rev = max(rev, e.changedAt)
		} else {
			hidden++
		}
	}
	for label, at := range st.gone {
		if at > rev && st.policy.Allowed(p, label) {
			rev = at
		}
	}
	resp.Revision = rev
	return resp, hidden
}

// auditList records a listing: the keys shown and the keys hidden from the
// caller (how many, not which: the record is about the caller's view).
func (s *Server) auditList(ctx context.Context, event string, p Peer, rid string, visible, hidden int) error {
	reason := "ok"
	if hidden > 0 {
		reason = "keys-hidden"
	}
	if s.audit.refusing() {
		return s.audit.refuse() // not even a rationed listing goes unrecorded
	}
	if !s.listings.allow(p.UID, event, reason) {
		return nil
	}
	return s.audit.write(ctx, slog.LevelInfo, event,
		slog.Int("uid", p.UID), slog.Int("gid", p.GID), slog.Int("pid", p.PID),
		slog.Int("visible", visible), slog.Int("hidden", hidden), slog.String("request_id", rid))
}

// WatchKeys implements agentpb.AgentServer.
func (s *Server) WatchKeys(_ *agentpb.WatchKeysRequest, stream agentpb.Agent_WatchKeysServer) error {
	markHandled(stream.Context())
	p, err := peerFrom(stream.Context())
	if err != nil {
		return status.Error(codes.Unauthenticated, err.Error())
	}
	rid := newRequestID() // one for the watch: its records are its sends
	if reason := s.watchers.admit(p.UID); reason != "" {
		return s.refuseWatch(stream.Context(), p, rid, reason)
	}
	defer s.watchers.release(p.UID)
	sent := false
	var last uint64
	for {
		st := s.state.Load()
		// Only a change in what the caller sees is sent: a reload that
		// changed nothing for it queues nothing, and a watcher that reads
		// slowly gets the latest list when it reads, not every one between.
		if resp, hidden := st.visibleTo(p); !sent || resp.Revision != last {
			if err := s.auditList(stream.Context(), "watch", p, rid, len(resp.Keys), hidden); err != nil {
				return status.Error(codes.Unavailable, withRequestID(auditUnavailable().Error(), rid))
			}
			if err := stream.Send(resp); err != nil {
				return err
			}
			sent, last = true, resp.Revision
		}
		select {
		case <-st.changed:
		case <-stream.Context().Done():
			return nil
		case <-s.stopping:
			return status.Error(codes.Unavailable, "agent: shutting down")
		}
	}
}

// maxLabel bounds key labels in requests (and so in logs).
const maxLabel = wire.MaxLabel

// Sign implements agentpb.AgentServer.
func (s *Server) Sign(ctx context.Context, req *agentpb.SignRequest) (*agentpb.SignResponse, error) {
	markHandled(ctx)
	start := time.Now()
	p, err := peerFrom(ctx)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	rid := newRequestID()
	sendRequestID(ctx, rid)
	sig, o, err := s.sign(ctx, p, req, nil)
	if aerr := s.auditSign(ctx, p, req, rid, o, err, time.Since(start)); aerr != nil && err == nil {
		sig, o, err = nil, AuditDown, aerr // no signature leaves without its record
	}
	if err != nil {
		return nil, status.Error(o.Code(), withRequestID(err.Error(), rid))
	}
	return &agentpb.SignResponse{Signature: sig}, nil
}

// sign checks req and signs it. late, if set, makes the HSM call run in the
// calling goroutine and gets the answer if the HSM timeout passes first;
// sign then returns errAnswered when the call has returned (see gate.do).
func (s *Server) sign(ctx context.Context, p Peer, req *agentpb.SignRequest, late func(*gateError)) ([]byte, Outcome, error) {
	switch {
	case req.Key == "":
		return nil, Invalid, errors.New("agent: key label is empty")
	case len(req.Key) > maxLabel:
		return nil, Invalid, fmt.Errorf("agent: key label longer than %d bytes", maxLabel)
	}
	if s.audit.refusing() {
		return nil, AuditDown, auditUnavailable()
	}
	st := s.state.Load()
	e := st.keys[req.Key]
	if !st.policy.Allowed(p, req.Key) {
		// One answer whether the key exists or not, so that a caller learns
		// nothing of the keys it may not use; the audit keeps the real reason.
		o := Denied
		if e == nil {
			o = DeniedNotFound
		}
		return nil, o, fmt.Errorf("agent: key %q not found or not allowed for uid %d", req.Key, p.UID)
	}
	if e == nil {
		return nil, NotFound, fmt.Errorf("agent: key %q not found", req.Key)
	}
	hash, ok := wire.GoHash(req.Hash)
	if !ok {
		return nil, Invalid, fmt.Errorf("agent: hash %v is not supported; use SHA-256, SHA-384 or SHA-512", req.Hash)
	}
	if len(req.Digest) != hash.Size() {
		return nil, Invalid, fmt.Errorf("agent: digest is %d bytes, %v needs %d", len(req.Digest), hash, hash.Size())
	}
	var opts crypto.SignerOpts = hash
	switch {
	case e.rsaPub == nil && req.Padding != agentpb.Padding_PADDING_UNSPECIFIED:
		return nil, Invalid, fmt.Errorf("agent: key %q is an ECDSA key; padding %v applies to RSA only", req.Key, req.Padding)
	case e.rsaPub != nil && req.Padding == agentpb.Padding_PADDING_PSS:
		salt := int(req.PssSaltLength)
		maxSalt := keytype.MaxPSSSaltLength(e.rsaPub, hash)
		switch {
		case salt == 0:
			salt = rsa.PSSSaltLengthEqualsHash
		case salt < 0 || salt > maxSalt:
			return nil, Invalid, fmt.Errorf("agent: PSS salt length %d is outside 1..%d for key %q", salt, maxSalt, req.Key)
		}
		opts = &rsa.PSSOptions{Hash: hash, SaltLength: salt}
	case e.rsaPub != nil && req.Padding != agentpb.Padding_PADDING_UNSPECIFIED && req.Padding != agentpb.Padding_PADDING_PKCS1V15:
		return nil, Invalid, fmt.Errorf("agent: padding %v is not supported", req.Padding)
	}
	sig, err := s.gate.do(ctx, p.UID, func() ([]byte, error) { return e.signer.Sign(rand.Reader, req.Digest, opts) }, late)
	if err == errAnswered {
		return nil, Timeout, err
	}
	var ge *gateError
	if errors.As(err, &ge) {
		return nil, ge.outcome, ge
	}
	if isKeyChanged(err) {
		ke := s.keyChanged(req.Key, e, err)
		return nil, ke.outcome, ke
	}
	if err != nil {
		if backendDown(err) {
			// The key store logs the outage once; a line per request would flood.
			s.log.Debug("signing failed: the HSM is unavailable", "key", req.Key, "err", err)
			return nil, HSMDown, err
		}
		// Details go to the log, at most a line a second; the caller learns that the HSM failed.
		if n, ok := s.gate.failures.allow(); ok {
			s.log.Error("signing failed", "key", req.Key, "err", err, "similar_failures_not_logged", n)
		}
		return nil, HSMError, fmt.Errorf("agent: the HSM failed to sign with key %q; see the agent's log", req.Key)
	}
	return sig, Signed, nil
}

// auditSign records a sign request's outcome o. Its error, when the record
// of a signature could not be written, means the signature must not go out.
func (s *Server) auditSign(ctx context.Context, p Peer, req *agentpb.SignRequest, rid string, o Outcome, err error, d time.Duration) error {
	// Metrics are readable by more users than the audit: a caller refused a
	// key learns nothing there either (no label, one label for both denials).
	known := ""
	if o != Denied && o != DeniedNotFound && s.state.Load().keys[req.Key] != nil {
		known = req.Key
	}
	s.observer.Signed(known, o, d) // every request counts, audited or not
	if o.rationed() && !s.refusals.allow(p.UID, "sign", o.String()) {
		return nil
	}
	if aerr := s.audit.write(ctx, o.Level(), "sign",
		slog.Int("uid", p.UID), slog.Int("gid", p.GID), slog.Int("pid", p.PID),
		slog.String("key", auditLabel(req.Key)), slog.String("hash", req.Hash.String()),
		slog.String("result", o.String()), slog.Duration("duration", d), slog.String("request_id", rid)); aerr != nil {
		return auditUnavailable()
	}
	return nil
}
