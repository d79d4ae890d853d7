// Package storetest is the contract suite for server.KeyStore: every
// implementation runs it, the in-memory store always and the PKCS#11 token
// wherever SoftHSM is installed, so that the agent's own tests can run on the
// in-memory store and still speak for the token.
package storetest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
)

// Store is a KeyStore the suite can fill: the contract itself only reads.
type Store interface {
	server.KeyStore
	// Generate creates a key of type kt under label.
	Generate(label string, kt keytype.Type) (crypto.PublicKey, error)
	// SetChain stores a certificate chain (leaf first) with the key labelled label.
	SetChain(label string, chain []*x509.Certificate) error
	// Delete removes the key labelled label and its chain.
	Delete(label string) error
}

// Run runs the suite; newStore returns an empty store for each subtest.
func Run(t *testing.T, newStore func(t *testing.T) Store) {
	t.Run("Empty", func(t *testing.T) { testEmpty(t, newStore(t)) })
	t.Run("ListsGeneratedKeys", func(t *testing.T) { testLists(t, newStore(t)) })
	t.Run("SignaturesVerify", func(t *testing.T) { testSignatures(t, newStore(t)) })
	t.Run("UnknownLabel", func(t *testing.T) { testUnknown(t, newStore(t)) })
	t.Run("DuplicateLabelRefused", func(t *testing.T) { testDuplicate(t, newStore(t)) })
	t.Run("Chains", func(t *testing.T) { testChains(t, newStore(t)) })
	t.Run("Delete", func(t *testing.T) { testDelete(t, newStore(t)) })
	t.Run("ConcurrentSigners", func(t *testing.T) { testConcurrent(t, newStore(t)) })
	t.Run("ReplacedKeyNeverSignsForOldSigner", func(t *testing.T) { testReplaced(t, newStore(t)) })
}

// types are the key types the suite generates: RSA 3072/4096 add only
// generation time on SoftHSM, not coverage.
var types = []keytype.Type{keytype.ECDSAP256, keytype.ECDSAP384, keytype.RSA2048}

func generate(t *testing.T, s Store, label string, kt keytype.Type) crypto.PublicKey {
	t.Helper()
	pub, err := s.Generate(label, kt)
	if err != nil {
		t.Fatalf("generating %s key %q: %v", kt, label, err)
	}
	if got := keytype.Of(pub); got != kt {
		t.Fatalf("generated %q: public key is %q, want %q", label, got, kt)
	}
	return pub
}

func keys(t *testing.T, s Store) map[string]server.Key {
	t.Helper()
	list, err := s.Keys()
	if err != nil {
		t.Fatalf("Keys: %v", err)
	}
	out := make(map[string]server.Key, len(list))
	for _, k := range list {
		if _, dup := out[k.Label]; dup {
			t.Errorf("Keys lists %q twice", k.Label)
		}
		out[k.Label] = k
	}
	return out
}

func testEmpty(t *testing.T, s Store) {
	if got := keys(t, s); len(got) != 0 {
		t.Errorf("a new store lists %d keys", len(got))
	}
}

func testLists(t *testing.T, s Store) {
	want := map[string]crypto.PublicKey{}
	for _, kt := range types {
		want[string(kt)] = generate(t, s, string(kt), kt)
	}
	got := keys(t, s)
	if len(got) != len(want) {
		t.Fatalf("Keys lists %d keys, want %d", len(got), len(want))
	}
	for label, pub := range want {
		k, ok := got[label]
		switch {
		case !ok:
			t.Errorf("%q not listed", label)
		case !equalPublic(k.Public, pub):
			t.Errorf("%q: listed public key differs from the generated one", label)
		case len(k.Chain) != 0:
			t.Errorf("%q: a new key lists %d certificates", label, len(k.Chain))
		}
		signer, err := s.Signer(label)
		if err != nil {
			t.Fatalf("Signer(%q): %v", label, err)
		}
		if !equalPublic(signer.Public(), pub) {
			t.Errorf("Signer(%q).Public differs from the listed key", label)
		}
	}
}

