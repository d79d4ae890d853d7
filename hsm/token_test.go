package hsm_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/hsm"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
	"github.com/miekg/pkcs11"
)

// TestGeneratedKeysStayInTheHSM checks, through PKCS#11 directly rather than
// through hsm, the attributes of the D1 key types (D1-K1, D1-C2).
func TestGeneratedKeysStayInTheHSM(t *testing.T) {
	fx := softhsmtest.New(t)
	tok, err := hsm.Open(fx.Config())
	if err != nil {
		t.Fatal(err)
	}
	for _, kt := range []hsm.KeyType{hsm.ECDSAP256, hsm.RSA4096} {
		k, err := tok.GenerateKey("key-"+string(kt), kt, nil)
		if err != nil {
			t.Fatalf("%s: %v", kt, err)
		}
		if got := hsm.KeyTypeOf(k.Public); got != kt {
			t.Errorf("generated %s, public key says %s", kt, got)
		}
	}
	tok.Close() // the raw checks below initialise the module themselves

	p, slot := fx.Raw(t)
	session, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer p.CloseSession(session)
	if err := p.Login(session, pkcs11.CKU_USER, fx.PIN); err != nil {
		t.Fatal(err)
	}
	for _, kt := range []hsm.KeyType{hsm.ECDSAP256, hsm.RSA4096} {
		t.Run(string(kt), func(t *testing.T) {
			label := "key-" + string(kt)
			priv := findObject(t, p, session, pkcs11.CKO_PRIVATE_KEY, label)
			pub := findObject(t, p, session, pkcs11.CKO_PUBLIC_KEY, label)
			want := map[uint]bool{
				pkcs11.CKA_TOKEN: true, pkcs11.CKA_PRIVATE: true, pkcs11.CKA_SENSITIVE: true,
				pkcs11.CKA_EXTRACTABLE: false, pkcs11.CKA_SIGN: true,
				pkcs11.CKA_ALWAYS_SENSITIVE: true, pkcs11.CKA_NEVER_EXTRACTABLE: true,
			}
			if kt == hsm.RSA4096 {
				want[pkcs11.CKA_DECRYPT] = false
				want[pkcs11.CKA_UNWRAP] = false
			}
			for attr, w := range want {
				got, err := p.GetAttributeValue(session, priv, []*pkcs11.Attribute{pkcs11.NewAttribute(attr, nil)})
				if err != nil {
					t.Fatalf("attribute 0x%x: %v", attr, err)
				}
				if v := got[0].Value; len(v) != 1 || (v[0] != 0) != w {
					t.Errorf("private key attribute 0x%x = %v, want %t", attr, v, w)
				}
			}
			for _, obj := range []pkcs11.ObjectHandle{priv, pub} {
				got, err := p.GetAttributeValue(session, obj, []*pkcs11.Attribute{
					pkcs11.NewAttribute(pkcs11.CKA_ID, nil), pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
				if err != nil {
					t.Fatal(err)
				}
				if len(got[0].Value) == 0 || string(got[1].Value) != label {
					t.Errorf("CKA_ID %x, CKA_LABEL %q; want an id and label %q", got[0].Value, got[1].Value, label)
				}
			}
			// The private value must not be readable.
			secret := uint(pkcs11.CKA_VALUE)
			if kt == hsm.RSA4096 {
				secret = pkcs11.CKA_PRIVATE_EXPONENT
			}
			if got, err := p.GetAttributeValue(session, priv, []*pkcs11.Attribute{pkcs11.NewAttribute(secret, nil)}); err == nil {
				t.Errorf("reading the private value succeeded (%d bytes); want CKR_ATTRIBUTE_SENSITIVE", len(got[0].Value))
			} else if !errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)) {
				t.Errorf("reading the private value: %v, want CKR_ATTRIBUTE_SENSITIVE", err)
			}
		})
	}
}

func findObject(t *testing.T, p *pkcs11.Ctx, s pkcs11.SessionHandle, class uint, label string) pkcs11.ObjectHandle {
	t.Helper()
	if err := p.FindObjectsInit(s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)}); err != nil {
		t.Fatal(err)
	}
	objs, _, err := p.FindObjects(s, 2)
	p.FindObjectsFinal(s)
	if err != nil || len(objs) != 1 {
		t.Fatalf("class %d label %q: %d objects, %v", class, label, len(objs), err)
	}
	return objs[0]
}

