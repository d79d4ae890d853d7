package p11rpc

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/core"
)

// A key handle names one key. After a rotation promotes another key to its
// label, a handle found before signs with the key it was found for (the key
// just retired, within core.RetiredKeyGrace), even when the same connection
// searches again (a client that finds its certificate again, or a second
// session of the same process): the search adds the new key's handle, it
// does not take the old one away while the retired key may still sign. A
// handle found after signs with the new key, and once the retired key is
// deleted the old handle is CKR_KEY_HANDLE_INVALID: never a signature by a
// key the client did not find.
func TestKeyHandleOutlivesPromotion(t *testing.T) {
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
	if !strings.Contains(a.audit.String(), `"retired_key":"`+resp.RetiredLabel+`"`) {
		t.Errorf("no sign record names the retired key %q:\n%s", resp.RetiredLabel, a.audit.String())
	}
	// A client that found the key only after the promotion signs with the new one.
	later := dial(t, a.path, 2)
	ls := later.openSession()
	h := later.find(ls, ulongAttr(ckaClass, ckoPrivateKey), bytesAttr(ckaLabel, []byte("ec-key")))[0]
	sig, rv = later.sign(ls, h, mech, digest[:], false)
	if rv != ckrOK {
		t.Fatalf("a handle found after the promotion: rv %#x", rv)
	}
	verify(t, newPub, crypto.SHA256, digest[:], sig, false)

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

// issued is a certificate for pub from a throwaway CA.
func issued(t *testing.T, pub crypto.PublicKey) *x509.Certificate {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "CA"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "ec-key"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, leaf, ca, pub, caKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}
