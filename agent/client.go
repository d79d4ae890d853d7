// Package agent is the client of the hsmagent daemon: it hands out
// crypto.Signers and tls.Certificates whose private keys stay in the HSM
// behind the agent's Unix socket.
//
// # Use
//
// Dial the agent's socket once and keep the Client for the life of the
// process. Signer returns a crypto.Signer for a key; TLSCertificate returns a
// tls.Certificate with the key's stored chain; GetClientCertificate and
// GetCertificate return tls.Config callbacks that follow certificate rotation
// (a new chain imported on the agent's token and reloaded with SIGHUP) without
// a restart.
//
// # Failure
//
// The Client reconnects by itself: calls made while the agent is down fail
// within their deadline (or the Client's sign timeout), and later calls
// succeed once the agent is back, without building a new Client.
package agent

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// SocketEnv names the environment variable Dial reads when given no path.
const SocketEnv = "HSMAGENT_SOCKET"

// Client talks to one agent. It is safe for concurrent use.
type Client struct {
	path        string
	conn        *grpc.ClientConn
	api         agentpb.AgentClient
	signTimeout time.Duration
	// waitForAgent: how long Dial retries an absent agent (WithWaitForAgent).
	waitForAgent time.Duration

	watchOnce sync.Once
	watchCtx  context.Context
	stopWatch context.CancelFunc
	certs     atomic.Pointer[certCache]
	streams   streams
	// grpcStreams: the agent takes no signing connections; sign over
	// gRPC's SignStream instead.
	grpcStreams atomic.Bool
	version     atomic.Pointer[string] // the agent's version, from the last ListKeys
}

// An Option configures Dial.
type Option func(*Client)

// WithSignTimeout bounds each signature made through a Signer, whose Sign
// method takes no context. The default is 5 seconds.
func WithSignTimeout(d time.Duration) Option {
	return func(c *Client) { c.signTimeout = d }
}

// Dial connects to the agent listening on socketPath (empty: $HSMAGENT_SOCKET)
// and waits until the connection is up or ctx is done. It fails at once,
// whatever ctx allows, when there is no socket, when connecting is not
// permitted (the error names the socket's owner, group and mode and this
// process's uid and groups) and when nothing listens; WithWaitForAgent makes
// it wait for the agent instead.
func Dial(ctx context.Context, socketPath string, opts ...Option) (*Client, error) {
	if socketPath == "" {
		socketPath = os.Getenv(SocketEnv)
	}
	if socketPath == "" {
		return nil, fmt.Errorf("agent: no socket path; pass one or set %s", SocketEnv)
	}
	abs, err := filepath.Abs(socketPath)
	if err != nil {
		return nil, fmt.Errorf("agent: socket path %q: %w", socketPath, err)
	}
	c := &Client{path: abs, signTimeout: 5 * time.Second}
	for _, o := range opts {
		o(c)
	}
	if err := reach(ctx, abs, c.waitForAgent); err != nil {
		return nil, err
	}
	c.conn, err = grpc.NewClient("unix://"+abs,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(wire.MaxMessageSize)),
		// Reconnect quickly after an agent restart instead of gRPC's default of up to two minutes.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: time.Second,
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	c.api = agentpb.NewAgentClient(c.conn)
	c.watchCtx, c.stopWatch = context.WithCancel(context.Background())
	c.conn.Connect()
	for {
		s := c.conn.GetState()
		if s == connectivity.Ready {
			return c, nil
		}
		if !c.conn.WaitForStateChange(ctx, s) {
			c.Close()
			if _, err := os.Stat(abs); err != nil {
				return nil, fmt.Errorf("agent: no agent socket at %q: is 'hsmagent serve' running?", abs)
			}
			return nil, fmt.Errorf("agent: cannot reach the agent at %q: %w", abs, ctx.Err())
		}
	}
}

// Close ends the connection and any background watch.
func (c *Client) Close() error {
	c.stopWatch()
	return c.conn.Close()
}

