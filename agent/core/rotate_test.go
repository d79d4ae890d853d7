package core

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/rotation"
)

// lastAdminRecord is the last admin record, which must be of op.
func (w *adminWorld) lastAdminRecord(t *testing.T, op string) map[string]any {
	t.Helper()
	recs := w.audit.records(t)
	if len(recs) == 0 {
		t.Fatal("no admin record")
	}
	last := recs[len(recs)-1]
	if last["op"] != op {
		t.Fatalf("last admin record is of %v, want %s: %v", last["op"], op, last)
	}
	return last
}

// publicOf is the public key the store holds under label, nil for none.
func (w *adminWorld) publicOf(t *testing.T, label string) crypto.PublicKey {
	t.Helper()
	s, err := w.store.Signer(label)
	if err != nil {
		return nil
	}
	return s.Public()
}

func protoPublic(t *testing.T, k *agentpb.Key) crypto.PublicKey {
	t.Helper()
	pub, err := x509.ParsePKIXPublicKey(k.GetPublicKey())
	if err != nil {
		t.Fatalf("key %q: %v", k.GetLabel(), err)
	}
	return pub
}

func equalPublic(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && b != nil && e.Equal(b)
}

// TestRotateKey: RotateKey's answers, each with its error code and its
// audit record, run in order on one store ("web", ecdsa-p256).
func TestRotateKey(t *testing.T) {
	w := newAdminWorld(t)
	ctx := context.Background()
	webPub := w.publicOf(t, "web")
	succ := rotation.SuccessorLabel("web")
	var pending crypto.PublicKey // the successor pending after each case

	tests := []struct {
		name, label, keyType string
		replace              bool
		peer                 Peer
		code                 Code
		result               string // the record's
		want                 string
		wantType             string // the successor's type, when made
		dropPending          bool   // the pending successor deleted first
	}{
		{"non-admin", "web", "", false, strangerPeer, CodePermissionDenied, "not-admin", "uid 4300 may not change the agent's keys", "", false},
		{"not found", "nope", "", false, operatorPeer, CodeNotFound, "not-found", `no key labelled "nope" to rotate`, "", false},
		{"a successor label", succ, "", false, operatorPeer, CodeInvalidArgument, "invalid", `key "web/successor" is a successor key`, "", false},
		{"a retired label", "web/retired-20260102T030405Z", "", false, operatorPeer, CodeInvalidArgument, "invalid", "is a retired key", "", false},
		{"too long to retire", strings.Repeat("k", MaxLabel-10), "", false, operatorPeer, CodeInvalidArgument, "invalid", "too long to rotate", "", false},
		{"unknown type", "web", "ed25519", false, operatorPeer, CodeInvalidArgument, "invalid", `unsupported key type "ed25519"`, "", false},
		{"type not given: the current key's", "web", "", false, operatorPeer, CodeOK, "ok", "", "ecdsa-p256", false},
		{"again without replace", "web", "", false, operatorPeer, CodeAlreadyExists, "exists", "has a pending successor already", "", false},
		{"again with replace, type given", "web", "rsa-2048", true, operatorPeer, CodeOK, "ok", "", "rsa-2048", false},
		{"replace with nothing pending is a rotation", "web", "", true, rootPeer, CodeOK, "ok", "", "ecdsa-p256", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.dropPending {
				if err := w.store.Delete(succ); err != nil {
					t.Fatal(err)
				}
				if err := w.core.Reload(nil); err != nil {
					t.Fatal(err)
				}
				pending = nil
			}
			before := w.core.Revision()
			k, rid, err := w.core.RotateKey(ctx, tt.peer, tt.label, tt.keyType, tt.replace)
			if CodeOf(err) != tt.code || (err != nil && (!strings.Contains(err.Error(), tt.want) || RequestIDOf(err) != rid)) || rid == "" {
				t.Fatalf("RotateKey: %v (%v, request %q), want %v %q", err, CodeOf(err), rid, tt.code, tt.want)
			}
			rec := w.lastAdminRecord(t, "rotate-key")
			if rec["key"] != tt.label || rec["result"] != tt.result || rec["code"] != tt.code.String() || rec["request_id"] != rid || rec["uid"] != float64(tt.peer.UID) {
				t.Errorf("record %v", rec)
			}
			// The current key is untouched whatever happens.
			if !equalPublic(w.publicOf(t, "web"), webPub) {
				t.Fatal("RotateKey changed the current key")
			}
			if tt.code != CodeOK {
				if got := w.publicOf(t, succ); (got == nil) != (pending == nil) || (got != nil && !equalPublic(got, pending)) {
					t.Error("a refused RotateKey changed the pending successor")
				}
				if w.core.Revision() != before {
					t.Error("a refused RotateKey changed the revision")
				}
				if _, ok := rec["public_key_sha256"]; ok && tt.code == CodePermissionDenied {
					t.Errorf("the refusal's record names a key: %v", rec)
				}
				return
			}
			pub := protoPublic(t, k)
			if k.GetLabel() != succ || !equalPublic(w.publicOf(t, succ), pub) || equalPublic(pub, webPub) || equalPublic(pub, pending) {
				t.Errorf("successor %q %T, want a new key under %s", k.GetLabel(), pub, succ)
			}
			if rec["key_type"] != tt.wantType || rec["public_key_sha256"] != PublicKeyFingerprint(pub) {
				t.Errorf("record %v, want type %s and the successor's fingerprint", rec, tt.wantType)
			}
			if w.core.Revision() != before+1 {
				t.Errorf("revision %d after %d", w.core.Revision(), before)
			}
			// Listed to admins at once, with no certificate.
			if resp, _, err := w.core.AdminKeys(ctx, rootPeer); err != nil || !hasKey(resp, succ) {
				t.Errorf("AdminKeys lacks %s: %v", succ, err)
			}
			pending = pub
		})
	}
}

