package core

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/rotation"
)

// A retired label dated in the future (the clock stepped back after a
// promotion, or a label made by hand) must not sign for the label's
// callers for longer than RetiredKeyGrace, nor hide the key a promotion
// has just retired from the handshakes that hold it.
func TestRetiredKeyDatedInTheFuture(t *testing.T) {
	w := newAdminWorld(t)
	ctx := context.Background()
	policy, err := NewPolicyWithAdmin([]Rule{{Keys: []string{"*"}, Users: []string{"4300"}}}, AdminRule{Groups: []string{"4200"}})
	if err != nil {
		t.Fatal(err)
	}
	future, err := w.store.Generate(rotation.RetiredLabel("web", time.Now().Add(24*time.Hour)), "ecdsa-p256")
	if err != nil {
		t.Fatal(err)
	}
	justRetired, err := w.store.Generate(rotation.RetiredLabel("web", time.Now()), "ecdsa-p256")
	if err != nil {
		t.Fatal(err)
	}
	if err := w.core.Reload(policy); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("handshake transcript"))
	sign := func(keyID []byte) Answer {
		return w.core.Sign(ctx, strangerPeer, &agentpb.SignRequest{Key: "web", Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256, KeyId: keyID})
	}
	if a := sign(keyIDOf(t, future)); CodeOf(a.Err) != CodeFailedPrecondition {
		t.Errorf("signing under \"web\" with a key retired a day from now: %v (%v), want FailedPrecondition: it would sign for a day and a minute", a.Err, a.Outcome)
	}
	if a := sign(keyIDOf(t, justRetired)); a.Err != nil {
		t.Errorf("signing under \"web\" with the key just retired: %v, want a signature (a future-dated label hides it)", a.Err)
	}
}

// Only a rotation makes a successor's or a retired key's label: a key
// generated under one would sign under the label it names (for every
// caller allowed that label, "*" included, within the grace) or be
// promoted without the rotation's checks.
func TestGenerateRefusesRotationLabels(t *testing.T) {
	w := newAdminWorld(t)
	ctx := context.Background()
	for _, label := range []string{rotation.SuccessorLabel("web"), rotation.RetiredLabel("web", time.Now()),
		rotation.RetiredLabel("web", time.Now().Add(time.Hour)), "a/b/successor"} {
		_, _, err := w.core.GenerateKey(ctx, operatorPeer, label, "ecdsa-p256")
		if CodeOf(err) != CodeInvalidArgument {
			t.Errorf("GenerateKey(%q) = %v, want InvalidArgument", label, err)
		}
		if w.core.state.Load().keys[label] != nil {
			t.Errorf("GenerateKey(%q) made the key", label)
		}
	}
	// Labels that only look like a rotation's are labels like any other.
	for _, label := range []string{"web/retired-yesterday", "web/successors", "x/retired-2026"} {
		if _, _, err := w.core.GenerateKey(ctx, operatorPeer, label, "ecdsa-p256"); err != nil {
			t.Errorf("GenerateKey(%q) = %v, want a key", label, err)
		}
	}
}

// hookSigner signs with its key and runs during before it answers.
type hookSigner struct {
	crypto.Signer
	during func()
}

func (h *hookSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	sig, err := h.Signer.Sign(r, digest, opts)
	h.during()
	return sig, err
}

// The sign record names the retired key that signed even when the key
// list changes while it signs (the retired key deleted, as the runbook
// says to do once no one needs it): the record is of the key that signed,
// not of the key list after.
func TestSignRecordNamesTheRetiredKeyThatSigned(t *testing.T) {
	w := newAdminWorld(t)
	ctx := context.Background()
	retiredLabel := rotation.RetiredLabel("web", time.Now())
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	hook := &hookSigner{Signer: key, during: func() {
		if _, err := w.core.DeleteKey(ctx, rootPeer, retiredLabel); err != nil {
			t.Error(err)
		}
	}}
	if err := w.store.Add(retiredLabel, hook, nil); err != nil {
		t.Fatal(err)
	}
	if err := w.core.Reload(nil); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("handshake transcript"))
	a := w.core.Sign(ctx, rootPeer, &agentpb.SignRequest{Key: "web", Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256, KeyId: keyIDOf(t, key.Public())})
	if a.Err != nil {
		t.Fatal(a.Err)
	}
	if !ecdsa.VerifyASN1(&key.PublicKey, digest[:], a.Signature) {
		t.Fatal("not signed by the retired key")
	}
	if rec := w.audit.sign(t, a.RequestID); rec["retired_key"] != retiredLabel {
		t.Errorf("sign record %v: retired_key %v, want %q (the record says the label's key signed)", rec, rec["retired_key"], retiredLabel)
	}
}

// A caller refused a label learns nothing from key_id: a key id that is
// the label's retired key's, a wrong one, a malformed one or none all get
// the answer of a label no key has, and each refusal is recorded.
func TestKeyIDTellsNothingOfRefusedLabels(t *testing.T) {
	w := newAdminWorld(t)
	ctx := context.Background()
	retired, err := w.store.Generate(rotation.RetiredLabel("web", time.Now()), "ecdsa-p256")
	if err != nil {
		t.Fatal(err)
	}
	if err := w.core.Reload(nil); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("x"))
	answer := func(label string, keyID []byte) string {
		a := w.core.Sign(ctx, strangerPeer, &agentpb.SignRequest{Key: label, Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256, KeyId: keyID})
		if a.Signature != nil {
			t.Fatalf("signed %q for a caller no rule allows", label)
		}
		w.audit.sign(t, a.RequestID) // each refusal has its record
		return CodeOf(a.Err).String() + ": " + strings.ReplaceAll(a.Err.(*Error).Msg, label, "L")
	}
	want := answer("nokey", nil)
	for _, keyID := range [][]byte{nil, keyIDOf(t, retired), make([]byte, 8), {1, 2, 3}, make([]byte, 4096)} {
		for _, label := range []string{"web", "nokey"} {
			if got := answer(label, keyID); got != want {
				t.Errorf("%q with key_id %x: %q, want %q", label, keyID, got, want)
			}
		}
	}
}
