package hsm_test

import (
	"errors"
	"slices"
	"testing"

	"github.com/hsmagent/hsmagent/hsm"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
	"github.com/miekg/pkcs11"
)

// TestGeneratedKeysAreSignOnly reads back, through PKCS#11 directly, the
// usage attributes of every key type hsmagent generates: the private half
// may sign and nothing else, the public half may verify and nothing else.
func TestGeneratedKeysAreSignOnly(t *testing.T) {
	fx := softhsmtest.New(t)
	tok, err := hsm.Open(fx.Config())
	if err != nil {
		t.Fatal(err)
	}
	for _, kt := range hsm.KeyTypes {
		if _, err := tok.GenerateKey("key-"+string(kt), kt, nil); err != nil {
			t.Fatalf("%s: %v", kt, err)
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
	wantPriv := map[uint]bool{
		pkcs11.CKA_SIGN: true, pkcs11.CKA_DECRYPT: false, pkcs11.CKA_UNWRAP: false,
		pkcs11.CKA_DERIVE: false, pkcs11.CKA_SIGN_RECOVER: false,
	}
	wantPub := map[uint]bool{
		pkcs11.CKA_VERIFY: true, pkcs11.CKA_ENCRYPT: false, pkcs11.CKA_WRAP: false,
		pkcs11.CKA_DERIVE: false, pkcs11.CKA_VERIFY_RECOVER: false,
	}
	for _, kt := range hsm.KeyTypes {
		t.Run(string(kt), func(t *testing.T) {
			label := "key-" + string(kt)
			for _, obj := range []struct {
				name   string
				handle pkcs11.ObjectHandle
				want   map[uint]bool
			}{
				{"private", findObject(t, p, session, pkcs11.CKO_PRIVATE_KEY, label), wantPriv},
				{"public", findObject(t, p, session, pkcs11.CKO_PUBLIC_KEY, label), wantPub},
			} {
				for attr, w := range obj.want {
					got, err := p.GetAttributeValue(session, obj.handle, []*pkcs11.Attribute{pkcs11.NewAttribute(attr, nil)})
					if err != nil {
						t.Fatalf("%s key attribute 0x%x: %v", obj.name, attr, err)
					}
					if v := got[0].Value; len(v) != 1 || (v[0] != 0) != w {
						t.Errorf("%s key attribute 0x%x = %v, want %t", obj.name, attr, v, w)
					}
				}
			}
		})
	}
}

// TestKeyUsageReportsForeignKeys makes key pairs behind hsmagent's back, as
// another tool would, and checks what KeyUsage reports for them.
func TestKeyUsageReportsForeignKeys(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := fx.Open(t)
	if _, err := tok.GenerateKey("ours", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	p, slot := fx.Raw(t)
	session, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer p.CloseSession(session)
	// The hsm Token is logged in already, and login is per application.
	if err := p.Login(session, pkcs11.CKU_USER, fx.PIN); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		t.Fatal(err)
	}

	tests := []struct {
		label    string
		priv     map[uint]bool // on top of a sensitive, non-extractable signing key
		usage    string
		signOnly bool
		problems []string
	}{
		{label: "ours", usage: "sign", signOnly: true},
		// What SoftHSM makes of a template that says nothing about the other usages.
		{label: "softhsm-defaults", usage: "sign,sign-recover,decrypt,unwrap", problems: []string{"sign-recover", "decrypt", "unwrap"}},
		{label: "decrypt", priv: map[uint]bool{pkcs11.CKA_DECRYPT: true, pkcs11.CKA_UNWRAP: false, pkcs11.CKA_SIGN_RECOVER: false},
			usage: "sign,decrypt", problems: []string{"decrypt"}},
		{label: "derive", priv: map[uint]bool{pkcs11.CKA_DECRYPT: false, pkcs11.CKA_UNWRAP: false, pkcs11.CKA_SIGN_RECOVER: false, pkcs11.CKA_DERIVE: true},
			usage: "sign,derive", problems: []string{"derive"}},
		{label: "explicit-sign-only", priv: map[uint]bool{pkcs11.CKA_DECRYPT: false, pkcs11.CKA_UNWRAP: false, pkcs11.CKA_SIGN_RECOVER: false, pkcs11.CKA_DERIVE: false},
			usage: "sign", signOnly: true},
		{label: "extractable", priv: map[uint]bool{pkcs11.CKA_DECRYPT: false, pkcs11.CKA_UNWRAP: false, pkcs11.CKA_SIGN_RECOVER: false, pkcs11.CKA_DERIVE: false,
			pkcs11.CKA_SENSITIVE: false, pkcs11.CKA_EXTRACTABLE: true},
			usage: "sign", signOnly: true, problems: []string{"not sensitive", "extractable"}},
	}
	for i, tt := range tests {
		if tt.label == "ours" {
			continue
		}
		rawECKeyPair(t, p, session, tt.label, []byte{0xf0, byte(i)}, tt.priv)
	}
	for _, tt := range tests {
		t.Run(tt.label, func(t *testing.T) {
			u, err := tok.KeyUsage(tt.label)
			if err != nil {
				t.Fatal(err)
			}
			if got := u.String(); got != tt.usage {
				t.Errorf("usage %q, want %q", got, tt.usage)
			}
			if u.SignOnly() != tt.signOnly {
				t.Errorf("SignOnly() = %t, want %t (%+v)", u.SignOnly(), tt.signOnly, u)
			}
			if got := u.Problems(); !slices.Equal(got, tt.problems) {
				t.Errorf("problems %q, want %q", got, tt.problems)
			}
		})
	}
	keys, err := tok.Keys()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		for _, tt := range tests {
			if k.Label == tt.label && k.Usage.String() != tt.usage {
				t.Errorf("Keys(): %q usage %q, want %q", k.Label, k.Usage.String(), tt.usage)
			}
		}
	}
	if _, err := tok.KeyUsage("missing"); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("usage of a missing key: %v", err)
	}
}

// rawECKeyPair generates a P-256 key pair with C_GenerateKeyPair, leaving
// every usage attribute not in extra to the token.
func rawECKeyPair(t *testing.T, p *pkcs11.Ctx, s pkcs11.SessionHandle, label string, id []byte, extra map[uint]bool) {
	t.Helper()
	p256 := []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07} // OID 1.2.840.10045.3.1.7
	pub := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, p256),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
	priv := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
	flags := map[uint]bool{pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_EXTRACTABLE: false}
	for typ, v := range extra {
		flags[typ] = v
	}
	for typ, v := range flags {
		priv = append(priv, pkcs11.NewAttribute(typ, v))
	}
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)}
	if _, _, err := p.GenerateKeyPair(s, mech, pub, priv); err != nil {
		t.Fatalf("C_GenerateKeyPair %q: %v", label, err)
	}
}
