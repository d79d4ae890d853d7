package core

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"github.com/hsmagent/hsmagent/agent/keytype"
)

// MaxLabel bounds key labels in requests (and so in logs).
const MaxLabel = wire.MaxLabel

// Answer is the core's answer to one sign request.
type Answer struct {
	Signature []byte
	Outcome   Outcome
	Err       error  // nil for a signature; an *Error, whose message is the caller's
	RequestID string // names the request's audit record
}

// Sign answers one sign request of p, audited: a signature whose record
// cannot be written is not given out (AuditDown).
func (c *Core) Sign(ctx context.Context, p Peer, req *agentpb.SignRequest) Answer {
	start := time.Now()
	a := Answer{RequestID: newRequestID()}
	var e *entry
	a.Signature, a.Outcome, e, a.Err = c.sign(ctx, p, req, nil)
	if aerr := c.auditSign(ctx, p, req, e, a.RequestID, a.Outcome, time.Since(start)); aerr != nil && a.Err == nil {
		a.Signature, a.Outcome, a.Err = nil, AuditDown, aerr // no signature leaves without its record
	}
	if a.Err != nil {
		a.Err = &Error{Code: a.Outcome.Code(), Msg: a.Err.Error(), RequestID: a.RequestID}
	}
	return a
}

// sign checks req and signs it, and returns the key it chose (nil if
// none), whose audit record names it. late, if set, makes the HSM call run
// in the calling goroutine and gets the answer if the HSM timeout passes
// first; sign then returns errAnswered when the call has returned (see
// gate.do).
func (c *Core) sign(ctx context.Context, p Peer, req *agentpb.SignRequest, late func(*gateError)) ([]byte, Outcome, *entry, error) {
	e, opts, o, err := c.check(p, req)
	if err != nil {
		return nil, o, nil, err
	}
	sig, err := c.gate.do(ctx, p.UID, func() ([]byte, error) { return e.signer.Sign(rand.Reader, req.Digest, opts) }, late)
	if errors.Is(err, errAnswered) {
		return nil, Timeout, e, err
	}
	var ge *gateError
	if errors.As(err, &ge) {
		return nil, ge.outcome, e, ge
	}
	sig, o, err = c.signed(req, e, sig, err)
	return sig, o, e, err
}

// check decides whether p may have req signed, and with which options.
func (c *Core) check(p Peer, req *agentpb.SignRequest) (*entry, crypto.SignerOpts, Outcome, error) {
	switch {
	case req.Key == "":
		return nil, nil, Invalid, errors.New("agent: key label is empty")
	case len(req.Key) > MaxLabel:
		return nil, nil, Invalid, fmt.Errorf("agent: key label longer than %d bytes", MaxLabel)
	}
	if c.audit.refusing() {
		return nil, nil, AuditDown, auditUnavailable()
	}
	st := c.state.Load()
	e := st.keys[req.Key]
	if !st.policy.Allowed(p, req.Key) {
		// One answer whether the key exists or not, so that a caller learns
		// nothing of the keys it may not use; the audit keeps the real reason.
		o := Denied
		if e == nil {
			o = DeniedNotFound
		}
		return nil, nil, o, fmt.Errorf("agent: key %q not found or not allowed for uid %d", req.Key, p.UID)
	}
	if e == nil {
		return nil, nil, NotFound, fmt.Errorf("agent: key %q not found", req.Key)
	}
	if len(req.KeyId) > 0 && !bytes.Equal(req.KeyId, e.keyID) {
		held, o, err := st.heldKey(req)
		if err != nil {
			return nil, nil, o, err
		}
		e = held
	}
	hash, ok := wire.GoHash(req.Hash)
	if !ok {
		return nil, nil, Invalid, fmt.Errorf("agent: hash %v is not supported; use SHA-256, SHA-384 or SHA-512", req.Hash)
	}
	if len(req.Digest) != hash.Size() {
		return nil, nil, Invalid, fmt.Errorf("agent: digest is %d bytes, %v needs %d", len(req.Digest), hash, hash.Size())
	}
	var opts crypto.SignerOpts = hash
	switch {
	case e.rsaPub == nil && req.Padding != agentpb.Padding_PADDING_UNSPECIFIED:
		return nil, nil, Invalid, fmt.Errorf("agent: key %q is an ECDSA key; padding %v applies to RSA only", req.Key, req.Padding)
	case e.rsaPub != nil && req.Padding == agentpb.Padding_PADDING_PSS:
		salt := int(req.PssSaltLength)
		maxSalt := keytype.MaxPSSSaltLength(e.rsaPub, hash)
		switch {
		case salt == 0:
			salt = rsa.PSSSaltLengthEqualsHash
		case salt < 0 || salt > maxSalt:
			return nil, nil, Invalid, fmt.Errorf("agent: PSS salt length %d is outside 1..%d for key %q", salt, maxSalt, req.Key)
		}
		opts = &rsa.PSSOptions{Hash: hash, SaltLength: salt}
	case e.rsaPub != nil && req.Padding != agentpb.Padding_PADDING_UNSPECIFIED && req.Padding != agentpb.Padding_PADDING_PKCS1V15:
		return nil, nil, Invalid, fmt.Errorf("agent: padding %v is not supported", req.Padding)
	}
	return e, opts, Signed, nil
}

