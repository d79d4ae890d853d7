package d1

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"math/big"
	"strings"
	"testing"
)

func TestParseEnv(t *testing.T) {
	for in, want := range map[string]Env{"PPR": PreProd, "ppr": PreProd, "preprod": PreProd, "PRD": Production, "production": Production} {
		if got, err := ParseEnv(in); err != nil || got != want {
			t.Errorf("ParseEnv(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseEnv("staging"); err == nil {
		t.Error("staging accepted")
	}
}

func validRequest() SubjectRequest {
	return SubjectRequest{IssuerID: "ABCDEFGHIJ", Env: PreProd, KeyType: KeyTypeECDSA, Country: "fr",
		State: "Ile-de-France", Locality: "Paris", Organization: "Example Bank", OrgUnit: "Cards"}
}

// TestCNKeyType covers D1-C2: ECDSA P-256 or RSA 4096 only.
func TestCNKeyType(t *testing.T) {
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rsa2048, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rsa4096 := &rsa.PublicKey{N: new(big.Int).Lsh(big.NewInt(1), 4095), E: 65537}
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	tests := []struct {
		name string
		pub  crypto.PublicKey
		want string
		err  string
	}{
		{"P-256", &p256.PublicKey, KeyTypeECDSA, ""},
		{"RSA 4096", rsa4096, KeyTypeRSA, ""},
		{"P-384", &p384.PublicKey, "", "P-384 are not accepted"},
		{"RSA 2048", &rsa2048.PublicKey, "", "RSA 2048-bit keys are not accepted"},
		{"Ed25519", ed.Public(), "", "are not accepted"},
	}
	for _, tt := range tests {
		got, err := CNKeyType(tt.pub)
		if got != tt.want || (tt.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.err)) {
			t.Errorf("%s: %q, %v", tt.name, got, err)
		}
	}
}

// TestSubject covers D1-C3 (subject fields) and D1-C4 (CN template).
func TestSubject(t *testing.T) {
	tests := []struct {
		name    string
		edit    func(*SubjectRequest)
		wantCN  string
		wantErr string
	}{
		{name: "ECDSA default template", edit: func(*SubjectRequest) {}, wantCN: "TLSMA-ECDSA/ABCDEFGHIJ/PPR"},
		{name: "RSA production", edit: func(r *SubjectRequest) { r.KeyType, r.Env = KeyTypeRSA, Production }, wantCN: "TLSMA-RSA/ABCDEFGHIJ/PRD"},
		{name: "custom template", edit: func(r *SubjectRequest) { r.CNTemplate = "TLSMA-{keyType}/{env}/{issuerId}/x" }, wantCN: "TLSMA-ECDSA/PPR/ABCDEFGHIJ/x"},
		{name: "unknown key type", edit: func(r *SubjectRequest) { r.KeyType = "DSA" }, wantErr: `key type "DSA"`},
		{name: "bad country", edit: func(r *SubjectRequest) { r.Country = "FRA" }, wantErr: "two-letter"},
		{name: "empty issuerId", edit: func(r *SubjectRequest) { r.IssuerID = "" }, wantErr: "issuerId is empty"},
		{name: "issuerId breaking the subject", edit: func(r *SubjectRequest) { r.IssuerID = "AB/CD,O=x" }, wantErr: "may only hold"},
		{name: "bad env", edit: func(r *SubjectRequest) { r.Env = "DEV" }, wantErr: "not PPR or PRD"},
		{name: "missing OU", edit: func(r *SubjectRequest) { r.OrgUnit = " " }, wantErr: "organization unit is empty"},
		{name: "unknown placeholder", edit: func(r *SubjectRequest) { r.CNTemplate = "TLSMA-{type}" }, wantErr: "unknown placeholder {type}"},
		{name: "unbalanced brace", edit: func(r *SubjectRequest) { r.CNTemplate = "TLSMA-{keyType" }, wantErr: "unbalanced"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := validRequest()
			tt.edit(&r)
			name, err := r.Subject()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if name.CommonName != tt.wantCN {
				t.Errorf("CN %q, want %q", name.CommonName, tt.wantCN)
			}
			if name.Country[0] != "FR" || name.Province[0] != "Ile-de-France" || name.Locality[0] != "Paris" ||
				name.Organization[0] != "Example Bank" || name.OrganizationalUnit[0] != "Cards" {
				t.Errorf("subject %+v", name)
			}
		})
	}
}

func TestEnvOfCNAndLabel(t *testing.T) {
	if e, ok := EnvOfCN("TLSMA-RSA/ABCDEFGHIJ/PRD"); !ok || e != Production {
		t.Errorf("CN: %v %v", e, ok)
	}
	if _, ok := EnvOfCN("api.example.com"); ok {
		t.Error("CN without environment matched")
	}
	for label, want := range map[string]Env{"d1-ppr-mtls": PreProd, "PRD_client": Production, "d1-preprod": PreProd} {
		if e, ok := EnvOfLabel(label); !ok || e != want {
			t.Errorf("label %q: %v %v", label, e, ok)
		}
	}
	if _, ok := EnvOfLabel("ppr-and-prd"); ok {
		t.Error("ambiguous label matched")
	}
}

func TestInferEnv(t *testing.T) {
	tests := []struct {
		given, cn, label string
		want             Env
		err              string
	}{
		{"production", "TLSMA-ECDSA/ABC/PPR", "d1-ppr-mtls", Production, ""},
		{"", "TLSMA-ECDSA/ABC/PRD", "d1-ppr-mtls", Production, ""},
		{"", "client", "d1-ppr-mtls", PreProd, ""},
		{"", "client", "mtls", "", `cannot tell PPR from PRD for key "mtls"`},
		{"staging", "", "", "", `"staging" is not PPR or PRD`},
	}
	for _, tt := range tests {
		got, err := InferEnv(tt.given, tt.cn, tt.label)
		if got != tt.want || (tt.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.err)) {
			t.Errorf("InferEnv(%q, %q, %q) = %q, %v; want %q, %q", tt.given, tt.cn, tt.label, got, err, tt.want, tt.err)
		}
	}
	if w := CheckImportEnv("TLSMA-ECDSA/ABC/PRD", "d1-ppr-mtls"); !strings.Contains(w, "D1-G2") {
		t.Errorf("PRD certificate on a PPR key: warning %q", w)
	}
	if w := CheckImportEnv("TLSMA-ECDSA/ABC/PPR", "d1-ppr-mtls"); w != "" {
		t.Errorf("matching environments warned: %q", w)
	}
}

func TestNewJWTIDIsRandomHex(t *testing.T) {
	a, errA := NewJWTID()
	b, errB := NewJWTID()
	if errA != nil || errB != nil || len(a) != 32 || a == b {
		t.Errorf("NewJWTID: %q %v, %q %v", a, errA, b, errB)
	}
}