func TestGenerateRefusesDuplicateLabelAndBadType(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := fx.Open(t)
	if _, err := tok.GenerateKey("dup", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	_, err := tok.GenerateKey("dup", hsm.ECDSAP256, nil)
	if err == nil || !strings.Contains(err.Error(), `"dup" exists already`) {
		t.Errorf("duplicate label: %v", err)
	}
	_, err = tok.GenerateKey("other", hsm.KeyType("ed25519"), nil)
	if err == nil || !strings.Contains(err.Error(), "ecdsa-p256") {
		t.Errorf("unsupported type should list the allowed ones: %v", err)
	}
	keys, err := tok.Keys()
	if err != nil || len(keys) != 1 {
		t.Errorf("keys after refused generations: %d, %v", len(keys), err)
	}
}

func TestOpenErrors(t *testing.T) {
	fx := softhsmtest.New(t)
	bad := filepath.Join(fx.Dir, "bad.pin")
	os.WriteFile(bad, []byte("00000000\n"), 0o600)
	tests := []struct {
		name string
		cfg  hsm.Config
		want string
	}{
		{"wrong PIN", hsm.Config{ModulePath: fx.ModulePath, TokenLabel: fx.Label, PIN: hsm.PINFromFile(bad)}, "wrong PIN"},
		{"missing token", hsm.Config{ModulePath: fx.ModulePath, TokenLabel: "nope", PIN: hsm.PINFromFile(fx.PINFile)}, `token "nope" not found; tokens present: "` + fx.Label + `"`},
		{"missing module", hsm.Config{ModulePath: "/nonexistent/lib.so", TokenLabel: fx.Label, PIN: hsm.PINFromFile(fx.PINFile)}, `module "/nonexistent/lib.so" not found`},
		{"not a module", hsm.Config{ModulePath: fx.PINFile, TokenLabel: fx.Label, PIN: hsm.PINFromFile(fx.PINFile)}, "cannot load PKCS#11 module"},
		{"missing PIN file", hsm.Config{ModulePath: fx.ModulePath, TokenLabel: fx.Label, PIN: hsm.PINFromFile("/nonexistent/pin")}, `reading PIN file "/nonexistent/pin"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok, err := hsm.Open(tt.cfg)
			if err == nil {
				tok.Close()
				t.Fatal("Open succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
			if strings.Contains(err.Error(), fx.PIN) {
				t.Errorf("error leaks the PIN: %q", err)
			}
		})
	}
}

func TestCSRVerifiedByOpenSSL(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := fx.Open(t)
	for _, kt := range []hsm.KeyType{hsm.ECDSAP256, hsm.RSA4096} {
		t.Run(string(kt), func(t *testing.T) {
			label := "csr-" + string(kt)
			if _, err := tok.GenerateKey(label, kt, nil); err != nil {
				t.Fatal(err)
			}
			signer, err := tok.Signer(label)
			if err != nil {
				t.Fatal(err)
			}
			subject := pkix.Name{Country: []string{"FR"}, Province: []string{"IDF"}, Locality: []string{"Paris"},
				Organization: []string{"Bank"}, OrganizationalUnit: []string{"Cards"}, CommonName: "TLSMA-X/ABCDEFGHIJ/PPR"}
			der, err := hsm.CreateCSR(signer, hsm.CSRRequest{Subject: subject})
			if err != nil {
				t.Fatal(err)
			}
			csr, err := x509.ParseCertificateRequest(der)
			if err != nil {
				t.Fatal(err)
			}
			wantAlg := map[hsm.KeyType]x509.SignatureAlgorithm{hsm.ECDSAP256: x509.ECDSAWithSHA256, hsm.RSA4096: x509.SHA256WithRSA}[kt]
			if csr.SignatureAlgorithm != wantAlg {
				t.Errorf("signature algorithm %v, want %v", csr.SignatureAlgorithm, wantAlg)
			}
			path := filepath.Join(t.TempDir(), "req.pem")
			os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), 0o644)
			out, err := exec.Command("openssl", "req", "-in", path, "-noout", "-verify", "-subject").CombinedOutput()
			if err != nil {
				t.Fatalf("openssl req -verify: %v\n%s", err, out)
			}
			if !strings.Contains(string(out), "verify OK") {
				t.Errorf("openssl did not verify: %s", out)
			}
			// OpenSSL prints the attributes in encoding order.
			if !strings.Contains(string(out), "subject=C = FR, ST = IDF, L = Paris, O = Bank, OU = Cards, CN = TLSMA-X/ABCDEFGHIJ/PPR") {
				t.Errorf("subject order: %s", out)
			}
		})
	}
}

func TestSignerSignatures(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := fx.Open(t)
	digest := sha256.Sum256([]byte("hello"))
	if _, err := tok.GenerateKey("ec", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.GenerateKey("rsa", hsm.RSA2048, nil); err != nil {
		t.Fatal(err)
	}
	ec, err := tok.Signer("ec")
	if err != nil {
		t.Fatal(err)
	}
	sig, err := ec.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(ec.Public().(*ecdsa.PublicKey), digest[:], sig) {
		t.Errorf("ECDSA signature does not verify: %v", err)
	}
	rs, err := tok.Signer("rsa")
	if err != nil {
		t.Fatal(err)
	}
	pub := rs.Public().(*rsa.PublicKey)
	sig, err = rs.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil || rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig) != nil {
		t.Errorf("PKCS#1 v1.5 signature does not verify: %v", err)
	}
	pss := &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}
	sig, err = rs.Sign(rand.Reader, digest[:], pss)
	if err != nil || rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, pss) != nil {
		t.Errorf("PSS signature does not verify: %v", err)
	}
	if _, err := tok.Signer("missing"); !errors.Is(err, hsm.ErrKeyNotFound) || !strings.Contains(err.Error(), `keys present: ["ec" "rsa"]`) {
		t.Errorf("missing key: %v", err)
	}
}

// TestSignerRecoversLostSession closes every session of the slot and logs out
// behind the agent's back, as an HSM restart would, then signs again.
func TestSignerRecoversLostSession(t *testing.T) {
	fx := softhsmtest.New(t)
	var reopened, failed atomic.Int64 // what the agent's reopen metric counts
	cfg := fx.Config()
	cfg.OnReopen = func(ok bool) {
		if ok {
			reopened.Add(1)
		} else {
			failed.Add(1)
		}
	}
	tok, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
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
	p, slot := fx.Raw(t)
	if err := p.CloseAllSessions(slot); err != nil {
		t.Fatal(err)
	}
	sig, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("sign after the sessions were closed: %v", err)
	}
	if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest[:], sig) {
		t.Error("signature after recovery does not verify")
	}
	if reopened.Load() != 1 || failed.Load() != 0 {
		t.Errorf("Config.OnReopen saw %d reopens and %d failures; want 1 and 0", reopened.Load(), failed.Load())
	}
}

func TestImportChain(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := fx.Open(t)
	k, err := tok.GenerateKey("tls", hsm.ECDSAP256, nil)
	if err != nil {
		t.Fatal(err)
	}
	other, err := tok.GenerateKey("other", hsm.ECDSAP256, nil)
	if err != nil {
		t.Fatal(err)
	}
	ca := softhsmtest.NewCAWithIntermediate(t, "Test CA")
	now := time.Now()
	leaf := ca.Leaf(t, pkix.Name{CommonName: "leaf"}, k.Public, now.Add(-time.Hour), now.Add(48*time.Hour))

	t.Run("mismatched key refused", func(t *testing.T) {
		foreign := ca.Leaf(t, pkix.Name{CommonName: "foreign"}, other.Public, now.Add(-time.Hour), now.Add(time.Hour))
		err := tok.ImportChain("tls", []*x509.Certificate{foreign})
		if err == nil || !strings.Contains(err.Error(), "public key differs") {
			t.Errorf("got %v", err)
		}
	})
	t.Run("stored and read back", func(t *testing.T) {
		if err := tok.ImportChain("tls", []*x509.Certificate{leaf, ca.Intermediate}); err != nil {
			t.Fatal(err)
		}
		chain, err := tok.Chain("tls")
		if err != nil {
			t.Fatal(err)
		}
		if len(chain) != 2 || !chain[0].Equal(leaf) || !chain[1].Equal(ca.Intermediate) {
			t.Fatalf("chain read back: %d certs", len(chain))
		}
	})
	t.Run("re-import replaces", func(t *testing.T) {
		ca2 := softhsmtest.NewCA(t, "Other CA")
		leaf2 := ca2.Leaf(t, pkix.Name{CommonName: "leaf2"}, k.Public, now.Add(-time.Hour), now.Add(48*time.Hour))
		if err := tok.ImportChain("tls", []*x509.Certificate{leaf2}); err != nil {
			t.Fatal(err)
		}
		chain, err := tok.Chain("tls")
		if err != nil || len(chain) != 1 || !chain[0].Equal(leaf2) {
			t.Fatalf("after re-import: %d certs, %v", len(chain), err)
		}
	})
	t.Run("delete removes key and certificates", func(t *testing.T) {
		if err := tok.DeleteKey("tls"); err != nil {
			t.Fatal(err)
		}
		if _, err := tok.Key("tls"); !errors.Is(err, hsm.ErrKeyNotFound) {
			t.Errorf("key after delete: %v", err)
		}
		tok.Close()
		p, slot := fx.Raw(t)
		s, _ := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
		p.FindObjectsInit(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_CERTIFICATE)})
		objs, _, _ := p.FindObjects(s, 10)
		p.FindObjectsFinal(s)
		if len(objs) != 0 {
			t.Errorf("%d certificate objects left after delete", len(objs))
		}
	})
}

func TestFingerprintMatchesOpenSSLForm(t *testing.T) {
	fp := hsm.Fingerprint([]byte("abc"))
	if len(fp) != 95 || !bytes.Equal([]byte(fp[:8]), []byte("BA:78:16")) {
		t.Errorf("fingerprint %q", fp)
	}
}
