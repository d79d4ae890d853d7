package hsm_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"testing"

	"github.com/hsmagent/hsmagent/hsm"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// TestSignerRefusesReplacedKey deletes a signer's key and generates another
// under the same label through a second Token, as 'hsmagent keys delete' and
// 'keys generate' do while the agent runs: the signer must refuse rather than
// sign with a key whose public half it does not advertise.
func TestSignerRefusesReplacedKey(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := fx.Open(t)
	if _, err := tok.GenerateKey("k", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	s, err := tok.Signer("k")
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("x"))
	if _, err := s.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}

	admin := fx.Open(t)
	if err := admin.DeleteKey("k"); err != nil {
		t.Fatal(err)
	}
	replacement, err := admin.GenerateKey("k", hsm.ECDSAP256, nil)
	if err != nil {
		t.Fatal(err)
	}

	for i := range 2 { // the refusal holds, it is not a one-off
		sig, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
		if err == nil {
			if ecdsa.VerifyASN1(replacement.Public.(*ecdsa.PublicKey), digest[:], sig) {
				t.Fatalf("sign %d: signed with the replacement key while advertising the old one", i)
			}
			t.Fatalf("sign %d: no error", i)
		}
		if !errors.Is(err, hsm.ErrKeyChanged) {
			t.Fatalf("sign %d: %v, want ErrKeyChanged", i, err)
		}
		t.Logf("sign %d: %v", i, err)
	}

	// A new signer serves the new key.
	fresh, err := tok.Signer("k")
	if err != nil {
		t.Fatal(err)
	}
	sig, err := fresh.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(replacement.Public.(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatalf("new signer: %v", err)
	}
}