// Key is a key the agent offers to this caller.
type Key struct {
	Label  string
	ID     []byte
	Public crypto.PublicKey
	// Chain is the stored certificate chain, leaf first; empty without a certificate.
	Chain []*x509.Certificate
}

// Keys lists the keys this process may use.
func (c *Client) Keys(ctx context.Context) ([]Key, error) {
	keys, _, err := c.keys(ctx)
	return keys, err
}

// keys lists the keys and returns the listing's request id, which names
// its audit record.
func (c *Client) keys(ctx context.Context) ([]Key, string, error) {
	var md, trailer metadata.MD
	resp, err := c.api.ListKeys(ctx, &agentpb.ListKeysRequest{}, grpc.Header(&md), grpc.Trailer(&trailer))
	if err != nil {
		return nil, "", callError("listing keys", withRequestID(err, trailerRequestID(trailer)))
	}
	c.noteVersion(md)
	keys := make([]Key, 0, len(resp.Keys))
	for _, pk := range resp.Keys {
		k, err := keyFromProto(pk)
		if err != nil {
			return nil, "", err
		}
		keys = append(keys, k)
	}
	return keys, resp.RequestId, nil
}

func keyFromProto(pk *agentpb.Key) (Key, error) {
	pub, err := x509.ParsePKIXPublicKey(pk.PublicKey)
	if err != nil {
		return Key{}, fmt.Errorf("agent: key %q: bad public key from agent: %w", pk.Label, err)
	}
	k := Key{Label: pk.Label, ID: pk.Id, Public: pub}
	for i, der := range pk.CertificateChain {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return Key{}, fmt.Errorf("agent: key %q: bad certificate %d from agent: %w", pk.Label, i, err)
		}
		k.Chain = append(k.Chain, cert)
	}
	return k, nil
}

func (c *Client) key(ctx context.Context, label string) (Key, error) {
	keys, rid, err := c.keys(ctx)
	if err != nil {
		return Key{}, err
	}
	var labels []string
	for _, k := range keys {
		if k.Label == label {
			return k, nil
		}
		labels = append(labels, k.Label)
	}
	return Key{}, &KeyNotFoundError{Label: label, Offered: labels, RequestID: rid}
}

// KeyNotFoundError is a key the agent did not offer this caller: it has
// none by that label, or its rules do not allow this caller to use it (the
// agent does not say which).
type KeyNotFoundError struct {
	Label   string
	Offered []string // the labels the agent offered instead
	// RequestID names the listing's record in the agent's audit log, whose
	// hidden count says whether the rules withheld keys; empty from an agent
	// older than request id fields.
	RequestID string
}

func (e *KeyNotFoundError) Error() string {
	msg := fmt.Sprintf("agent: key %q not found or not allowed for this user; keys offered: %q", e.Label, e.Offered)
	if e.RequestID != "" {
		msg += " (request " + e.RequestID + ")"
	}
	return msg
}

// Signer returns a crypto.Signer for the key labelled label. Its public key
// is fetched now; each Sign is one call to the agent, bounded by the sign
// timeout. Sign accepts crypto.SHA256/384/512 and, for RSA keys,
// *rsa.PSSOptions (rsa.PSSSaltLengthAuto, rsa.PSSSaltLengthEqualsHash or a
// length the key allows). A digest that is not the hash's size, another hash
// or a salt length out of range fails in the client, before any call.
//
// The signer follows the label: after a rotation promotes a successor, Sign
// uses the new key while Public still returns the key fetched here; call
// Signer again (or follow WatchKeys) for the new public key. The signers of
// TLSCertificate, GetCertificate and GetClientCertificate stay with the key
// of the chain they present instead.
func (c *Client) Signer(ctx context.Context, label string) (crypto.Signer, error) {
	k, err := c.key(ctx, label)
	if err != nil {
		return nil, err
	}
	return &remoteSigner{client: c, label: label, public: k.Public}, nil
}

