package core

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/rotation"
)

// AdminStore is the KeyStore the Admin operations change: the same three
// calls the store contract suite (agent/server/storetest) drives, which
// the MemoryStore, the token (hsm/hsmstore) and the HSM worker's store
// implement. A store without them serves keys but refuses Admin calls.
type AdminStore interface {
	KeyStore
	// Generate creates a key of type kt under label; a label in use is an error.
	Generate(label string, kt keytype.Type) (crypto.PublicKey, error)
	// SetChain stores chain (leaf first) with the key, replacing the one before.
	SetChain(label string, chain []*x509.Certificate) error
	// Delete destroys the key and its chain.
	Delete(label string) error
}

// AdminRule names who may call the Admin operations besides root, which
// always may (it can read the PIN anyway). Users and groups are names or
// numeric ids, resolved as the access rules' are; groups match the
// caller's primary and supplementary groups as the kernel reports them.
type AdminRule struct {
	Users  []string `yaml:"users"`
	Groups []string `yaml:"groups"`
}

// AdminRuleError is NewPolicyWithAdmin's refusal of the admin rule.
type AdminRuleError struct{ Err error }

func (e *AdminRuleError) Error() string { return "agent: admin rule" + e.Err.Error() }
func (e *AdminRuleError) Unwrap() error { return e.Err }

// NewPolicyWithAdmin is NewPolicy with an admin rule.
func NewPolicyWithAdmin(rules []Rule, admin AdminRule) (*Policy, error) {
	p, err := NewPolicy(rules)
	if err != nil {
		return nil, err
	}
	p.admin.source = Rule{Users: admin.Users, Groups: admin.Groups}
	if p.admin.uids, p.admin.gids, err = resolveIDs(admin.Users, admin.Groups); err != nil {
		return nil, &AdminRuleError{err}
	}
	return p, nil
}

// IsAdmin reports whether peer may call the Admin operations.
func (p *Policy) IsAdmin(peer Peer) bool {
	if peer.UID == 0 {
		return true
	}
	r := p.admin
	if slices.Contains(r.uids, peer.UID) || slices.Contains(r.gids, peer.GID) {
		return true
	}
	for _, g := range peer.Groups {
		if slices.Contains(r.gids, g) {
			return true
		}
	}
	return false
}

// adminNames says whom the admin rule allows, for a refusal.
func (p *Policy) adminNames() string {
	s := "root"
	if u := p.admin.source.Users; len(u) > 0 {
		s += fmt.Sprintf(", users %s", strings.Join(u, " "))
	}
	if g := p.admin.source.Groups; len(g) > 0 {
		s += fmt.Sprintf(", groups %s", strings.Join(g, " "))
	}
	if s == "root" {
		return "root only"
	}
	return s
}

// tokenLabeler is a store that knows the label of its token (the HSM
// worker's, the token's own).
type tokenLabeler interface{ TokenLabel() string }

// The Admin operations, as their audit records name them.
const (
	opToken    = "token"
	opKeys     = "keys"
	opGenerate = "generate-key"
	opDelete   = "delete-key"
	opImport   = "import-certificate"
	opCSR      = "create-csr"
)

// maxImport bounds the certificates of one import: a leaf and its chain.
const maxImport = 10

// adminCall is one Admin operation as its audit record keeps it.
type adminCall struct {
	op      string
	label   string
	rid     string
	keyType string
	pub     crypto.PublicKey // its fingerprint goes in the record
	serial  string           // of the leaf imported
	chain   int              // chain certificates imported
	retired string           // the label a promotion gave the key before
}

