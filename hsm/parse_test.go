package hsm

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

func TestParseSubject(t *testing.T) {
	tests := []struct {
		in      string
		want    pkix.Name
		wantErr string
	}{
		{in: "CN=api.example.com,O=Example Bank,C=fr", want: pkix.Name{CommonName: "api.example.com", Organization: []string{"Example Bank"}, Country: []string{"FR"}}},
		{in: `CN=a\,b, OU=x , L=Paris,ST=IDF`, want: pkix.Name{CommonName: "a,b", OrganizationalUnit: []string{"x"}, Locality: []string{"Paris"}, Province: []string{"IDF"}}},
		{in: "", wantErr: "empty"},
		{in: "CN", wantErr: "not KEY=VALUE"},
		{in: "CN=", wantErr: "empty value"},
		{in: "C=FRA", wantErr: "two-letter"},
		{in: "CN=a,CN=b", wantErr: "more than one CN"},
		{in: "EMAIL=a@b", wantErr: `"EMAIL" is not supported`},
		// OpenSSL's form, as 'hsmagent csr' prints it: a D1 CN keeps its '/'s.
		{in: "/C=FR/ST=Ile-de-France/O=Example Bank/CN=TLSMA-ECDSA/ABCDEFGHIJ/PPR", want: pkix.Name{Country: []string{"FR"},
			Province: []string{"Ile-de-France"}, Organization: []string{"Example Bank"}, CommonName: "TLSMA-ECDSA/ABCDEFGHIJ/PPR"}},
		{in: `/O=a,b/CN=x\/y/`, want: pkix.Name{Organization: []string{"a,b"}, CommonName: "x/y"}},
		{in: "/", wantErr: "empty"},
		{in: "/CN", wantErr: "not KEY=VALUE"},
		{in: "/CN=a/CN=b", wantErr: "more than one CN"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseSubject(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestParseURI(t *testing.T) {
	pin := filepath.Join(t.TempDir(), "pin")
	os.WriteFile(pin, []byte("1234\n"), 0o600)
	u, err := ParseURI("pkcs11:token=my%20token;object=d1-ppr?module-path=/usr/lib/x.so&pin-source=file:" + pin)
	if err != nil {
		t.Fatal(err)
	}
	if u.TokenLabel != "my token" || u.Object != "d1-ppr" || u.ModulePath != "/usr/lib/x.so" {
		t.Errorf("parsed %+v", u)
	}
	if got, err := u.PIN(); err != nil || got != "1234" {
		t.Errorf("PIN from pin-source: %q, %v", got, err)
	}
	if _, err := ParseURI("pkcs11:token=t?pin-value=1234"); err == nil || strings.Contains(err.Error(), "1234") {
		t.Errorf("pin-value must be refused without echoing it: %v", err)
	}
	if _, err := ParseURI("http://x"); err == nil {
		t.Error("non-pkcs11 URI accepted")
	}
}

func TestParseKeyType(t *testing.T) {
	for _, s := range []string{"ecdsa-p256", "RSA-4096", "rsa-2048", "ecdsa-p384", "rsa-3072"} {
		if _, err := ParseKeyType(s); err != nil {
			t.Errorf("%s: %v", s, err)
		}
	}
	if _, err := ParseKeyType("ed25519"); err == nil || !strings.Contains(err.Error(), "ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096") {
		t.Errorf("ed25519: %v", err)
	}
}

func TestExplain(t *testing.T) {
	err := explain(pkcs11.Error(pkcs11.CKR_PIN_INCORRECT))
	if !strings.HasPrefix(err.Error(), "wrong PIN") {
		t.Errorf("got %q", err)
	}
	if !isSessionLost(explain(pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID))) {
		t.Error("wrapped session error not recognised")
	}
	if isSessionLost(pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)) {
		t.Error("a wrong PIN is not a lost session")
	}
}

func testCert(t *testing.T, cn string, pub, signerKey any, parent *x509.Certificate, isCA bool, notAfter time.Time) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: notAfter, IsCA: isCA, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signerKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func TestSortChainAndWarnings(t *testing.T) {
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	interKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	day := 24 * time.Hour
	root := testCert(t, "root", &rootKey.PublicKey, rootKey, nil, true, time.Now().Add(365*day))
	inter := testCert(t, "inter", &interKey.PublicKey, rootKey, root, true, time.Now().Add(365*day))
	leaf := testCert(t, "leaf", &leafKey.PublicKey, interKey, inter, false, time.Now().Add(10*day))

	chain, err := SortChain(&leafKey.PublicKey, []*x509.Certificate{inter, leaf})
	if err != nil || len(chain) != 2 || chain[0] != leaf || chain[1] != inter {
		t.Fatalf("SortChain: %v", err)
	}
	if _, err := SortChain(&rootKey.PublicKey, []*x509.Certificate{leaf}); err != ErrNoMatchingCertificate {
		t.Errorf("no matching leaf: %v", err)
	}
	if _, err := SortChain(&leafKey.PublicKey, []*x509.Certificate{leaf, root}); err == nil || !strings.Contains(err.Error(), "does not link") {
		t.Errorf("gap in chain: %v", err)
	}
	warnings, err := ChainWarnings(chain, time.Now())
	if err != nil || len(warnings) != 1 || !strings.Contains(warnings[0], "expires in 9 days") {
		t.Errorf("warnings %q, %v", warnings, err)
	}
	if _, err := ChainWarnings(chain, time.Now().Add(11*day)); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("expired: %v", err)
	}
}