// heldKey is the key a caller holds under req.Key when it is not the
// label's (req.KeyId differs): the key a rotation retired, within
// RetiredKeyGrace of its promotion, so that a handshake that presented its
// certificate completes. Any other key is refused: a signature by the
// label's key would not verify against the public key the caller holds.
func (st *state) heldKey(req *agentpb.SignRequest) (*entry, Outcome, error) {
	if len(req.KeyId) != wire.KeyIDSize {
		return nil, Invalid, fmt.Errorf("agent: key_id is %d bytes, want %d (the first bytes of the SHA-256 of the public key)", len(req.KeyId), wire.KeyIDSize)
	}
	// A retired label's time is the promotion's, by this host's clock. The
	// age is checked both ways: a label dated later (made by hand, or a clock
	// stepped back since) does not stretch the grace.
	if r, ok := st.retired[req.Key]; ok && bytes.Equal(req.KeyId, r.e.keyID) {
		if age := time.Since(r.at); age >= 0 && age < RetiredKeyGrace {
			return r.e, Signed, nil
		}
	}
	return nil, KeyChanged, fmt.Errorf("agent: key %q is not the key the caller holds: it was rotated or replaced; get the key again (its certificate and signer) to sign with the new one", req.Key)
}

// signed is the outcome of the key store's answer sig, err to req.
func (c *Core) signed(req *agentpb.SignRequest, e *entry, sig []byte, err error) ([]byte, Outcome, error) {
	if isKeyChanged(err) {
		ke := c.keyChanged(req.Key, e, err)
		return nil, ke.outcome, ke
	}
	if err != nil {
		if backendDown(err) {
			// The key store logs the outage once; a line per request would flood.
			c.log.Debug("signing failed: the HSM is unavailable", "key", req.Key, "err", err)
			return nil, HSMDown, err
		}
		// Details go to the log, at most a line a second; the caller learns that the HSM failed.
		if n, ok := c.gate.failures.allow(); ok {
			c.log.Error("signing failed", "key", req.Key, "err", err, "similar_failures_not_logged", n)
		}
		return nil, HSMError, fmt.Errorf("agent: the HSM failed to sign with key %q; see the agent's log", req.Key)
	}
	return sig, Signed, nil
}

// auditSign records a sign request's outcome o, signed by e (nil if no key
// was chosen). Its error, when the record of a signature could not be
// written, means the signature must not go out.
func (c *Core) auditSign(ctx context.Context, p Peer, req *agentpb.SignRequest, e *entry, rid string, o Outcome, d time.Duration) error {
	// Metrics are readable by more users than the audit: a caller refused a
	// key learns nothing there either (no label, one label for both denials).
	known := ""
	if o != Denied && o != DeniedNotFound && c.state.Load().keys[req.Key] != nil {
		known = req.Key
	}
	c.observer.Signed(known, o, d) // every request counts, audited or not
	if o.rationed() && !c.refusals.allow(p.UID, EventSign, o.String()) {
		return nil
	}
	attrs := [...]slog.Attr{
		slog.Int("uid", p.UID), slog.Int("gid", p.GID), slog.Int("pid", p.PID),
		slog.String("key", auditLabel(req.Key)), slog.String("hash", req.Hash.String()),
		slog.String("result", o.String()), slog.Duration("duration", d), slog.String("request_id", rid),
		{}, // the retired key that signed, if one did
	}
	n := len(attrs) - 1
	// The key that signed, as check chose it: the key list may have changed since.
	if o == Signed && e != nil && e.proto.Label != req.Key {
		attrs[n] = slog.String("retired_key", auditLabel(e.proto.Label))
		n++
	}
	if aerr := c.audit.write(ctx, o.Level(), EventSign.String(), attrs[:n]...); aerr != nil {
		return auditUnavailable()
	}
	return nil
}
