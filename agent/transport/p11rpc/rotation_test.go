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
// label, a handle found before signs with the key it named (the key just
// retired, within core.RetiredKeyGrace), a handle found after signs with the
// new key, and once the retired key is deleted the old handle is
// CKR_KEY_HANDLE_INVALID: never a signature by a key the client did not find.
func TestKeyHandleOutlivesPromotion(t *testing.T) {
	a := startAgent(t, nil, Options{})
	ctx := context.Background()
	root := core.Peer{UID: 0, GID: 0, PID: 1}
	// Two clients: one found the key before the rotation and finds no more
	// (as OpenSSL's engine does), the other finds it after.
	c, later := dial(t, a.path, 2), dial(t, a.path, 2)
	s, ls := c.openSession(), later.openSession()
	privateKey := func(c *testClient, s uint64) uint64 {
		return c.find(s, ulongAttr(ckaClass, ckoPrivateKey), bytesAttr(ckaLabel, []byte("ec-key")))[0]
	}
	before := privateKey(c, s)

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
	after := privateKey(later, ls)

	digest := sha256.Sum256([]byte("data"))
	mech := Mechanism{Type: ckmECDSA}
	for _, tc := range []struct {
		name   string
		c      *testClient
		s      uint64
		handle uint64
		pub    crypto.PublicKey
	}{
		{"the handle found before", c, s, before, a.keys["ec-key"].Public()},
		{"the handle found after", later, ls, after, newPub},
	} {
		sig, rv := tc.c.sign(tc.s, tc.handle, mech, digest[:], false)
		if rv != ckrOK {
			t.Fatalf("%s: rv %#x", tc.name, rv)
		}
		verify(t, tc.pub, crypto.SHA256, digest[:], sig, false)
	}
	if !strings.Contains(a.audit.String(), `"retired_key":"`+resp.RetiredLabel+`"`) {
		t.Errorf("no sign record names the retired key %q:\n%s", resp.RetiredLabel, a.audit.String())
	}

	if _, err := a.core.DeleteKey(ctx, root, resp.RetiredLabel); err != nil {
		t.Fatal(err)
	}
	if _, rv := c.sign(s, before, mech, digest[:], false); rv != ckrKeyHandleInvalid {
		t.Fatalf("the deleted key's handle: rv %#x, want CKR_KEY_HANDLE_INVALID", rv)
	}
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