// adminBegin gives a its request id and decides whether p may call it at all.
func (c *Core) adminBegin(ctx context.Context, p Peer, a *adminCall) (AdminStore, error) {
	a.rid = newRequestID()
	if c.audit.refusing() {
		c.audit.refuse()
		return nil, &Error{Code: CodeUnavailable, RequestID: a.rid,
			Msg: "agent: the audit trail cannot be written, so no key is changed; see the agent's log"}
	}
	policy := c.state.Load().policy
	if !policy.IsAdmin(p) {
		err := Errorf(CodePermissionDenied,
			"agent: uid %d may not change the agent's keys: its admin rule allows %s; to allow this user, add it or one of its groups under admin: (users:, groups:) in the agent's config and reload the agent (SIGHUP)",
			p.UID, policy.adminNames())
		return nil, c.adminRefused(ctx, p, a, AdminNotAdmin, err)
	}
	store, ok := c.store.(AdminStore)
	if !ok {
		return nil, c.adminRefused(ctx, p, a, AdminUnsupported,
			Errorf(CodeFailedPrecondition, "agent: this agent's key store cannot be changed through the agent"))
	}
	if a.op != opKeys && a.op != opToken {
		if err := checkAdminLabel(a.label); err != nil {
			return nil, c.adminRefused(ctx, p, a, AdminInvalid, Errorf(CodeInvalidArgument, "%v", err))
		}
		if c.auditKey != "" && a.label == c.auditKey {
			return nil, c.adminRefused(ctx, p, a, AdminAuditKey,
				Errorf(CodePermissionDenied, "agent: key %q is the agent's audit signing key, which no caller changes", a.label))
		}
	}
	return store, nil
}

// checkAdminLabel refuses a label no key should have: the store adds its
// own rules (package hsm reserves "/chain/").
func checkAdminLabel(label string) error {
	switch {
	case label == "":
		return errors.New("agent: the key label is empty")
	case len(label) > MaxLabel:
		return fmt.Errorf("agent: key label is %d bytes, longer than %d", len(label), MaxLabel)
	case !utf8.ValidString(label):
		return fmt.Errorf("agent: key label %q is not valid UTF-8", auditLabel(label))
	case strings.IndexFunc(label, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0:
		return fmt.Errorf("agent: key label %q holds a control or non-printable character", auditLabel(label))
	}
	return nil
}

// adminRefused records a refusal (rationed per uid, as the other
// refusals are) and returns err with the record's id.
func (c *Core) adminRefused(ctx context.Context, p Peer, a *adminCall, o AdminOutcome, err *Error) error {
	err.RequestID = a.rid
	if c.refusals.allow(p.UID, EventAdmin, o.String()) {
		c.adminRecord(ctx, p, a, o, err)
	}
	return err
}

// adminFailed records an operation the store or the input refused; every one
// gets its record (only admins get this far).
func (c *Core) adminFailed(ctx context.Context, p Peer, a *adminCall, o AdminOutcome, err *Error) error {
	err.RequestID = a.rid
	if c.adminRecord(ctx, p, a, o, err) != nil {
		return auditUnavailable().withID(a.rid)
	}
	return err
}

// storeFailed records a change the store refused or lost. A store that
// failed midway (a worker that died with the call) may have made it all
// the same: the keys are read again, so that the agent serves what the
// token holds.
func (c *Core) storeFailed(ctx context.Context, p Peer, a *adminCall, err error) error {
	if rerr := c.Reload(nil); rerr != nil {
		c.log.Debug("reloading the keys after a failed admin change failed too", "op", a.op, "err", rerr)
	}
	return c.adminFailed(ctx, p, a, AdminFailed, storeFailure(err))
}

// adminDone records a change that was made. The change cannot be taken back
// when its record fails: the caller is told so.
func (c *Core) adminDone(ctx context.Context, p Peer, a *adminCall) error {
	if c.adminRecord(ctx, p, a, AdminDone, nil) != nil {
		return &Error{Code: CodeUnavailable, RequestID: a.rid,
			Msg: "agent: the " + a.op + " was made, but its audit record could not be written; see the agent's log"}
	}
	return nil
}

func (c *Core) adminRecord(ctx context.Context, p Peer, a *adminCall, o AdminOutcome, err *Error) error {
	attrs := []slog.Attr{slog.Int("uid", p.UID), slog.Int("gid", p.GID), slog.Int("pid", p.PID), slog.String("op", a.op)}
	if a.op != opKeys && a.op != opToken {
		attrs = append(attrs, slog.String("key", auditLabel(a.label)))
	}
	if a.keyType != "" {
		attrs = append(attrs, slog.String("key_type", auditLabel(a.keyType)))
	}
	if a.pub != nil {
		attrs = append(attrs, slog.String("public_key_sha256", PublicKeyFingerprint(a.pub)))
	}
	if a.serial != "" {
		attrs = append(attrs, slog.String("serial", a.serial), slog.Int("chain", a.chain))
	}
	if a.retired != "" {
		attrs = append(attrs, slog.String("retired", auditLabel(a.retired)))
	}
	code := CodeOK
	if err != nil {
		code = err.Code
	}
	attrs = append(attrs, slog.String("result", o.String()), slog.String("code", code.String()))
	if err != nil {
		attrs = append(attrs, slog.String("error", auditText(err.Msg)))
	}
	attrs = append(attrs, slog.String("request_id", a.rid))
	return c.audit.write(ctx, o.Level(), EventAdmin.String(), attrs...)
}

// auditText is an error message as a record keeps it: the caller's input
// in it is quoted by the message, but may be long.
func auditText(s string) string {
	const max = 512
	if len(s) > max {
		cut := max
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut] + "..."
	}
	return strings.Map(func(r rune) rune {
		if !unicode.IsPrint(r) {
			return '?'
		}
		return r
	}, s)
}

