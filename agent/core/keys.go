package core

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"log/slog"
	"sort"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"github.com/hsmagent/hsmagent/agent/rotation"
	"google.golang.org/protobuf/proto"
)

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
	// The newest retired key of each label a rotation promoted a successor
	// to, and when it was retired: it signs for callers that still hold it
	// for RetiredKeyGrace.
	retired map[string]retiredKey
}

type retiredKey struct {
	e  *entry
	at time.Time
}

type entry struct {
	signer    crypto.Signer
	rsaPub    *rsa.PublicKey // nil for EC keys
	proto     *agentpb.Key
	changedAt uint64 // the revision that brought this key or chain
	keyID     []byte // wire.KeyID of the public key
}

// Reload reads the keys and chains again and installs policy (nil keeps the
// current one). On error the previous state stays in force.
func (c *Core) Reload(policy *Policy) error {
	if policy == nil {
		policy = c.state.Load().policy
	}
	return c.load(policy)
}

// Revision counts the reloads that changed a key, a chain or the access rules.
func (c *Core) Revision() uint64 { return c.state.Load().revision }

func (c *Core) load(policy *Policy) error {
	c.reloadMu.Lock()
	defer c.reloadMu.Unlock()
	keys, err := c.store.Keys()
	if err != nil {
		return err
	}
	old := c.state.Load()
	next := &state{policy: policy, keys: make(map[string]*entry, len(keys)), changed: make(chan struct{})}
	for _, k := range keys {
		if k.Label == "" || k.Label == c.auditKey {
			continue // unlabelled objects cannot be asked for; the audit key is the agent's own
		}
		pk, err := keyProto(k)
		if err != nil {
			return err
		}
		e := &entry{proto: pk, keyID: wire.KeyID(pk.PublicKey)}
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
			if e.signer, err = c.store.Signer(k.Label); err != nil {
				return err
			}
		}
		next.keys[k.Label] = e
		next.labels = append(next.labels, k.Label)
	}
	sort.Strings(next.labels)
	next.retired = newestRetired(next.keys, time.Now())
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
	c.state.Store(next)
	if old != nil {
		close(old.changed)
	}
	c.keysLoaded(next)
	c.observer.KeysLoaded(keys)
	return nil
}

// newestRetired finds the newest retired key of each label in keys, of
// those retired by now: a label dated later (a clock that stepped back
// since the promotion, or a label made by hand) would sign for the label's
// callers until its date and a grace after, and hide the key a promotion
// has just retired.
func newestRetired(keys map[string]*entry, now time.Time) map[string]retiredKey {
	retired := map[string]retiredKey{}
	for label, e := range keys {
		base, kind := rotation.Parse(label)
		if kind != rotation.Retired {
			continue
		}
		at, err := rotation.RetiredAt(label)
		if err != nil || at.After(now) {
			continue
		}
		if prev, ok := retired[base]; !ok || at.After(prev.at) {
			retired[base] = retiredKey{e: e, at: at}
		}
	}
	return retired
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

// List answers p's listing of the keys it may use, with the listing's
// request id; the error is an *Error.
func (c *Core) List(ctx context.Context, p Peer) (*agentpb.ListKeysResponse, string, error) {
	rid := newRequestID()
	resp, hidden := c.state.Load().visibleTo(p)
	resp.RequestId = rid
	if err := c.auditList(ctx, EventList, p, rid, len(resp.Keys), hidden); err != nil {
		return nil, rid, auditUnavailable().withID(rid)
	}
	return resp, rid, nil
}

// Watch sends p its key list, then again each time what p sees changes,
// until ctx ends (nil), send fails (its error) or the core drains; the
// core's refusals are *Error.
func (c *Core) Watch(ctx context.Context, p Peer, send func(*agentpb.ListKeysResponse) error) error {
	rid := newRequestID() // one for the watch: its records are its sends
	if why := c.watchers.admit(p.UID); why != withinLimits {
		return c.refuseWatch(ctx, p, rid, why)
	}
	defer c.watchers.release(p.UID)
	sent := false
	var last uint64
	for {
		st := c.state.Load()
		// Only a change in what the caller sees is sent: a reload that
		// changed nothing for it queues nothing, and a watcher that reads
		// slowly gets the latest list when it reads, not every one between.
		if resp, hidden := st.visibleTo(p); !sent || resp.Revision != last {
			if err := c.auditList(ctx, EventWatch, p, rid, len(resp.Keys), hidden); err != nil {
				return auditUnavailable().withID(rid)
			}
			resp.RequestId = rid
			if err := send(resp); err != nil {
				return err
			}
			sent, last = true, resp.Revision
		}
		select {
		case <-st.changed:
		case <-ctx.Done():
			return nil
		case <-c.stopping:
			return &Error{Code: CodeUnavailable, Msg: "agent: shutting down"}
		}
	}
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
func (c *Core) auditList(ctx context.Context, event Event, p Peer, rid string, visible, hidden int) error {
	reason := "ok"
	if hidden > 0 {
		reason = "keys-hidden"
	}
	if c.audit.refusing() {
		return c.audit.refuse() // not even a rationed listing goes unrecorded
	}
	if !c.listings.allow(p.UID, event, reason) {
		return nil
	}
	return c.audit.write(ctx, slog.LevelInfo, event.String(),
		slog.Int("uid", p.UID), slog.Int("gid", p.GID), slog.Int("pid", p.PID),
		slog.Int("visible", visible), slog.Int("hidden", hidden), slog.String("request_id", rid))
}
