package core

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"github.com/hsmagent/hsmagent/agent/rotation"
)

func keyIDOf(t *testing.T, pub crypto.PublicKey) []byte {
	t.Helper()
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return wire.KeyID(spki)
}

// A handshake that presented the chain of a key a promotion has just
// retired must be signed by that key (SignRequest.key_id), or it fails on
// the peer; a key retired longer ago, or one the label never had, is
// refused rather than signed with the label's other key.
func TestSignWithTheKeyTheCallerHolds(t *testing.T) {
	w := newAdminWorld(t)
	ctx := context.Background()
	ca := newTestCA(t, "CA")
	before := w.core.state.Load().keys["web"].signer.Public()
	if _, err := w.core.ImportCertificate(ctx, rootPeer, &agentpb.ImportCertificateRequest{Label: "web",
		Certificates: ders(ca.leaf(t, "web", before, time.Now().Add(time.Hour)))}); err != nil {
		t.Fatal(err)
	}
	succ, _, err := w.core.RotateKey(ctx, rootPeer, "web", "", false)
	if err != nil {
		t.Fatal(err)
	}
	after, err := x509.ParsePKIXPublicKey(succ.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.core.PromoteKey(ctx, rootPeer, &agentpb.PromoteKeyRequest{Label: "web",
		Certificates: ders(ca.leaf(t, "web", after, time.Now().Add(time.Hour)))}); err != nil {
		t.Fatal(err)
	}
	// A label whose retired key was retired longer ago than the grace.
	if _, err := w.store.Generate("old", "ecdsa-p256"); err != nil {
		t.Fatal(err)
	}
	longAgo := rotation.RetiredLabel("old", time.Now().Add(-RetiredKeyGrace-time.Minute))
	oldPub, err := w.store.Generate(longAgo, "ecdsa-p256")
	if err != nil {
		t.Fatal(err)
	}
	// And one whose retired label is dated in the future: made by hand, not by a promotion.
	if _, err := w.store.Generate("later", "ecdsa-p256"); err != nil {
		t.Fatal(err)
	}
	laterPub, err := w.store.Generate(rotation.RetiredLabel("later", time.Now().Add(time.Hour)), "ecdsa-p256")
	if err != nil {
		t.Fatal(err)
	}
	if err := w.core.Reload(nil); err != nil {
		t.Fatal(err)
	}

	digest := sha256.Sum256([]byte("handshake transcript"))
	for _, tt := range []struct {
		name     string
		label    string
		keyID    []byte
		verifies crypto.PublicKey // nil: refused with code
		code     Code
	}{
		{"no key id: the label's key", "web", nil, after, CodeOK},
		{"the label's key named", "web", keyIDOf(t, after), after, CodeOK},
		{"the key just retired named", "web", keyIDOf(t, before), before, CodeOK},
		{"a key the label never had", "web", keyIDOf(t, oldPub), nil, CodeFailedPrecondition},
		{"a key retired past the grace", "old", keyIDOf(t, oldPub), nil, CodeFailedPrecondition},
		{"a key retired in the future", "later", keyIDOf(t, laterPub), nil, CodeFailedPrecondition},
		{"a key id of the wrong length", "web", []byte{1, 2, 3}, nil, CodeInvalidArgument},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a := w.core.Sign(ctx, rootPeer, &agentpb.SignRequest{Key: tt.label, Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256, KeyId: tt.keyID})
			if tt.verifies == nil {
				ce, ok := a.Err.(*Error)
				if !ok || ce.Code != tt.code {
					t.Fatalf("Sign = %v (%v), want code %v", a.Err, a.Outcome, tt.code)
				}
				return
			}
			if a.Err != nil {
				t.Fatalf("Sign: %v", a.Err)
			}
			if !ecdsa.VerifyASN1(tt.verifies.(*ecdsa.PublicKey), digest[:], a.Signature) {
				t.Fatal("the signature does not verify under the key the caller holds")
			}
			// The record names the retired key when it signed, and only then.
			rec := w.audit.sign(t, a.RequestID)
			retired, _ := rec["retired_key"].(string)
			if want := tt.verifies == before; want != strings.HasPrefix(retired, "web/retired-") || (!want && retired != "") {
				t.Errorf("sign record %v: retired_key %q, want one: %v", rec, retired, want)
			}
		})
	}
}

// sign is the sign record of request rid.
func (s *syncBuffer) sign(t *testing.T, rid string) map[string]any {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, line := range strings.Split(strings.TrimSpace(s.b.String()), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "sign" && m["request_id"] == rid {
			return m
		}
	}
	t.Fatalf("no sign record of request %s", rid)
	return nil
}