func testSignatures(t *testing.T, s Store) {
	for _, kt := range types {
		generate(t, s, string(kt), kt)
		signer, err := s.Signer(string(kt))
		if err != nil {
			t.Fatal(err)
		}
		for _, opts := range signerOpts(kt) {
			t.Run(fmt.Sprintf("%s/%s", kt, describe(opts)), func(t *testing.T) {
				digest := digestFor(opts.HashFunc())
				sig, err := signer.Sign(rand.Reader, digest, opts)
				if err != nil {
					t.Fatalf("Sign: %v", err)
				}
				if err := verify(signer.Public(), digest, sig, opts); err != nil {
					t.Errorf("signature does not verify: %v", err)
				}
			})
		}
	}
}

func signerOpts(kt keytype.Type) []crypto.SignerOpts {
	hashes := []crypto.Hash{crypto.SHA256, crypto.SHA384, crypto.SHA512}
	var out []crypto.SignerOpts
	for _, h := range hashes {
		out = append(out, h)
		if kt.IsRSA() {
			out = append(out,
				&rsa.PSSOptions{Hash: h, SaltLength: rsa.PSSSaltLengthEqualsHash},
				&rsa.PSSOptions{Hash: h, SaltLength: rsa.PSSSaltLengthAuto},
				&rsa.PSSOptions{Hash: h, SaltLength: 20})
		}
	}
	return out
}

func describe(opts crypto.SignerOpts) string {
	if pss, ok := opts.(*rsa.PSSOptions); ok {
		return fmt.Sprintf("PSS-%v-salt%d", pss.Hash, pss.SaltLength)
	}
	return opts.HashFunc().String()
}

func digestFor(h crypto.Hash) []byte {
	switch h {
	case crypto.SHA384:
		d := sha512.Sum384([]byte("hsmagent"))
		return d[:]
	case crypto.SHA512:
		d := sha512.Sum512([]byte("hsmagent"))
		return d[:]
	}
	d := sha256.Sum256([]byte("hsmagent"))
	return d[:]
}

func verify(pub crypto.PublicKey, digest, sig []byte, opts crypto.SignerOpts) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(k, digest, sig) {
			return errors.New("ECDSA verification failed")
		}
		return nil
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			return rsa.VerifyPSS(k, pss.Hash, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
		}
		return rsa.VerifyPKCS1v15(k, opts.HashFunc(), digest, sig)
	}
	return fmt.Errorf("unexpected key type %T", pub)
}

func testUnknown(t *testing.T, s Store) {
	generate(t, s, "present", keytype.ECDSAP256)
	if _, err := s.Signer("absent"); !errors.Is(err, server.ErrKeyNotFound) {
		t.Errorf("Signer(absent) = %v, want an error matching server.ErrKeyNotFound", err)
	}
}

func testDuplicate(t *testing.T, s Store) {
	pub := generate(t, s, "once", keytype.ECDSAP256)
	if _, err := s.Generate("once", keytype.ECDSAP256); err == nil {
		t.Error("a second key with the same label was accepted")
	}
	if k := keys(t, s)["once"]; !equalPublic(k.Public, pub) {
		t.Error("the refused duplicate replaced the first key")
	}
}

func testChains(t *testing.T, s Store) {
	generate(t, s, "leaf", keytype.ECDSAP256)
	signer, err := s.Signer("leaf")
	if err != nil {
		t.Fatal(err)
	}
	first := selfSigned(t, signer, "first")
	if err := s.SetChain("leaf", []*x509.Certificate{first}); err != nil {
		t.Fatalf("SetChain: %v", err)
	}
	if k := keys(t, s)["leaf"]; len(k.Chain) != 1 || !k.Chain[0].Equal(first) {
		t.Fatalf("chain after SetChain: %d certificates", len(k.Chain))
	}
	second := selfSigned(t, signer, "second")
	if err := s.SetChain("leaf", []*x509.Certificate{second}); err != nil {
		t.Fatalf("SetChain again: %v", err)
	}
	if k := keys(t, s)["leaf"]; len(k.Chain) != 1 || !k.Chain[0].Equal(second) {
		t.Errorf("a replaced chain is not the new one")
	}
}