// TLSCertificate returns the key's stored chain with a signer through the agent.
func (c *Client) TLSCertificate(ctx context.Context, label string) (*tls.Certificate, error) {
	k, err := c.key(ctx, label)
	if err != nil {
		return nil, err
	}
	return c.tlsCertificate(k)
}

// tlsCertificate is k's chain with a signer that names the key it holds
// (SignRequest.key_id): a handshake that presented this chain is signed by
// its key even when a rotation promotes another one meanwhile.
func (c *Client) tlsCertificate(k Key) (*tls.Certificate, error) {
	if len(k.Chain) == 0 {
		return nil, fmt.Errorf("agent: key %q has no certificate; import one with 'hsmagent cert import' and reload the agent", k.Label)
	}
	spki, err := x509.MarshalPKIXPublicKey(k.Public)
	if err != nil {
		return nil, fmt.Errorf("agent: key %q: encoding its public key: %w", k.Label, err)
	}
	signer := &remoteSigner{client: c, label: k.Label, public: k.Public, keyID: wire.KeyID(spki)}
	cert := &tls.Certificate{PrivateKey: signer, Leaf: k.Chain[0]}
	for _, c := range k.Chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return cert, nil
}

type remoteSigner struct {
	client *Client
	label  string
	public crypto.PublicKey
	keyID  []byte // set: sign with this key only (see tlsCertificate)
}

var _ crypto.Signer = (*remoteSigner)(nil)

func (s *remoteSigner) Public() crypto.PublicKey { return s.public }

// Sign implements crypto.Signer; rand is unused: the HSM makes its own randomness.
func (s *remoteSigner) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	req, err := signRequest(s.label, s.public, digest, opts)
	if err != nil {
		return nil, err
	}
	req.KeyId = s.keyID
	ctx, cancel := context.WithTimeout(context.Background(), s.client.signTimeout)
	defer cancel()
	resp, err := s.client.sign(ctx, req)
	if err != nil {
		if ce, ok := err.(*CallError); ok {
			// A copy: the error of a broken stream is every call's on it.
			named := *ce
			named.Op = fmt.Sprintf("signing with key %q", s.label)
			err = &named
		}
		return nil, err
	}
	if resp.Code != 0 {
		return nil, &CallError{Op: fmt.Sprintf("signing with key %q", s.label), Code: codes.Code(resp.Code).String(), StatusCode: codes.Code(resp.Code),
			Msg: resp.Message, RequestID: resp.RequestId}
	}
	return resp.Signature, nil
}

// signRequest builds the request for a signature with the key labelled
// label, refusing before the call what the agent would refuse anyway and
// what the wire cannot carry: the PSS salt length is an int32 there, and a
// larger value would arrive truncated, as another salt length.
func signRequest(label string, pub crypto.PublicKey, digest []byte, opts crypto.SignerOpts) (*agentpb.SignRequest, error) {
	if len(label) > wire.MaxLabel {
		return nil, fmt.Errorf("agent: key label of %d bytes; the agent takes at most %d", len(label), wire.MaxLabel)
	}
	if opts == nil {
		return nil, fmt.Errorf("agent: key %q: no hash given; use SHA-256, SHA-384 or SHA-512", label)
	}
	h := opts.HashFunc()
	hash, ok := wire.Hash(h)
	if !ok {
		return nil, fmt.Errorf("agent: key %q: hash %v is not supported; use SHA-256, SHA-384 or SHA-512", label, h)
	}
	if len(digest) != h.Size() {
		return nil, fmt.Errorf("agent: key %q: digest is %d bytes, %v needs %d", label, len(digest), h, h.Size())
	}
	req := &agentpb.SignRequest{Key: label, Digest: digest, Hash: hash}
	rsaPub, isRSA := pub.(*rsa.PublicKey)
	if !isRSA {
		return req, nil
	}
	req.Padding = agentpb.Padding_PADDING_PKCS1V15
	pss, ok := opts.(*rsa.PSSOptions)
	if !ok {
		return req, nil
	}
	req.Padding = agentpb.Padding_PADDING_PSS
	maxSalt := keytype.MaxPSSSaltLength(rsaPub, h)
	if maxSalt < 1 {
		return nil, fmt.Errorf("agent: key %q: a %d-bit RSA key is too small for PSS with %v", label, rsaPub.N.BitLen(), h)
	}
	switch salt := pss.SaltLength; {
	case salt == rsa.PSSSaltLengthEqualsHash && h.Size() <= maxSalt:
		req.PssSaltLength = 0 // the agent reads 0 as "equal to the hash"
	case salt == rsa.PSSSaltLengthEqualsHash:
		return nil, fmt.Errorf("agent: key %q: a PSS salt as long as the hash (%d bytes) is outside 1..%d for this key", label, h.Size(), maxSalt)
	case salt == rsa.PSSSaltLengthAuto:
		req.PssSaltLength = int32(maxSalt) // what Go's rsa package picks
	case salt < 1 || salt > maxSalt:
		return nil, fmt.Errorf("agent: key %q: PSS salt length %d is outside 1..%d (or use rsa.PSSSaltLengthAuto or rsa.PSSSaltLengthEqualsHash)", label, salt, maxSalt)
	default:
		req.PssSaltLength = int32(salt) // fits: at most the key's size in bytes
	}
	return req, nil
}

