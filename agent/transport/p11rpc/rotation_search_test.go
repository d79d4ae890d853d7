package p11rpc

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"testing"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/core"
)

// A handle found before a promotion signs with the key it was found for
// even when the same connection searches again after the promotion (a
// client that finds its certificate again, or a second session of the
// same process): the search adds the new key's handle, it does not take
// the old one away while the retired key may still sign.
func TestKeyHandleOutlivesPromotionAndASearch(t *testing.T) {
	a := startAgent(t, nil, Options{})
	ctx := context.Background()
	root := core.Peer{UID: 0, GID: 0, PID: 1}
	c := dial(t, a.path, 2)
	s := c.openSession()
	privateKey := func() uint64 {
		return c.find(s, ulongAttr(ckaClass, ckoPrivateKey), bytesAttr(ckaLabel, []byte("ec-key")))[0]
	}
	before := privateKey()
	succ, _, err := a.core.RotateKey(ctx, root, "ec-key", "", false)
	if err != nil {
		t.Fatal(err)
	}
	newPub, err := x509.ParsePKIXPublicKey(succ.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := a.core.PromoteKey(ctx, root, &agentpb.PromoteKeyRequest{Label: "ec-key",
		Certificates: [][]byte{issued(t, newPub).Raw}})
	if err != nil {
		t.Fatal(err)
	}
	after := privateKey() // the same connection searches again
	if after == before {
		t.Fatal("the new key has the old key's handle")
	}
	digest := sha256.Sum256([]byte("data"))
	mech := Mechanism{Type: ckmECDSA}
	sig, rv := c.sign(s, before, mech, digest[:], false)
	if rv != ckrOK {
		t.Fatalf("the handle found before the promotion, after a new search: rv %#x, want CKR_OK (the key just retired signs for a minute)", rv)
	}
	verify(t, a.keys["ec-key"].Public(), crypto.SHA256, digest[:], sig, false)

	// Once the retired key is gone, the handle signs with no key, even
	// after another search.
	if _, err := a.core.DeleteKey(ctx, root, resp.RetiredLabel); err != nil {
		t.Fatal(err)
	}
	privateKey()
	if _, rv := c.sign(s, before, mech, digest[:], false); rv != ckrKeyHandleInvalid {
		t.Fatalf("the deleted key's handle: rv %#x, want CKR_KEY_HANDLE_INVALID", rv)
	}
	sig, rv = c.sign(s, after, mech, digest[:], false)
	if rv != ckrOK {
		t.Fatalf("the new key's handle: rv %#x", rv)
	}
	verify(t, newPub, crypto.SHA256, digest[:], sig, false)
}