// selfSigned makes a certificate signed by the store's own signer: proof
// that the signer works for x509 as well as for raw digests.
func selfSigned(t *testing.T, signer crypto.Signer, cn string) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, signer.Public(), signer)
	if err != nil {
		t.Fatalf("self-signing with the store's signer: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature); err != nil {
		t.Fatalf("self-signed certificate does not verify: %v", err)
	}
	return cert
}

func testDelete(t *testing.T, s Store) {
	generate(t, s, "gone", keytype.ECDSAP256)
	generate(t, s, "kept", keytype.ECDSAP256)
	if err := s.Delete("gone"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	got := keys(t, s)
	if _, ok := got["gone"]; ok {
		t.Error("a deleted key is still listed")
	}
	if _, ok := got["kept"]; !ok {
		t.Error("deleting one key removed another")
	}
	if _, err := s.Signer("gone"); !errors.Is(err, server.ErrKeyNotFound) {
		t.Errorf("Signer of a deleted key = %v, want ErrKeyNotFound", err)
	}
}

func testConcurrent(t *testing.T, s Store) {
	generate(t, s, "ec", keytype.ECDSAP256)
	signer, err := s.Signer("ec")
	if err != nil {
		t.Fatal(err)
	}
	digest := digestFor(crypto.SHA256)
	var wg sync.WaitGroup
	errs := make(chan error, 8*25)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 25 {
				sig, err := signer.Sign(rand.Reader, digest, crypto.SHA256)
				if err == nil {
					err = verify(signer.Public(), digest, sig, crypto.SHA256)
				}
				if err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent signature: %v", err)
	}
}

// testReplaced deletes a key and generates another under the same label: a
// signer obtained before may keep signing with its own key or refuse with a
// server.KeyChangedError, but never sign with the new key.
func testReplaced(t *testing.T, s Store) {
	oldPub := generate(t, s, "swap", keytype.ECDSAP256)
	signer, err := s.Signer("swap")
	if err != nil {
		t.Fatal(err)
	}
	digest := digestFor(crypto.SHA256)
	if _, err := signer.Sign(rand.Reader, digest, crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("swap"); err != nil {
		t.Fatal(err)
	}
	newPub := generate(t, s, "swap", keytype.ECDSAP256)
	for i := range 2 {
		sig, err := signer.Sign(rand.Reader, digest, crypto.SHA256)
		var kc server.KeyChangedError
		switch {
		case err == nil && verify(newPub, digest, sig, crypto.SHA256) == nil:
			t.Fatalf("sign %d: the old signer signed with the new key", i)
		case err == nil && verify(oldPub, digest, sig, crypto.SHA256) != nil:
			t.Fatalf("sign %d: the old signer's signature verifies with neither key", i)
		case err != nil && (!errors.As(err, &kc) || !kc.KeyChanged()):
			t.Fatalf("sign %d: %v; want a signature by the old key or a KeyChangedError", i, err)
		}
	}
	fresh, err := s.Signer("swap")
	if err != nil {
		t.Fatal(err)
	}
	if !equalPublic(fresh.Public(), newPub) {
		t.Error("a new signer does not serve the new key")
	}
	sig, err := fresh.Sign(rand.Reader, digest, crypto.SHA256)
	if err == nil {
		err = verify(newPub, digest, sig, crypto.SHA256)
	}
	if err != nil {
		t.Errorf("new signer: %v", err)
	}
}

func equalPublic(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}
