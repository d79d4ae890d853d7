package server_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// relabelingStore finds the key by label at every signature, as the PKCS#11
// token does after a reopen, and refuses with a KeyChanged error when the
// label names another key than the signer's: what hsm's signer does, without
// cgo. (The same against SoftHSM is in softhsm-test.)
type relabelingStore struct{ *server.MemoryStore }

func (s relabelingStore) Signer(label string) (crypto.Signer, error) {
	inner, err := s.MemoryStore.Signer(label)
	if err != nil {
		return nil, err
	}
	return &relabelingSigner{store: s.MemoryStore, label: label, public: inner.Public(), id: memID(s.MemoryStore, label)}, nil
}

func memID(m *server.MemoryStore, label string) string {
	keys, _ := m.Keys()
	for _, k := range keys {
		if k.Label == label {
			return string(k.ID)
		}
	}
	return ""
}

type relabelingSigner struct {
	store  *server.MemoryStore
	label  string
	public crypto.PublicKey
	id     string
}

func (s *relabelingSigner) Public() crypto.PublicKey { return s.public }

func (s *relabelingSigner) Sign(r io.Reader, d []byte, o crypto.SignerOpts) ([]byte, error) {
	cur, err := s.store.Signer(s.label)
	if err != nil {
		return nil, err
	}
	if !cur.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(s.public) || memID(s.store, s.label) != s.id {
		return nil, keyChangedErr(s.label)
	}
	return cur.Sign(r, d, o)
}

type keyChangedErr string

func (e keyChangedErr) Error() string    { return fmt.Sprintf("test: key %q replaced", string(e)) }
func (e keyChangedErr) KeyChanged() bool { return true }

// TestReplacedKeyRefusedThenServed: after the key under a label is replaced
// in the store, the agent refuses with FailedPrecondition (audited
// key-changed, logged once) instead of signing with a key it does not
// advertise, reloads by itself, tells WatchKeys clients, and signs with the
// new key from then on.
func TestReplacedKeyRefusedThenServed(t *testing.T) {
	mem := newMemStore(t)
	audit, logs := &auditBuffer{}, &auditBuffer{}
	a := agenttest.Start(t, relabelingStore{mem}, server.Options{
		Audit: slog.New(slog.NewTextHandler(audit, nil)), Logger: slog.New(slog.NewTextHandler(logs, nil))})
	api, _ := rawClient(t, a.Socket)
	ctx := context.Background()
	digest := sha256.Sum256([]byte("x"))
	req := &agentpb.SignRequest{Key: "ec", Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256}
	if _, err := api.Sign(ctx, req); err != nil {
		t.Fatal(err)
	}
	watch, err := api.WatchKeys(ctx, &agentpb.WatchKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := watch.Recv()
	if err != nil {
		t.Fatal(err)
	}

	if err := mem.Delete("ec"); err != nil {
		t.Fatal(err)
	}
	newPub, err := mem.Generate("ec", keytype.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}

	// Concurrent callers: each is refused or, once the reload is in, served
	// by the new key; the change is logged once.
	var wg sync.WaitGroup
	var mu sync.Mutex
	codesSeen := map[codes.Code]int{}
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := api.Sign(ctx, req)
			mu.Lock()
			codesSeen[status.Code(err)]++
			mu.Unlock()
			if err == nil && !ecdsa.VerifyASN1(newPub.(*ecdsa.PublicKey), digest[:], resp.Signature) {
				t.Error("a signature does not verify with the new key")
			}
			if status.Code(err) == codes.FailedPrecondition && !containsAll(status.Convert(err).Message(), `key "ec" was replaced`, "ListKeys or WatchKeys") {
				t.Errorf("refusal says %q", status.Convert(err).Message())
			}
		}()
	}
	wg.Wait()
	if codesSeen[codes.FailedPrecondition] == 0 || codesSeen[codes.FailedPrecondition]+codesSeen[codes.OK] != 16 {
		t.Fatalf("codes after the swap: %v, want FailedPrecondition (and OK after the reload)", codesSeen)
	}

	// The reload reaches WatchKeys with the new public key.
	next, err := watch.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if next.Revision <= first.Revision {
		t.Errorf("revision %d after the swap, was %d", next.Revision, first.Revision)
	}
	spki, _ := x509.MarshalPKIXPublicKey(newPub)
	var advertised bool
	for _, k := range next.Keys {
		advertised = advertised || (k.Label == "ec" && string(k.PublicKey) == string(spki))
	}
	if !advertised {
		t.Error("WatchKeys does not advertise the new key")
	}
	resp, err := api.Sign(ctx, req)
	if err != nil || !ecdsa.VerifyASN1(newPub.(*ecdsa.PublicKey), digest[:], resp.Signature) {
		t.Fatalf("sign after the reload: %v", err)
	}

	if n := audit.count("result=key-changed"); n != codesSeen[codes.FailedPrecondition] {
		t.Errorf("%d key-changed audit records for %d refusals", n, codesSeen[codes.FailedPrecondition])
	}
	waitFor(t, func() bool { return logs.count("keys reloaded after a key change") >= 1 })
	if n := logs.count("a key was replaced"); n != 1 {
		t.Errorf("the change was logged %d times, want once", n)
	}
}

func containsAll(s string, subs ...string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

// TestSameKeyNewIDServedAfterReload: the same key pair stored again under a
// new id is another object; the old signer refuses it, and the reload must
// replace that signer even though the public key did not change.
func TestSameKeyNewIDServedAfterReload(t *testing.T) {
	mem := newMemStore(t)
	a := agenttest.Start(t, relabelingStore{mem}, server.Options{})
	api, _ := rawClient(t, a.Socket)
	ctx := context.Background()
	digest := sha256.Sum256([]byte("x"))
	req := &agentpb.SignRequest{Key: "ec", Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256}
	key, err := mem.Signer("ec")
	if err != nil {
		t.Fatal(err)
	}
	if err := mem.Delete("ec"); err != nil {
		t.Fatal(err)
	}
	if err := mem.Add("ec", key, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := api.Sign(ctx, req); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("sign after the id changed: %v, want FailedPrecondition", err)
	}
	waitFor(t, func() bool {
		_, err := api.Sign(ctx, req)
		return err == nil
	})
}