// PublicKeyFingerprint is the SHA-256 of a public key's DER
// SubjectPublicKeyInfo, colon-separated upper-case hex as OpenSSL and the
// hsmagent commands print it.
func PublicKeyFingerprint(pub crypto.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(der)
	h := strings.ToUpper(hex.EncodeToString(sum[:]))
	var b strings.Builder
	for i := 0; i < len(h); i += 2 {
		if i > 0 {
			b.WriteByte(':')
		}
		b.WriteString(h[i : i+2])
	}
	return b.String()
}

// storeFailure is a store's refusal as the caller gets it.
func storeFailure(err error) *Error {
	var u interface{ Unavailable() bool }
	switch {
	case errors.Is(err, ErrKeyNotFound):
		return &Error{Code: CodeNotFound, Msg: err.Error()}
	case errors.As(err, &u) && u.Unavailable():
		return &Error{Code: CodeUnavailable, Msg: err.Error()}
	}
	return &Error{Code: CodeFailedPrecondition, Msg: err.Error()}
}

// reloadAfter serves a change at once: the keys are read again and
// WatchKeys watchers told, as a SIGHUP would.
func (c *Core) reloadAfter(a *adminCall) error {
	if err := c.Reload(nil); err != nil {
		c.log.Error("reloading the keys after an admin change failed; the change is made but not yet served", "op", a.op, "key", auditLabel(a.label), "err", err)
		return &Error{Code: CodeInternal, RequestID: a.rid,
			Msg: fmt.Sprintf("agent: the %s was made, but reloading the keys failed (%v); send the agent SIGHUP", a.op, err)}
	}
	return nil
}

// adminCommit serves a change the store made and records it.
func (c *Core) adminCommit(ctx context.Context, p Peer, a *adminCall) error {
	if err := c.reloadAfter(a); err != nil {
		return err
	}
	return c.adminDone(ctx, p, a)
}

// AdminToken names the token of the store ("" for a store that is none).
func (c *Core) AdminToken(ctx context.Context, p Peer) (string, string, error) {
	a := &adminCall{op: opToken}
	store, err := c.adminBegin(ctx, p, a)
	if err != nil {
		return "", a.rid, err
	}
	label := ""
	if tl, ok := store.(tokenLabeler); ok {
		label = tl.TokenLabel()
	}
	return label, a.rid, c.adminDone(ctx, p, a)
}

// AdminKeys lists every key the agent serves, whatever the access rules,
// to an admin.
func (c *Core) AdminKeys(ctx context.Context, p Peer) (*agentpb.ListKeysResponse, string, error) {
	a := &adminCall{op: opKeys}
	if _, err := c.adminBegin(ctx, p, a); err != nil {
		return nil, a.rid, err
	}
	st := c.state.Load()
	resp := &agentpb.ListKeysResponse{Revision: st.revision, RequestId: a.rid}
	for _, label := range st.labels {
		resp.Keys = append(resp.Keys, st.keys[label].proto)
	}
	if err := c.adminDone(ctx, p, a); err != nil {
		return nil, a.rid, err
	}
	return resp, a.rid, nil
}

