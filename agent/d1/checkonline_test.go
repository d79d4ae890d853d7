package d1

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// fakeCreds stands in for the agent: client certificates and signers by label.
type fakeCreds struct {
	certs   map[string]tls.Certificate
	signers map[string]crypto.Signer
}

func (f fakeCreds) GetClientCertificate(label string) func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		c, ok := f.certs[label]
		if !ok {
			return nil, fmt.Errorf("agent: no key %q for this user", label)
		}
		return &c, nil
	}
}

func (f fakeCreds) Signer(_ context.Context, label string) (crypto.Signer, error) {
	s, ok := f.signers[label]
	if !ok {
		return nil, fmt.Errorf("agent: no key %q for this user", label)
	}
	return s, nil
}

// standIn is D1 on loopback: a server certificate from amazon, client
// certificates required from thales (D1-G1), and a token endpoint that knows
// one kid and JWT key (D1-C8). It returns its base URL, by host name.
func standIn(t *testing.T, amazon, thales *testCA, jwtKey crypto.PublicKey, kid string) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("POST /token", func(w http.ResponseWriter, r *http.Request) {
		tok, err := jwt.ParseSigned(r.FormValue("assertion"), []jose.SignatureAlgorithm{jose.ES256})
		var claims jwt.Claims
		if err != nil || tok.Headers[0].KeyID != kid || tok.Claims(jwtKey, &claims) != nil {
			http.Error(w, `{"error":"invalid_client"}`, http.StatusUnauthorized)
			return
		}
		fmt.Fprint(w, `{"access_token":"t","token_type":"Bearer","expires_in":900}`)
	})
	srv := httptest.NewUnstartedServer(mux)
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.TLS = &tls.Config{
		Certificates: []tls.Certificate{amazon.tlsCertificate(t, "localhost", "localhost")},
		ClientAuth:   tls.RequireAndVerifyClientCert, ClientCAs: thales.pool(),
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL)
	return "https://localhost:" + u.Port()
}

func writeCAFile(t *testing.T, ca *testCA) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestCheckOnline makes real handshakes with a stand-in D1 (D1-G1, D1-C6,
// D1-G2) and real token requests (D1-C8), and checks the line each way of
// failing gets, and the fix that points at its cause.
func TestCheckOnline(t *testing.T) {
	amazon, thales, impostor := newTestCA(t, "Test Amazon"), newTestCA(t, "Test Thales"), newTestCA(t, "Test Impostor")
	jwtKey := newP256(t)
	target := standIn(t, amazon, thales, jwtKey.Public(), "kid-1")
	creds := fakeCreds{
		certs: map[string]tls.Certificate{
			"d1-ppr-mtls":  thales.tlsCertificate(t, "TLSMA-ECDSA/ABCDEFGHIJ/PPR"),
			"d1-prd-mtls":  thales.tlsCertificate(t, "TLSMA-ECDSA/ABCDEFGHIJ/PRD"),
			"unknown-mtls": impostor.tlsCertificate(t, "TLSMA-ECDSA/ABCDEFGHIJ/PPR"),
		},
		signers: map[string]crypto.Signer{"d1-ppr-jwt": jwtKey},
	}
	good := func(change func(*Settings)) map[Env]*Settings {
		s := &Settings{Target: target, Key: "d1-ppr-mtls", ServerCA: writeCAFile(t, amazon),
			JWT: JWTSettings{Key: "d1-ppr-jwt", Kid: "kid-1", IssuerID: "ABCDEFGHIJ", TokenURL: target + "/token"}}
		if change != nil {
			change(s)
		}
		return map[Env]*Settings{PreProd: s}
	}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := "https://" + l.Addr().String()
	l.Close()
	tests := []struct {
		name     string
		settings map[Env]*Settings
		creds    Credentials
		want     string // each line as check:status, in order
		message  string // in the last line
		fix      string // in the last line's fix
	}{
		{"good", good(nil), creds, "mtls:pass oauth:pass", "access token from", ""},
		{"no JWT settings", good(func(s *Settings) { s.JWT = JWTSettings{} }), creds, "mtls:pass oauth:warn", "no d1.PPR.jwt section", "set d1.PPR.jwt"},
		{"no target", good(func(s *Settings) { s.Target = "" }), creds, "", "", ""},
		{"no agent", good(nil), nil, "mtls:fail", "not tried", "fix the agent check first"},
		{"no key configured", good(func(s *Settings) { s.Key = "" }), creds, "mtls:fail", "no d1.PPR.key", "set d1.PPR.key"},
		{"key not offered", good(func(s *Settings) { s.Key = "other" }), creds, "mtls:fail", `no key "other"`, "the agent must offer"},
		// D1-G2: refused before dialling.
		{"PRD certificate", good(func(s *Settings) { s.Key = "d1-prd-mtls" }), creds, "mtls:fail", "(D1-G2)", "fix the key and certificate checks of PPR"},
		{"client certificate D1 does not trust", good(func(s *Settings) { s.Key = "unknown-mtls" }), creds, "mtls:fail", "remote error", "D1 refused the client certificate"},
		// D1-C6
		{"server certificate from another CA", good(func(s *Settings) { s.ServerCA = writeCAFile(t, impostor) }), creds, "mtls:fail", "unknown authority", "server_ca"},
		{"embedded roots do not trust the stand-in", good(func(s *Settings) { s.ServerCA = "" }), creds, "mtls:fail", "unknown authority", "server_ca"},
		{"nothing listens", good(func(s *Settings) { s.Target = closed }), creds, "mtls:fail", "connection refused", "firewall"},
		{"bad server CA file", good(func(s *Settings) { s.ServerCA = "/nonexistent.pem" }), creds, "mtls:fail", "reading CA file", "fix the key and certificate checks"},
		{"kid not registered", good(func(s *Settings) { s.JWT.Kid = "kid-2" }), creds, "mtls:pass oauth:fail", "401", "registered with D1"},
		{"no kid", good(func(s *Settings) { s.JWT.Kid = "" }), creds, "mtls:pass oauth:fail", "needs a kid", "complete d1.PPR.jwt"},
		{"JWT key not offered", good(func(s *Settings) { s.JWT.Key = "other" }), creds, "mtls:pass oauth:fail", `no key "other"`, `the agent must offer "other"`},
		{"token endpoint down", good(func(s *Settings) { s.JWT.TokenURL = closed + "/token" }), creds, "mtls:pass oauth:fail", "connection refused", "check d1.PPR.jwt.token_url and the network"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			found := CheckOnline(context.Background(), tt.settings, tt.creds, 5*time.Second)
			var got []string
			for _, f := range found {
				got = append(got, string(f.Check)+":"+f.Status.String())
				if f.Env != PreProd {
					t.Errorf("%+v: not PPR", f)
				}
			}
			if strings.Join(got, " ") != tt.want {
				t.Fatalf("lines %v, want %q: %+v", got, tt.want, found)
			}
			if len(found) == 0 {
				return
			}
			if first := found[0]; first.Status == Pass && !strings.Contains(first.Message, "completed (TLS 1.3), HTTP 404") {
				t.Errorf("handshake line %q", first.Message)
			}
			last := found[len(found)-1]
			if !strings.Contains(last.Message, tt.message) || !strings.Contains(last.Fix, tt.fix) || (last.Fix == "") != (tt.fix == "") {
				t.Errorf("%+v\nwant message %q, fix %q", last, tt.message, tt.fix)
			}
		})
	}
}

