// Package server is the agent's side of the socket, wired: the signing
// core (package agent/core) serving signatures made by a KeyStore (the HSM
// token through hsm/hsmstore, the in-memory MemoryStore, or anything else
// that hands out crypto.Signers) to local processes, behind the listener
// (agent/transport/listen), the gRPC service (agent/transport/grpcsvc) and
// the framed signing connection (agent/transport/framed) on one socket.
package server

import (
	"context"
	"log/slog"
	"net"
	"time"

	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"github.com/hsmagent/hsmagent/agent/transport/framed"
	"github.com/hsmagent/hsmagent/agent/transport/grpcsvc"
	"github.com/hsmagent/hsmagent/agent/transport/listen"
	"github.com/hsmagent/hsmagent/agent/transport/p11rpc"
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
	// AuditChain, when set, is the file under Audit (an AuditFile): each
	// record then carries the hash of the line before it, and
	// AuditSigningKey, when set, names the key that signs a checkpoint of
	// that chain every AuditCheckpointEvery (default a minute), on
	// Checkpoint and at Shutdown (package agent/auditchain checks them).
	AuditChain           *AuditFile
	AuditSigningKey      string
	AuditCheckpointEvery time.Duration
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

	// PKCS11TokenLabel is the label of the token ServePKCS11 shows
	// (default "hsmagent").
	PKCS11TokenLabel string
}

// Defaults of the transports' limits (the core's are in package core).
const (
	DefaultMaxStreamsPerConnection = 16
	DefaultIdleTimeout             = 5 * time.Minute
)

// handshakeTimeout bounds the time from accept to the client's first bytes
// (its HTTP/2 preface, or wire.Preface): a local client sends them at once,
// a held-open socket does not. A variable for the tests (export_test.go);
// each Server reads it once, in New.
var handshakeTimeout = 10 * time.Second

// Test hooks (export_test.go): zero keeps the core's defaults.
var expiryCheckEvery, auditProbeEvery time.Duration

// Server serves the hsmagent.v1 API.
type Server struct {
	core      *core.Core
	grpc      *grpcsvc.Service
	framed    *framed.Server
	pkcs11    *p11rpc.Server
	handshake time.Duration
}

// New loads the store's keys and returns a server ready to Serve.
func New(store KeyStore, opts Options) (*Server, error) {
	orDefault(&opts.MaxStreamsPerConnection, DefaultMaxStreamsPerConnection)
	orDefault(&opts.IdleTimeout, DefaultIdleTimeout)
	var chain core.Chain
	if opts.AuditChain != nil {
		chain = opts.AuditChain
	}
	c, err := core.New(store, core.Options{AuditChain: chain,
		Logger: opts.Logger, Audit: opts.Audit, AuditFailOpen: opts.AuditFailOpen, Policy: opts.Policy,
		AuditSigningKey: opts.AuditSigningKey, AuditCheckpointEvery: opts.AuditCheckpointEvery,
		Observer: opts.Observer, Now: opts.Now,
		MaxInFlight: opts.MaxInFlight, MaxWaiting: opts.MaxWaiting, HSMTimeout: opts.HSMTimeout,
		MaxSignaturesPerUID: opts.MaxSignaturesPerUID, AuditRefusalBurst: opts.AuditRefusalBurst,
		MaxConnections: opts.MaxConnections, MaxConnectionsPerUID: opts.MaxConnectionsPerUID,
		ConnectionRatePerUID: opts.ConnectionRatePerUID,
		MaxSignStreams:       opts.MaxSignStreams, MaxSignStreamsPerUID: opts.MaxSignStreamsPerUID,
		StreamSendTimeout: opts.StreamSendTimeout,
		ExpiryCheckEvery:  expiryCheckEvery, AuditProbeEvery: auditProbeEvery,
	})
	if err != nil {
		return nil, err
	}
	s := &Server{core: c, handshake: handshakeTimeout}
	s.grpc = grpcsvc.New(c, grpcsvc.Options{Version: opts.Version, IdleTimeout: opts.IdleTimeout,
		MaxStreamsPerConnection: opts.MaxStreamsPerConnection, Handshake: s.handshake})
	s.framed = framed.New(c, opts.IdleTimeout)
	s.pkcs11 = p11rpc.New(c, p11rpc.Options{TokenLabel: opts.PKCS11TokenLabel, Logger: opts.Logger, Handshake: s.handshake})
	return s, nil
}

func orDefault[T int | time.Duration](v *T, def T) {
	if *v <= 0 {
		*v = def
	}
}

// HSMAnswering reports whether no operation is stuck in the HSM past the
// HSM timeout: what the agent's health and systemd's watchdog follow.
func (s *Server) HSMAnswering() bool { return s.core.HSMAnswering() }

// HSMLoad reports the signatures inside the key store now and those waiting for it.
func (s *Server) HSMLoad() (inFlight, waiting int) { return s.core.HSMLoad() }