// GenerateKey creates a key of keyType under label in the store and
// serves it at once.
func (c *Core) GenerateKey(ctx context.Context, p Peer, label, keyType string) (*agentpb.Key, string, error) {
	a := &adminCall{op: opGenerate, label: label, keyType: keyType}
	store, err := c.adminBegin(ctx, p, a)
	if err != nil {
		return nil, a.rid, err
	}
	kt, err := keytype.Parse(keyType)
	if err != nil {
		return nil, a.rid, c.adminFailed(ctx, p, a, AdminInvalid, Errorf(CodeInvalidArgument, "agent: %v", err))
	}
	// A successor's or retired key's label is a rotation's only: a key
	// generated under one would sign under the label it names.
	if base, kind := rotation.Parse(label); kind != rotation.Current {
		return nil, a.rid, c.adminFailed(ctx, p, a, AdminInvalid, Errorf(CodeInvalidArgument,
			"agent: %q is the label of a %s key of %q, which only a rotation makes; to rotate the key: hsmagent keys rotate --label %s",
			label, kind, base, base))
	}
	c.adminMu.Lock()
	defer c.adminMu.Unlock()
	if c.state.Load().keys[label] != nil {
		return nil, a.rid, c.adminFailed(ctx, p, a, AdminExists, Errorf(CodeAlreadyExists,
			"agent: a key labelled %q exists already; choose another label or delete it first", label))
	}
	if a.pub, err = store.Generate(label, kt); err != nil {
		return nil, a.rid, c.storeFailed(ctx, p, a, err)
	}
	if err := c.adminCommit(ctx, p, a); err != nil {
		return nil, a.rid, err
	}
	e := c.state.Load().keys[label]
	if e == nil { // listed under another label: a store that renames
		return nil, a.rid, Errorf(CodeInternal, "agent: key %q was generated but the store does not list it", label)
	}
	return e.proto, a.rid, nil
}

// DeleteKey destroys the key labelled label and its chain, and stops
// serving it at once.
func (c *Core) DeleteKey(ctx context.Context, p Peer, label string) (string, error) {
	a := &adminCall{op: opDelete, label: label}
	store, err := c.adminBegin(ctx, p, a)
	if err != nil {
		return a.rid, err
	}
	c.adminMu.Lock()
	defer c.adminMu.Unlock()
	if e := c.state.Load().keys[label]; e != nil {
		a.pub = e.signer.Public()
	}
	if err := store.Delete(label); err != nil {
		return a.rid, c.storeFailed(ctx, p, a, err)
	}
	return a.rid, c.adminCommit(ctx, p, a)
}

// ImportCertificate stores a certificate and its chain with a key and
// serves them at once (see agentpb.ImportCertificateRequest).
func (c *Core) ImportCertificate(ctx context.Context, p Peer, req *agentpb.ImportCertificateRequest) (*agentpb.ImportCertificateResponse, error) {
	a := &adminCall{op: opImport, label: req.GetLabel()}
	store, err := c.adminBegin(ctx, p, a)
	if err != nil {
		return nil, err
	}
	certs, err := c.adminCertificates(ctx, p, a, req.GetCertificates())
	if err != nil {
		return nil, err
	}
	c.adminMu.Lock()
	defer c.adminMu.Unlock()
	e := c.state.Load().keys[a.label]
	if e == nil {
		return nil, c.adminFailed(ctx, p, a, AdminNotFound, Errorf(CodeNotFound, "agent: no key labelled %q to import a certificate for", a.label))
	}
	prev, err := parseImport(e.proto.CertificateChain)
	if err != nil && len(e.proto.CertificateChain) > 0 {
		return nil, c.adminFailed(ctx, p, a, AdminFailed, Errorf(CodeInternal, "agent: the chain stored with key %q: %v", a.label, err))
	}
	kept, err := c.certify(ctx, p, a, store, a.label, e, certs, prev, req.GetReplaceChain())
	if err != nil {
		return nil, err
	}
	if err := c.adminCommit(ctx, p, a); err != nil {
		return nil, err
	}
	resp := &agentpb.ImportCertificateResponse{PreviousChain: e.proto.CertificateChain, KeptChain: uint32(kept), RequestId: a.rid}
	if now := c.state.Load().keys[a.label]; now != nil {
		resp.Key = now.proto
	}
	return resp, nil
}