// TestRotationKeysNotServedToRules: no pattern ('*', 'web/**') gives its
// users a pending successor or a retired key, to list or to sign with; a
// rule that names their exact labels does.
func TestRotationKeysNotServedToRules(t *testing.T) {
	store := NewMemoryStore()
	for _, l := range []string{"web", "web/retired-20260102T030405Z"} {
		if _, err := store.Generate(l, "ecdsa-p256"); err != nil {
			t.Fatal(err)
		}
	}
	everyKey := Peer{UID: 4300, GID: 4300, PID: 3}
	named := Peer{UID: 4400, GID: 4400, PID: 4}
	below := Peer{UID: 4500, GID: 4500, PID: 5}
	policy, err := NewPolicyWithAdmin([]Rule{{Keys: []string{"*"}, Users: []string{"4300"}},
		{Keys: []string{"web/successor", "web/retired-20260102T030405Z"}, Users: []string{"4400"}}, {Keys: []string{"web/**"}, Users: []string{"4500"}}},
		AdminRule{Groups: []string{"4200"}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(store, Options{Policy: policy, Logger: slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)),
		Audit: slog.New(slog.NewJSONHandler(&syncBuffer{}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	ctx := context.Background()
	if _, _, err := c.RotateKey(ctx, operatorPeer, "web", "", false); err != nil {
		t.Fatal(err)
	}
	digest := make([]byte, 32)
	for _, tt := range []struct {
		peer  Peer
		label string
		want  bool
	}{
		{everyKey, "web", true},
		{everyKey, "web/successor", false},
		{everyKey, "web/retired-20260102T030405Z", false},
		{named, "web", false},
		{named, "web/successor", true},
		{named, "web/retired-20260102T030405Z", true},
		{below, "web/successor", false},
		{below, "web/retired-20260102T030405Z", false},
	} {
		resp, _, err := c.List(ctx, tt.peer)
		if err != nil || hasKey(resp, tt.label) != tt.want {
			t.Errorf("uid %d: %s listed %v, want %v (%v)", tt.peer.UID, tt.label, hasKey(resp, tt.label), tt.want, err)
		}
		a := c.Sign(ctx, tt.peer, &agentpb.SignRequest{Key: tt.label, Digest: digest, Hash: agentpb.Hash_HASH_SHA256})
		if (a.Err == nil) != tt.want || (!tt.want && CodeOf(a.Err) != CodePermissionDenied) {
			t.Errorf("uid %d: signing with %s: %v (%v), want allowed %v", tt.peer.UID, tt.label, a.Err, CodeOf(a.Err), tt.want)
		}
	}
}

// TestPromoteKey: PromoteKey's refusals leave the key and its successor as
// they were, each with its code and record; the promotion then serves the
// successor under the label, its chain kept from the key before, and keeps
// the key before under the retired label.
func TestPromoteKey(t *testing.T) {
	w := newAdminWorld(t)
	ctx := context.Background()
	if _, err := w.store.Generate("lone", "ecdsa-p256"); err != nil { // certified, no successor
		t.Fatal(err)
	}
	if _, err := w.store.Generate("orphan/successor", "ecdsa-p256"); err != nil { // a successor whose key is gone
		t.Fatal(err)
	}
	if err := w.core.Reload(nil); err != nil {
		t.Fatal(err)
	}
	ca, ca2 := newTestCA(t, "CA one"), newTestCA(t, "CA two")
	later := time.Now().Add(12 * time.Hour)
	webPub := w.publicOf(t, "web")
	current := ca.leaf(t, "web", webPub, later)
	if _, err := w.core.ImportCertificate(ctx, rootPeer, &agentpb.ImportCertificateRequest{Label: "web", Certificates: ders(current, ca.cert)}); err != nil {
		t.Fatal(err)
	}
	succ := rotation.SuccessorLabel("web")
	k, _, err := w.core.RotateKey(ctx, rootPeer, "web", "", false)
	if err != nil {
		t.Fatal(err)
	}
	succPub := protoPublic(t, k)
	next := ca.leaf(t, "web next", succPub, later)
	lonePub := w.publicOf(t, "lone")
	orphanPub := w.publicOf(t, "orphan/successor")

	tests := []struct {
		name   string
		peer   Peer
		req    *agentpb.PromoteKeyRequest
		code   Code
		result string
		want   string
	}{
		{"non-admin", strangerPeer, &agentpb.PromoteKeyRequest{Label: "web", Certificates: ders(next)}, CodePermissionDenied, "not-admin", "uid 4300 may not change the agent's keys"},
		{"no key", operatorPeer, &agentpb.PromoteKeyRequest{Label: "nope", Certificates: ders(next)}, CodeNotFound, "not-found", `no key labelled "nope"`},
		{"no successor", operatorPeer, &agentpb.PromoteKeyRequest{Label: "lone", Certificates: ders(ca.leaf(t, "lone", lonePub, later))}, CodeNotFound, "not-found", `key "lone" has no pending successor`},
		{"successor without its key", operatorPeer, &agentpb.PromoteKeyRequest{Label: "orphan", Certificates: ders(ca.leaf(t, "orphan", orphanPub, later))}, CodeNotFound, "not-found", `no key labelled "orphan"`},
		{"a successor label", operatorPeer, &agentpb.PromoteKeyRequest{Label: succ, Certificates: ders(next)}, CodeInvalidArgument, "invalid", "is a successor key"},
		{"the current key's certificate", operatorPeer, &agentpb.PromoteKeyRequest{Label: "web", Certificates: ders(current)}, CodeInvalidArgument, "invalid", `does not belong to key "web/successor"`},
		{"expired", operatorPeer, &agentpb.PromoteKeyRequest{Label: "web", Certificates: ders(ca.leaf(t, "old", succPub, time.Now().Add(-time.Minute)))}, CodeInvalidArgument, "invalid", "expired on"},
		{"not DER", operatorPeer, &agentpb.PromoteKeyRequest{Label: "web", Certificates: [][]byte{[]byte("-----BEGIN CERTIFICATE-----")}}, CodeInvalidArgument, "invalid", "not a DER X.509 certificate"},
		{"none", operatorPeer, &agentpb.PromoteKeyRequest{Label: "web"}, CodeInvalidArgument, "invalid", "no certificate to import"},
		{"leaf of another CA alone", operatorPeer, &agentpb.PromoteKeyRequest{Label: "web", Certificates: ders(ca2.leaf(t, "web", succPub, later))}, CodeFailedPrecondition, "invalid", "do not link to the new certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := w.core.Revision()
			resp, err := w.core.PromoteKey(ctx, tt.peer, tt.req)
			if resp != nil || CodeOf(err) != tt.code || !strings.Contains(err.Error(), tt.want) || RequestIDOf(err) == "" {
				t.Fatalf("PromoteKey: %v, %v (%v), want %v %q", resp, err, CodeOf(err), tt.code, tt.want)
			}
			rec := w.lastAdminRecord(t, "promote-key")
			if rec["key"] != tt.req.Label || rec["result"] != tt.result || rec["code"] != tt.code.String() || rec["request_id"] != RequestIDOf(err) || rec["uid"] != float64(tt.peer.UID) {
				t.Errorf("record %v", rec)
			}
			if _, ok := rec["serial"]; ok {
				t.Errorf("a refused promotion's record names a serial: %v", rec)
			}
			// Nothing lost, nothing changed.
			if !equalPublic(w.publicOf(t, "web"), webPub) || !equalPublic(w.publicOf(t, succ), succPub) ||
				!equalPublic(w.publicOf(t, "lone"), lonePub) || !equalPublic(w.publicOf(t, "orphan/successor"), orphanPub) {
				t.Error("a refused promotion moved a key")
			}
			if w.core.Revision() != before {
				t.Error("a refused promotion changed the revision")
			}
			if got, _, _ := w.core.List(ctx, rootPeer); !servesLeaf(got, "web", current) {
				t.Error("after a refused promotion the agent does not serve the current certificate")
			}
		})
	}

	// The promotion: a leaf alone, the stored chain kept.
	changed := w.core.state.Load().changed
	before := w.core.Revision()
	resp, err := w.core.PromoteKey(ctx, operatorPeer, &agentpb.PromoteKeyRequest{Label: "web", Certificates: ders(next)})
	if err != nil {
		t.Fatalf("PromoteKey: %v", err)
	}
	retired := resp.GetRetiredLabel()
	if base, kind := rotation.Parse(retired); base != "web" || kind != rotation.Retired {
		t.Fatalf("retired label %q", retired)
	}
	if resp.GetKey().GetLabel() != "web" || !equalPublic(protoPublic(t, resp.GetKey()), succPub) || len(resp.GetKey().GetCertificateChain()) != 2 ||
		!bytes.Equal(resp.GetKey().GetCertificateChain()[0], next.Raw) || !bytes.Equal(resp.GetKey().GetCertificateChain()[1], ca.cert.Raw) {
		t.Errorf("promoted key %q, %d certificates; want web, the successor's key, its leaf and the kept CA", resp.GetKey().GetLabel(), len(resp.GetKey().GetCertificateChain()))
	}
	if !equalPublic(w.publicOf(t, "web"), succPub) || !equalPublic(w.publicOf(t, retired), webPub) || w.publicOf(t, succ) != nil {
		t.Error("the store does not hold the successor under web and the key before under the retired label")
	}
	rec := w.lastAdminRecord(t, "promote-key")
	if rec["result"] != "ok" || rec["code"] != "OK" || rec["key"] != "web" || rec["uid"] != float64(operatorPeer.UID) || rec["request_id"] != resp.GetRequestId() ||
		rec["public_key_sha256"] != PublicKeyFingerprint(succPub) || rec["serial"] != next.SerialNumber.Text(16) || rec["chain"] != float64(1) || rec["retired"] != retired {
		t.Errorf("record %v", rec)
	}
	if w.core.Revision() != before+1 {
		t.Errorf("revision %d after %d", w.core.Revision(), before)
	}
	select {
	case <-changed: // watchers are told
	default:
		t.Error("the state a watcher waits on was not replaced")
	}
	got, _, _ := w.core.List(ctx, rootPeer)
	if !servesLeaf(got, "web", next) || hasKey(got, succ) || !hasKey(got, retired) {
		t.Error("the agent does not serve the successor's certificate under web, or still lists the successor")
	}
	if e := w.core.state.Load().keys["web"]; e == nil || !equalPublic(e.signer.Public(), succPub) {
		t.Error("the agent's signer for web is not the successor's")
	}
	// Once promoted, there is no successor to promote again.
	if _, err := w.core.PromoteKey(ctx, operatorPeer, &agentpb.PromoteKeyRequest{Label: "web", Certificates: ders(next)}); CodeOf(err) != CodeNotFound {
		t.Errorf("a second promotion: %v, want NotFound", err)
	}
}

func servesLeaf(resp *agentpb.ListKeysResponse, label string, leaf *x509.Certificate) bool {
	for _, k := range resp.GetKeys() {
		if k.GetLabel() == label {
			return len(k.GetCertificateChain()) > 0 && bytes.Equal(k.GetCertificateChain()[0], leaf.Raw)
		}
	}
	return false
}

// TestPromoteKeyStoreWithoutRotation: a store that cannot promote is
// refused with FailedPrecondition, audited.
func TestPromoteKeyStoreWithoutRotation(t *testing.T) {
	store := adminOnlyStore{NewMemoryStore()}
	if _, err := store.Generate("web", "ecdsa-p256"); err != nil {
		t.Fatal(err)
	}
	audit := &syncBuffer{}
	c, err := New(store, Options{Logger: slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)), Audit: slog.New(slog.NewJSONHandler(audit, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	w := &adminWorld{core: c, audit: audit}
	for _, op := range []string{"rotate-key", "promote-key"} {
		var err error
		if op == "rotate-key" {
			_, _, err = c.RotateKey(context.Background(), rootPeer, "web", "", false)
		} else {
			_, err = c.PromoteKey(context.Background(), rootPeer, &agentpb.PromoteKeyRequest{Label: "web"})
		}
		if CodeOf(err) != CodeFailedPrecondition || !strings.Contains(err.Error(), "cannot rotate keys") {
			t.Errorf("%s: %v (%v)", op, err, CodeOf(err))
		}
		if rec := w.lastAdminRecord(t, op); rec["result"] != "unsupported" || rec["code"] != "FailedPrecondition" {
			t.Errorf("%s record %v", op, rec)
		}
	}
}

// adminOnlyStore is an AdminStore without Promote.
type adminOnlyStore struct{ m *MemoryStore }

func (s adminOnlyStore) Keys() ([]Key, error)                       { return s.m.Keys() }
func (s adminOnlyStore) Signer(label string) (crypto.Signer, error) { return s.m.Signer(label) }
func (s adminOnlyStore) Generate(label string, kt keytype.Type) (crypto.PublicKey, error) {
	return s.m.Generate(label, kt)
}
func (s adminOnlyStore) Delete(label string) error { return s.m.Delete(label) }
func (s adminOnlyStore) SetChain(label string, chain []*x509.Certificate) error {
	return s.m.SetChain(label, chain)
}