// callError turns a gRPC status into one line that names the operation,
// with the request id that came beside the status (withRequestID).
func callError(what string, err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("agent: %s: %w", what, err)
	}
	e := &CallError{Op: what, Code: st.Code().String(), StatusCode: st.Code(), Msg: st.Message()}
	var as *agentStatus
	if errors.As(err, &as) {
		e.RequestID = as.requestID
	}
	return e
}

// requestIDTrailer is server.RequestIDTrailer (the client does not import
// the server): the request id of a call that failed, which has no answer to
// carry it in its field.
const requestIDTrailer = "hsmagent-request-id"

func trailerRequestID(md metadata.MD) string {
	if v := md.Get(requestIDTrailer); len(v) > 0 {
		return v[0]
	}
	return ""
}

// agentStatus is a gRPC status error with the request id the agent sent
// beside it: in a trailer, or in the field of a signing connection's last
// result. The id never comes from the message's text.
type agentStatus struct {
	err       error
	requestID string
}

func (e *agentStatus) Error() string              { return e.err.Error() }
func (e *agentStatus) Unwrap() error              { return e.err }
func (e *agentStatus) GRPCStatus() *status.Status { return status.Convert(e.err) }

// withRequestID attaches rid to err, a gRPC status error; without an id
// err is returned as it is.
func withRequestID(err error, rid string) error {
	if rid == "" || err == nil {
		return err
	}
	return &agentStatus{err: err, requestID: rid}
}

// CallError is an error returned by the agent, with its gRPC status code
// (NotFound, PermissionDenied, InvalidArgument, Unavailable, ...).
type CallError struct {
	// Code is StatusCode's name, as gRPC spells it.
	Op, Code, Msg string
	// StatusCode is the code the agent answered with.
	StatusCode codes.Code
	// RequestID names the call's record in the agent's audit log, as the
	// agent sent it in the answer's request_id field (or, for a call that
	// failed as a whole, its trailer). Empty when the agent did not answer,
	// or gave no id: an agent older than the field leaves it in Msg's text,
	// which is kept as it came.
	RequestID string
}

func (e *CallError) Error() string {
	if e.RequestID != "" {
		return fmt.Sprintf("agent: %s: %s (%s) (request %s)", e.Op, e.Msg, e.Code, e.RequestID)
	}
	return fmt.Sprintf("agent: %s: %s (%s)", e.Op, e.Msg, e.Code)
}

// IsUnavailable reports whether err means the agent could not be reached.
func IsUnavailable(err error) bool {
	var ce *CallError
	return errors.As(err, &ce) && (ce.StatusCode == codes.Unavailable || ce.StatusCode == codes.DeadlineExceeded)
}
