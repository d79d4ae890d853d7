package softhsmtest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hsmagent/hsmagent/agent"
)

// A TLS handshake that fetched a key's chain before a promotion and signs
// after it must be signed by the key of the chain it presented, or the peer
// refuses it: the agent process signs for the retired key for a grace after
// the promotion, while new handshakes get the new key. A plain Signer, which
// names no key, follows the label.
func TestHandshakeAcrossPromotionSignsWithItsKey(t *testing.T) {
	a := startAdminAgent(t)
	ctx, client := a.dial(t)
	const label = "web"
	thales := NewCAWithIntermediate(t, "Test Thales")
	mustRun := func(args ...string) {
		t.Helper()
		if r := a.run(t, args...); r.code != 0 {
			t.Fatalf("hsmagent %s: exit %d\n%s", strings.Join(args, " "), r.code, r.stderr)
		}
	}
	certify := func(name string, csrArgs ...string) string {
		csr := filepath.Join(a.dir, name+".csr")
		mustRun(append(csrArgs, "--out", csr)...)
		return writePEM(t, filepath.Join(a.dir, name+".crt"), thales.SignCSR(t, readCSR(t, csr)))
	}
	mustRun("keys", "generate", "--label", label, "--type", "ecdsa-p256")
	first := certify("first", "csr", "--key", label, "--subject", "CN=web.example")
	mustRun("cert", "import", "--key", label, "--cert", first, "--chain", writePEM(t, filepath.Join(a.dir, "chain.pem"), thales.Intermediate))

	// The handshake begins: it has the chain (and signer) of the key before.
	begun, err := client.TLSCertificate(ctx, label)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := client.Signer(ctx, label)
	if err != nil {
		t.Fatal(err)
	}
	oldPub := begun.Leaf.PublicKey.(*ecdsa.PublicKey)

	mustRun("keys", "rotate", "--label", label)
	next := certify("next", "csr", "--key", label, "--successor")
	mustRun("cert", "import", "--key", label, "--successor", "--cert", next)

	fresh, err := client.TLSCertificate(ctx, label)
	if err != nil {
		t.Fatal(err)
	}
	newPub := fresh.Leaf.PublicKey.(*ecdsa.PublicKey)
	if newPub.Equal(oldPub) {
		t.Fatal("the promotion left the key before serving")
	}
	digest := sha256.Sum256([]byte("CertificateVerify"))
	sign := func(s crypto.Signer) []byte {
		t.Helper()
		sig, err := s.Sign(nil, digest[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("signing: %v", err)
		}
		return sig
	}
	if !ecdsa.VerifyASN1(oldPub, digest[:], sign(begun.PrivateKey.(crypto.Signer))) {
		t.Error("the handshake begun before the promotion was signed by another key than its certificate's")
	}
	if !ecdsa.VerifyASN1(newPub, digest[:], sign(fresh.PrivateKey.(crypto.Signer))) {
		t.Error("a handshake begun after the promotion was not signed by the new key")
	}
	if !ecdsa.VerifyASN1(newPub, digest[:], sign(plain)) {
		t.Error("a plain Signer does not follow the label to the new key")
	}

	// Once the retired key is deleted, the stale chain's signer is refused
	// with an error that says what happened, not signed with the new key.
	keys, err := client.AdminKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	retired := ""
	for _, k := range keys {
		if strings.HasPrefix(k.Label, label+"/retired-") {
			retired = k.Label
		}
	}
	if retired == "" {
		t.Fatalf("no retired key of %q among %v", label, keys)
	}
	if err := client.DeleteKey(ctx, retired); err != nil {
		t.Fatal(err)
	}
	_, err = begun.PrivateKey.(crypto.Signer).Sign(nil, digest[:], crypto.SHA256)
	var ce *agent.CallError
	if !errors.As(err, &ce) || ce.Code != "FailedPrecondition" || !strings.Contains(ce.Msg, "not the key the caller holds") {
		t.Fatalf("signing with the deleted key's chain: %v, want FailedPrecondition naming the changed key", err)
	}
}
