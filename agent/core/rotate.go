package core

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/rotation"
)

// RotationStore is an AdminStore that can make a key's successor the key.
type RotationStore interface {
	AdminStore
	// Promote makes the key labelled rotation.SuccessorLabel(label), which
	// has its certificate, the key labelled label, and moves the key before
	// to a retired label, which it returns. A store that fails midway
	// leaves the key before whole under label or the retired label.
	Promote(label string) (retired string, err error)
}

// The rotation's Admin operations, as their audit records name them.
const (
	opRotate  = "rotate-key"
	opPromote = "promote-key"
)

// rotationBegin is adminBegin for the rotation: a store that can promote,
// and a label that can be rotated.
func (c *Core) rotationBegin(ctx context.Context, p Peer, a *adminCall) (RotationStore, error) {
	store, err := c.adminBegin(ctx, p, a)
	if err != nil {
		return nil, err
	}
	rs, ok := store.(RotationStore)
	if !ok {
		return nil, c.adminFailed(ctx, p, a, AdminUnsupported,
			Errorf(CodeFailedPrecondition, "agent: this agent's key store cannot rotate keys"))
	}
	if err := rotation.CheckRotatable(a.label); err != nil {
		return nil, c.adminFailed(ctx, p, a, AdminInvalid, Errorf(CodeInvalidArgument, "agent: %v", err))
	}
	return rs, nil
}

// RotateKey generates the successor of the key labelled label, of keyType
// (the current key's when empty), under rotation.SuccessorLabel(label):
// listed to admins, but matched by no access rule's '*', so nobody signs
// with it before it is promoted. A pending successor is replaced only with
// replace.
func (c *Core) RotateKey(ctx context.Context, p Peer, label, keyType string, replace bool) (*agentpb.Key, string, error) {
	a := &adminCall{op: opRotate, label: label, keyType: keyType}
	store, err := c.rotationBegin(ctx, p, a)
	if err != nil {
		return nil, a.rid, err
	}
	c.adminMu.Lock()
	defer c.adminMu.Unlock()
	st := c.state.Load()
	cur := st.keys[label]
	if cur == nil {
		return nil, a.rid, c.adminFailed(ctx, p, a, AdminNotFound, Errorf(CodeNotFound,
			"agent: no key labelled %q to rotate; 'hsmagent keys list' shows the keys", label))
	}
	kt := keytype.Of(cur.signer.Public())
	if keyType != "" {
		if kt, err = keytype.Parse(keyType); err != nil {
			return nil, a.rid, c.adminFailed(ctx, p, a, AdminInvalid, Errorf(CodeInvalidArgument, "agent: %v", err))
		}
	}
	if kt == "" {
		return nil, a.rid, c.adminFailed(ctx, p, a, AdminInvalid, Errorf(CodeInvalidArgument,
			"agent: key %q is of a type hsmagent does not generate; give the successor's with --type", label))
	}
	a.keyType = string(kt)
	succ := rotation.SuccessorLabel(label)
	if st.keys[succ] != nil {
		if !replace {
			return nil, a.rid, c.adminFailed(ctx, p, a, AdminExists, Errorf(CodeAlreadyExists,
				"agent: key %q has a pending successor already; finish with 'hsmagent csr --key %s --successor' and 'hsmagent cert import --key %s --successor', or start again with 'hsmagent keys rotate --label %s --replace'",
				label, label, label, label))
		}
		if err := store.Delete(succ); err != nil {
			return nil, a.rid, c.storeFailed(ctx, p, a, err)
		}
	}
	if a.pub, err = store.Generate(succ, kt); err != nil {
		return nil, a.rid, c.storeFailed(ctx, p, a, err)
	}
	if err := c.adminCommit(ctx, p, a); err != nil {
		return nil, a.rid, err
	}
	e := c.state.Load().keys[succ]
	if e == nil {
		return nil, a.rid, Errorf(CodeInternal, "agent: the successor %q was generated but the store does not list it", succ)
	}
	return e.proto, a.rid, nil
}

// PromoteKey stores a certificate and chain with the successor of the key
// labelled label (as ImportCertificate does, the chain stored with the
// current key kept for a leaf alone when it links), then promotes it: one
// reload later, new signatures and handshakes under label use the successor,
// while signatures begun before finish on the key before, whose signer they
// hold. WatchKeys watchers are told by the reload.
func (c *Core) PromoteKey(ctx context.Context, p Peer, req *agentpb.PromoteKeyRequest) (*agentpb.PromoteKeyResponse, error) {
	a := &adminCall{op: opPromote, label: req.GetLabel()}
	store, err := c.rotationBegin(ctx, p, a)
	if err != nil {
		return nil, err
	}
	certs, err := c.adminCertificates(ctx, p, a, req.GetCertificates())
	if err != nil {
		return nil, err
	}
	c.adminMu.Lock()
	defer c.adminMu.Unlock()
	st := c.state.Load()
	succ := rotation.SuccessorLabel(a.label)
	cur, se := st.keys[a.label], st.keys[succ]
	switch {
	case cur == nil:
		return nil, c.adminFailed(ctx, p, a, AdminNotFound, Errorf(CodeNotFound, "agent: no key labelled %q to promote a successor to", a.label))
	case se == nil:
		return nil, c.adminFailed(ctx, p, a, AdminNotFound, Errorf(CodeNotFound,
			"agent: key %q has no pending successor; make one with 'hsmagent keys rotate --label %s'", a.label, a.label))
	}
	prev, _ := parseImport(cur.proto.CertificateChain) // a chain that does not parse is not kept
	if _, err := c.certify(ctx, p, a, store, succ, se, certs, prev, req.GetReplaceChain()); err != nil {
		return nil, err
	}
	if a.retired, err = store.Promote(a.label); err != nil {
		return nil, c.storeFailed(ctx, p, a, err)
	}
	if err := c.adminCommit(ctx, p, a); err != nil {
		return nil, err
	}
	resp := &agentpb.PromoteKeyResponse{RetiredLabel: a.retired, RequestId: a.rid}
	if now := c.state.Load().keys[a.label]; now != nil {
		resp.Key = now.proto
	}
	return resp, nil
}

var _ RotationStore = (*MemoryStore)(nil)

// Promote implements RotationStore, all at once under the store's lock.
func (m *MemoryStore) Promote(label string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	succ := rotation.SuccessorLabel(label)
	s, cur := m.keys[succ], m.keys[label]
	switch {
	case s == nil:
		return "", fmt.Errorf("agent: key %q has no successor: %w", label, ErrKeyNotFound)
	case cur == nil:
		return "", fmt.Errorf("agent: key %q: %w", label, ErrKeyNotFound)
	case len(s.chain) == 0:
		return "", errors.New("agent: the successor of key " + label + " has no certificate")
	}
	retired := rotation.RetiredLabel(label, time.Now())
	if m.keys[retired] != nil {
		return "", fmt.Errorf("agent: the retired label %q is taken: a key of %q was retired in this same second; run the import again", retired, label)
	}
	m.keys[retired], m.keys[label] = cur, s
	delete(m.keys, succ)
	return retired, nil
}