// TestHandshakeFix: the fix follows the error's type, however it is wrapped.
func TestHandshakeFix(t *testing.T) {
	wrap := func(err error) error {
		return &url.Error{Op: "Head", URL: "https://d1.example", Err: fmt.Errorf("outer: %w", err)}
	}
	tests := []struct {
		name string
		err  error
		fix  string
	}{
		{"unknown authority", &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}, "server_ca"},
		{"host name", x509.HostnameError{Host: "d1.example", Certificate: &x509.Certificate{}}, "not valid for d1.PPR.target"},
		{"expired server certificate", x509.CertificateInvalidError{Reason: x509.Expired}, "the clock"},
		{"alert over TCP", &net.OpError{Op: "remote error", Err: errors.New("tls: bad certificate")}, "D1 refused the client certificate"},
		{"alert over QUIC", tls.AlertError(42), "D1 refused the client certificate"},
		{"refused", &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}, "firewall"},
		{"lookup", &net.DNSError{Err: "no such host", Name: "d1.example"}, "DNS"},
		{"timeout", context.DeadlineExceeded, "firewall"},
		{"other", errors.New("remote error, says the text"), "check d1.PPR.target and the network"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if fix := handshakeFix(wrap(tt.err), PreProd); !strings.Contains(fix, tt.fix) {
				t.Errorf("fix %q, want %q", fix, tt.fix)
			}
		})
	}
}

func TestTokenFix(t *testing.T) {
	tests := []struct {
		name string
		err  error
		fix  string
	}{
		{"refused", &TokenError{URL: "https://d1.example/token", Status: 401}, "registered with D1"},
		{"setting", fmt.Errorf("wrapped: %w", &BearerFieldError{"KeyID", errors.New("d1: the JWT needs a kid")}), "complete d1.PRD.jwt"},
		{"text that looks like a setting", errors.New("d1: something"), "check d1.PRD.jwt.token_url"},
	}
	for _, tt := range tests {
		if fix := tokenFix(tt.err, Production); !strings.Contains(fix, tt.fix) {
			t.Errorf("%s: fix %q, want %q", tt.name, fix, tt.fix)
		}
	}
}