// adminCertificates parses the certificates of an import, recording a
// refusal.
func (c *Core) adminCertificates(ctx context.Context, p Peer, a *adminCall, ders [][]byte) ([]*x509.Certificate, error) {
	certs, err := parseImport(ders)
	if err != nil {
		return nil, c.adminFailed(ctx, p, a, AdminInvalid, Errorf(CodeInvalidArgument, "%v", err))
	}
	return certs, nil
}

// certify stores certs (a leaf and its chain, in any order) with the key e
// under label target, keeping the chain prev for a leaf alone when it links
// and replace is false, and returns how many of prev it kept. The record of a
// gets the key's fingerprint and the leaf's serial.
func (c *Core) certify(ctx context.Context, p Peer, a *adminCall, store AdminStore, target string, e *entry, certs, prev []*x509.Certificate, replace bool) (int, error) {
	a.pub = e.signer.Public()
	chain, kept, cerr := c.importChain(target, a.pub, certs, prev, replace)
	if cerr != nil {
		return 0, c.adminFailed(ctx, p, a, AdminInvalid, cerr)
	}
	a.serial, a.chain = chain[0].SerialNumber.Text(16), len(chain)-1
	if err := store.SetChain(target, chain); err != nil {
		return 0, c.storeFailed(ctx, p, a, err)
	}
	return kept, nil
}

func parseImport(ders [][]byte) ([]*x509.Certificate, error) {
	if len(ders) == 0 {
		return nil, errors.New("agent: no certificate to import")
	}
	if len(ders) > maxImport {
		return nil, fmt.Errorf("agent: %d certificates to import; a leaf and its chain are at most %d", len(ders), maxImport)
	}
	certs := make([]*x509.Certificate, 0, len(ders))
	for i, der := range ders {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("agent: certificate %d of %d is not a DER X.509 certificate: %v", i+1, len(ders), err)
		}
		certs = append(certs, cert)
	}
	return certs, nil
}

// importChain orders certs into the chain to store for the key whose
// public key is pub: the given chain, or for a leaf alone the stored
// chain behind it when that still links (kept counts its certificates).
// Certificates out of their validity period are refused.
func (c *Core) importChain(label string, pub crypto.PublicKey, certs, prev []*x509.Certificate, replace bool) ([]*x509.Certificate, int, *Error) {
	chain, err := orderChain(pub, certs)
	if errors.Is(err, errNoLeaf) {
		return nil, 0, Errorf(CodeInvalidArgument, "agent: certificate %q does not belong to key %q: its public key differs", certs[0].Subject, label)
	}
	if err != nil {
		return nil, 0, Errorf(CodeInvalidArgument, "%v", err)
	}
	kept := 0
	if len(chain) == 1 && !replace && len(prev) > 1 {
		withPrev, err := orderChain(pub, append([]*x509.Certificate{chain[0]}, prev[1:]...))
		if err != nil {
			return nil, 0, Errorf(CodeFailedPrecondition,
				"agent: the %d chain certificate(s) stored with key %q do not link to the new certificate (issued by %q); give its chain, or replace the stored one",
				len(prev)-1, label, chain[0].Issuer)
		}
		chain, kept = withPrev, len(withPrev)-1
	}
	now := time.Now()
	for i, cert := range chain {
		what := "certificate"
		if i > 0 {
			what = "chain certificate"
		}
		switch {
		case now.After(cert.NotAfter):
			return nil, 0, Errorf(CodeInvalidArgument, "agent: %s %q expired on %s", what, cert.Subject, cert.NotAfter.UTC().Format(time.DateOnly))
		case now.Before(cert.NotBefore):
			return nil, 0, Errorf(CodeInvalidArgument, "agent: %s %q is not valid before %s", what, cert.Subject, cert.NotBefore.UTC().Format(time.RFC3339))
		}
	}
	return chain, kept, nil
}

