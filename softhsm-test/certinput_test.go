package softhsmtest

import (
	"crypto/x509/pkix"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCertImportAsCAsSendIt: a renewal imported without --chain keeps the
// stored chain that still links to it, and says so; one from another CA
// is refused rather than left without its chain; DER and PKCS #7 (made by
// OpenSSL) are taken; a corrupt PEM body is named.
func TestCertImportAsCAsSendIt(t *testing.T) {
	fx := New(t)
	dir := t.TempDir()
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "web", "--type", "ecdsa-p256")...)
	tok := fx.Open(t)
	k, err := tok.Key("web")
	if err != nil {
		t.Fatal(err)
	}
	tok.Close()
	ca, other := NewCAWithIntermediate(t, "Input CA"), NewCAWithIntermediate(t, "Other CA")
	now := time.Now()
	leaf := func(ca *CA) string {
		c := ca.Leaf(t, pkix.Name{CommonName: "web"}, k.Public, now.Add(-time.Hour), now.Add(48*time.Hour))
		return writePEM(t, filepath.Join(dir, c.SerialNumber.String()+".pem"), c)
	}
	chain := writePEM(t, filepath.Join(dir, "chain.pem"), ca.Chain()...)
	fx.ok(t, fx.args([]string{"cert", "import"}, "--key", "web", "--cert", leaf(ca), "--chain", chain)...)

	r := fx.ok(t, fx.args([]string{"cert", "import"}, "--key", "web", "--cert", leaf(ca))...)
	if !strings.Contains(r.stderr+r.stdout, "kept the 1 chain certificate(s) stored") || !strings.Contains(r.stderr+r.stdout, "and 1 chain certificate(s)") {
		t.Errorf("a renewal without --chain: %s%s; want the stored chain kept, and said", r.stdout, r.stderr)
	}
	r = fx.hsmagent(t, fx.args([]string{"cert", "import"}, "--key", "web", "--cert", leaf(other))...)
	if r.code == 0 || !strings.Contains(r.stderr, "do not link to the new certificate") {
		t.Errorf("a leaf of another CA without --chain: exit %d %s; want refused", r.code, r.stderr)
	}

	// The same renewal as a CA sends it: DER, and a .p7b of leaf and chain.
	renewed := leaf(ca)
	der := filepath.Join(dir, "renewed.der")
	if out, err := exec.Command("openssl", "x509", "-in", renewed, "-outform", "DER", "-out", der).CombinedOutput(); err != nil {
		t.Fatalf("openssl x509: %v\n%s", err, out)
	}
	fx.ok(t, fx.args([]string{"cert", "import"}, "--key", "web", "--cert", der)...)
	p7b := filepath.Join(dir, "renewed.p7b")
	if out, err := exec.Command("openssl", "crl2pkcs7", "-nocrl", "-certfile", renewed, "-certfile", chain, "-outform", "DER", "-out", p7b).CombinedOutput(); err != nil {
		t.Fatalf("openssl crl2pkcs7: %v\n%s", err, out)
	}
	if r := fx.ok(t, fx.args([]string{"cert", "import"}, "--key", "web", "--cert", p7b)...); !strings.Contains(r.stderr+r.stdout, "and 1 chain certificate(s)") {
		t.Errorf("a .p7b of leaf and chain: %s%s", r.stdout, r.stderr)
	}

	b, _ := os.ReadFile(renewed)
	corrupt := filepath.Join(dir, "corrupt.pem")
	os.WriteFile(corrupt, []byte(strings.Replace(string(b), string(b[40:44]), "!!!!", 1)), 0o644)
	if r := fx.hsmagent(t, fx.args([]string{"cert", "import"}, "--key", "web", "--cert", corrupt)...); r.code == 0 || !strings.Contains(r.stderr, "does not decode (its base64 body is corrupt") {
		t.Errorf("a corrupt PEM body: exit %d %s; want it named", r.code, r.stderr)
	}
}