// Serve accepts connections on l until Shutdown: each is admitted on its
// caller's credentials, then routed by its first bytes to the signing
// connection or to gRPC.
func (s *Server) Serve(l net.Listener) error {
	s.core.Start()
	return s.grpc.Serve(listen.NewMux(listen.Admitted(l, s.core), wire.Preface, s.handshake, s.framed.Serve))
}

// ServePKCS11 serves the PKCS#11 transport (p11-kit's RPC protocol, for
// p11-kit-client.so) on l, a second socket, until Shutdown: the same core,
// rules, limits and audit as Serve's. Call it beside Serve, which starts
// the core.
func (s *Server) ServePKCS11(l net.Listener) error {
	return s.pkcs11.Serve(listen.Admitted(l, s.core))
}

// Shutdown stops accepting connections, ends watch streams and waits for
// in-flight signatures until ctx is done, then closes what is left.
func (s *Server) Shutdown(ctx context.Context) {
	s.core.Drain()
	s.grpc.Shutdown(ctx)
	s.framed.Shutdown(ctx)
	s.pkcs11.Shutdown(ctx)
	s.core.Close()
}

// AuditEvent writes an audit record of something that happened to the
// agent (an HSM worker that died, and the one that replaced it).
func (s *Server) AuditEvent(msg string, attrs ...slog.Attr) { s.core.AuditEvent(msg, attrs...) }

// Checkpoint writes a signed checkpoint of the audit chain now (before the
// audit file is rotated, say), if an audit signing key is set.
func (s *Server) Checkpoint(reason string) { s.core.Checkpoint(reason) }

// Reload reads the keys and chains again and installs policy (nil keeps the
// current one). On error the previous state stays in force.
func (s *Server) Reload(policy *Policy) error { return s.core.Reload(policy) }

// Revision counts the reloads that changed a key, a chain or the access rules.
func (s *Server) Revision() uint64 { return s.core.Revision() }

// The core's types and values, under the names this package has always
// given them.
type (
	Peer      = core.Peer
	Policy    = core.Policy
	Rule      = core.Rule
	RuleError = core.RuleError
	KeyStore  = core.KeyStore
	// AdminRule, AdminRuleError and AdminStore: the Admin service's rule
	// and the store it changes (agent/core/admin.go).
	AdminRule      = core.AdminRule
	AdminRuleError = core.AdminRuleError
	AdminStore     = core.AdminStore
	Key            = core.Key
	// KeyChangedError is the signer error that means the key under its
	// label was replaced (see KeyStore).
	KeyChangedError = core.KeyChangedError
	MemoryStore     = core.MemoryStore
	Outcome         = core.Outcome
	Observer        = core.Observer
	AuditFile       = core.AuditFile
	ListenOptions   = listen.ListenOptions
)

var (
	NewPolicy          = core.NewPolicy
	NewPolicyWithAdmin = core.NewPolicyWithAdmin
	NewMemoryStore     = core.NewMemoryStore
	OpenAuditFile      = core.OpenAuditFile
	ErrKeyNotFound     = core.ErrKeyNotFound
	Listen             = listen.Listen
	ListenWith         = listen.ListenWith
	InheritedListener  = listen.InheritedListener
	ReadPeer           = listen.ReadPeer
)

const (
	Signed         = core.Signed
	Invalid        = core.Invalid
	Denied         = core.Denied
	DeniedNotFound = core.DeniedNotFound
	NotFound       = core.NotFound
	Busy           = core.Busy
	CallerBusy     = core.CallerBusy
	Cancelled      = core.Cancelled
	Expired        = core.Expired
	Timeout        = core.Timeout
	HSMDown        = core.HSMDown
	HSMError       = core.HSMError
	KeyChanged     = core.KeyChanged
	AuditDown      = core.AuditDown
	Malformed      = core.Malformed
	NoRequest      = core.NoRequest

	DefaultMaxInFlight          = core.DefaultMaxInFlight
	DefaultMaxWaiting           = core.DefaultMaxWaiting
	DefaultHSMTimeout           = core.DefaultHSMTimeout
	DefaultMaxConnections       = core.DefaultMaxConnections
	DefaultMaxConnectionsPerUID = core.DefaultMaxConnectionsPerUID
	DefaultStreamSendTimeout    = core.DefaultStreamSendTimeout
	DefaultMaxSignaturesPerUID  = core.DefaultMaxSignaturesPerUID
	DefaultAuditRefusalBurst    = core.DefaultAuditRefusalBurst
	DefaultConnectionRatePerUID = core.DefaultConnectionRatePerUID
	DefaultMaxSignStreams       = core.DefaultMaxSignStreams
	DefaultMaxSignStreamsPerUID = core.DefaultMaxSignStreamsPerUID

	RequestIDTrailer = grpcsvc.RequestIDTrailer
	VersionHeader    = grpcsvc.VersionHeader
)