var errNoLeaf = errors.New("agent: no certificate carries the key's public key")

// orderChain puts the certificate of pub first, then each one's issuer;
// a certificate that is not on that path is an error.
func orderChain(pub crypto.PublicKey, certs []*x509.Certificate) ([]*x509.Certificate, error) {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	eq, ok := pub.(equaler)
	if !ok {
		return nil, fmt.Errorf("agent: %T keys cannot be compared", pub)
	}
	var leaf *x509.Certificate
	rest := make([]*x509.Certificate, 0, len(certs))
	for _, cert := range certs {
		if leaf == nil && eq.Equal(cert.PublicKey) {
			leaf = cert
			continue
		}
		rest = append(rest, cert)
	}
	if leaf == nil {
		return nil, errNoLeaf
	}
	chain := []*x509.Certificate{leaf}
	for len(rest) > 0 {
		last := chain[len(chain)-1]
		i := slices.IndexFunc(rest, func(cert *x509.Certificate) bool { return last.CheckSignatureFrom(cert) == nil })
		if i < 0 {
			return nil, fmt.Errorf("agent: certificate %q does not sign %q nor any other of the chain; the chain does not link", rest[0].Subject, last.Subject)
		}
		chain = append(chain, rest[i])
		rest = slices.Delete(rest, i, i+1)
	}
	return chain, nil
}

// CreateCSR signs, with the key labelled label, a PKCS #10 request for
// that key with the subject and alternative names of template (a request
// signed by any key). The agent only ever signs a request for the key
// that signs it, with SHA-256.
func (c *Core) CreateCSR(ctx context.Context, p Peer, label string, template []byte) ([]byte, string, error) {
	a := &adminCall{op: opCSR, label: label}
	if _, err := c.adminBegin(ctx, p, a); err != nil {
		return nil, a.rid, err
	}
	tmpl, err := x509.ParseCertificateRequest(template)
	if err != nil {
		return nil, a.rid, c.adminFailed(ctx, p, a, AdminInvalid, Errorf(CodeInvalidArgument, "agent: the CSR template is not a DER PKCS #10 request: %v", err))
	}
	e := c.state.Load().keys[label]
	if e == nil {
		return nil, a.rid, c.adminFailed(ctx, p, a, AdminNotFound, Errorf(CodeNotFound, "agent: no key labelled %q to make a CSR for", label))
	}
	a.pub = e.signer.Public()
	var alg x509.SignatureAlgorithm
	switch a.pub.(type) {
	case *ecdsa.PublicKey:
		alg = x509.ECDSAWithSHA256
	case *rsa.PublicKey:
		alg = x509.SHA256WithRSA
	default:
		return nil, a.rid, c.adminFailed(ctx, p, a, AdminInvalid, Errorf(CodeFailedPrecondition, "agent: key %q: %T keys make no CSR", label, a.pub))
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		RawSubject: tmpl.RawSubject, DNSNames: tmpl.DNSNames, IPAddresses: tmpl.IPAddresses,
		EmailAddresses: tmpl.EmailAddresses, URIs: tmpl.URIs, SignatureAlgorithm: alg,
	}, e.signer)
	if err == nil {
		err = checkCSR(der)
	}
	if err != nil {
		if isKeyChanged(err) {
			c.keyChanged(label, e, err)
		}
		return nil, a.rid, c.adminFailed(ctx, p, a, AdminFailed, storeFailure(fmt.Errorf("agent: signing the CSR of key %q: %w", label, err)))
	}
	if err := c.adminDone(ctx, p, a); err != nil {
		return nil, a.rid, err
	}
	return der, a.rid, nil
}

// checkCSR verifies the request's own signature, so that a faulty HSM
// signature is caught before the CSR is sent to a CA.
func checkCSR(der []byte) error {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return err
	}
	return csr.CheckSignature()
}
