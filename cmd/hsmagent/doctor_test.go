package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/hsm"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// d1StandIn is a TLS server on loopback standing in for D1: its certificate
// comes from serverCA (the "Amazon" side, or an impostor), it requires a
// client certificate from the Thales test CAs in clientCAs (D1-G1, D1-C1) and it serves
// the token endpoint, which checks the ES256 assertion against the
// registered JWT key and kid (D1-C8). Other paths answer 404.
func d1StandIn(t *testing.T, serverCA *softhsmtest.CA, clientCAs *x509.CertPool, jwtKey *ecdsa.PublicKey, kid, issuerID string) (port string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leaf := serverCA.Leaf(t, pkix.Name{CommonName: "localhost"}, &key.PublicKey, time.Now().Add(-time.Hour), time.Now().Add(time.Hour), "localhost")
	chain := [][]byte{leaf.Raw}
	for _, c := range serverCA.Chain() {
		chain = append(chain, c.Raw)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{{Certificate: chain, PrivateKey: key}},
		ClientAuth:   tls.RequireAndVerifyClientCert, ClientCAs: clientCAs, MinVersion: tls.VersionTLS12,
	})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /authz/v1/oauth2/token", func(w http.ResponseWriter, r *http.Request) {
		tok, err := jwt.ParseSigned(r.FormValue("assertion"), []jose.SignatureAlgorithm{jose.ES256})
		var claims jwt.Claims
		switch {
		case r.FormValue("grant_type") != d1.JWTBearerGrant || err != nil:
			http.Error(w, `{"error":"invalid_request"}`, http.StatusBadRequest)
		case tok.Headers[0].KeyID != kid || tok.Claims(jwtKey, &claims) != nil:
			http.Error(w, `{"error":"invalid_client","error_description":"unknown kid"}`, http.StatusUnauthorized)
		case claims.Subject != issuerID:
			http.Error(w, `{"error":"invalid_grant"}`, http.StatusBadRequest)
		default:
			fmt.Fprint(w, `{"access_token":"doctor-token","token_type":"Bearer","expires_in":900}`)
		}
	})
	srv := &http.Server{Handler: mux, ErrorLog: log.New(io.Discard, "", 0)}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	_, port, _ = net.SplitHostPort(l.Addr().String())
	return port
}

// closedPort is a loopback port nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(l.Addr().String())
	l.Close()
	return port
}

func writePEM(t *testing.T, certs ...*x509.Certificate) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(path, hsm.EncodeCertificatesPEM(certs), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// goodHost is what doctor prints for a complete PPR setup checked online:
// check/env -> status.
var goodHost = map[string]string{
	"config": "pass", "module": "pass", "token": "pass", "pin": "pass",
	"key/PPR": "pass", "certificate/PPR": "pass", "chain/PPR": "pass", "cn/PPR": "pass", "expiry/PPR": "pass",
	"jwt-key/PPR": "pass", "socket": "pass", "agent": "pass", "dns/PPR": "pass", "mtls/PPR": "pass", "oauth/PPR": "pass",
	"ownership": "pass", "served": "pass",
}

// TestDoctor runs doctor --online in process against a real SoftHSM token,
// a real agent and a stand-in D1, for a good setup and broken ones. Every
// line's status and the exit status are checked: lines a case does not
// name must be as in goodHost, and "-" means the line must be absent.
func TestDoctor(t *testing.T) {
	const (
		cnPPR    = "TLSMA-ECDSA/ABCDEFGHIJ/PPR"
		cnPRD    = "TLSMA-ECDSA/ABCDEFGHIJ/PRD"
		issuerID = "ABCDEFGHIJ"
	)
	tests := []struct {
		name     string
		cn       string        // CN of the PPR client certificate; "" imports none
		validFor time.Duration // from now; negative: expired
		chain    string        // "": leaf from a Thales root; "intermediate": leaf and the Thales intermediate (expiring within a day); "foreign": leaf and an unrelated CA
		server   string        // "d1", "other-ca" (server certificate from an unknown CA) or "down"
		kid      string        // kid in the config; the stand-in knows "doctor-kid"
		sockMode os.FileMode
		stopped  bool // agent stopped before doctor runs
		want     map[string]string
		code     int
		fix      string // in the fix of the first failed or warned line
		mtls     string // in the detail of the mtls line
	}{
		{name: "good", cn: cnPPR, validFor: 90 * day, server: "d1", code: 0},
		{name: "expires within 30 days", cn: cnPPR, validFor: 10 * day, server: "d1",
			want: map[string]string{"expiry/PPR": "warn"}, code: 0, fix: "renew"},
		// D1 refuses the expired client certificate in the handshake.
		{name: "expired certificate", cn: cnPPR, validFor: -day, server: "d1",
			want: map[string]string{"expiry/PPR": "fail", "mtls/PPR": "fail", "oauth/PPR": "-"}, code: 1, fix: "renew", mtls: "expired certificate"},
		// D1-G2: a PRD certificate on the PPR key; the mTLS client refuses it before dialling.
		{name: "wrong environment", cn: cnPRD, validFor: 90 * day, server: "d1",
			want: map[string]string{"cn/PPR": "fail", "mtls/PPR": "fail", "oauth/PPR": "-"}, code: 1, fix: "import the PPR certificate", mtls: "(D1-G2)"},
		{name: "key without certificate", validFor: 90 * day, server: "d1",
			want: map[string]string{"certificate/PPR": "fail", "chain/PPR": "-", "cn/PPR": "-", "expiry/PPR": "-", "mtls/PPR": "fail", "oauth/PPR": "-"},
			code: 1, fix: "hsmagent cert import --key d1-ppr-mtls", mtls: "has no certificate"},
		{name: "unreachable endpoint", cn: cnPPR, validFor: 90 * day, server: "down",
			want: map[string]string{"mtls/PPR": "fail", "oauth/PPR": "-"}, code: 1, fix: "firewall", mtls: "connection refused"},
		// D1-C6: the server's certificate does not chain to server_ca.
		{name: "wrong CA", cn: cnPPR, validFor: 90 * day, server: "other-ca",
			want: map[string]string{"mtls/PPR": "fail", "oauth/PPR": "-"}, code: 1, fix: "server_ca", mtls: "unknown authority"},
		{name: "chain with an intermediate", cn: cnPPR, validFor: 90 * day, chain: "intermediate", server: "d1",
			want: map[string]string{"expiry/PPR": "warn"}, code: 0, fix: "renew"},
		{name: "chain does not link", cn: cnPPR, validFor: 90 * day, chain: "foreign", server: "d1",
			want: map[string]string{"chain/PPR": "fail", "expiry/PPR": "warn"}, code: 1, fix: "--chain FILE"},
		{name: "kid not registered", cn: cnPPR, validFor: 90 * day, server: "d1", kid: "other-kid",
			want: map[string]string{"oauth/PPR": "fail"}, code: 1, fix: "registered with D1"},
		{name: "socket open to all", cn: cnPPR, validFor: 90 * day, server: "d1", sockMode: 0o666,
			want: map[string]string{"socket": "warn"}, code: 0, fix: "socket_mode"},
		{name: "agent stopped", cn: cnPPR, validFor: 90 * day, server: "d1", stopped: true,
			want: map[string]string{"socket": "fail", "agent": "-", "served": "-", "mtls/PPR": "fail", "oauth/PPR": "-"}, code: 1, fix: "start the agent", mtls: "not tried"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fx := softhsmtest.New(t)
			tok := fx.Open(t)
			thales, thalesInt := softhsmtest.NewCA(t, "Test Thales CA"), softhsmtest.NewCAWithIntermediate(t, "Test Thales")
			clientCAs := thales.Pool()
			clientCAs.AddCert(thalesInt.Cert)
			amazon := softhsmtest.NewCAWithIntermediate(t, "Test Amazon")
			mtls, err := tok.GenerateKey("d1-ppr-mtls", hsm.ECDSAP256, nil)
			if err != nil {
				t.Fatal(err)
			}
			if tt.cn != "" {
				notAfter := time.Now().Add(tt.validFor)
				notBefore := time.Now().Add(-time.Hour)
				if notAfter.Before(notBefore) {
					notBefore = notAfter.Add(-time.Hour)
				}
				chain := []*x509.Certificate{thales.Leaf(t, pkix.Name{CommonName: tt.cn}, mtls.Public, notBefore, notAfter)}
				switch tt.chain {
				case "intermediate":
					chain = append([]*x509.Certificate{thalesInt.Leaf(t, pkix.Name{CommonName: tt.cn}, mtls.Public, notBefore, notAfter)}, thalesInt.Chain()...)
				case "foreign":
					chain = append(chain, amazon.Intermediate)
				}
				if err := tok.ImportChain("d1-ppr-mtls", chain); err != nil {
					t.Fatal(err)
				}
			}
			jwtKey, err := tok.GenerateKey("d1-ppr-jwt", hsm.ECDSAP256, nil)
			if err != nil {
				t.Fatal(err)
			}
			mode := tt.sockMode
			if mode == 0 {
				mode = 0o660
			}
			a := softhsmtest.StartAgentAt(t, filepath.Join(softhsmtest.SocketDir(t), "agent.sock"), mode, tok, server.Options{Version: "test-doctor"})
			if tt.stopped {
				a.Stop()
			}
			var port string
			switch tt.server {
			case "d1":
				port = d1StandIn(t, amazon, clientCAs, jwtKey.Public.(*ecdsa.PublicKey), "doctor-kid", issuerID)
			case "other-ca":
				port = d1StandIn(t, softhsmtest.NewCA(t, "Test Impostor CA"), clientCAs, jwtKey.Public.(*ecdsa.PublicKey), "doctor-kid", issuerID)
			case "down":
				port = closedPort(t)
			}
			kid := tt.kid
			if kid == "" {
				kid = "doctor-kid"
			}
			cfg := writeConfig(t, fmt.Sprintf(`socket: %s
d1:
  PPR:
    target: https://localhost:%s
    key: d1-ppr-mtls
    server_ca: %s
    jwt: {key: d1-ppr-jwt, kid: %s, issuer_id: %s, token_url: "https://localhost:%s/authz/v1/oauth2/token"}
`, a.Socket, port, writePEM(t, amazon.Cert), kid, issuerID, port))

			code, stdout, stderr := runCLI(t, "doctor", "--config", cfg, "--module", fx.ModulePath, "--token", fx.Label,
				"--pin-file", fx.PINFile, "--online", "--json", "--timeout", "3s")
			var results []checkResult
			if err := json.Unmarshal([]byte(stdout), &results); err != nil {
				t.Fatalf("not JSON: %v\n%s\n%s", err, stdout, stderr)
			}
			want := maps.Clone(goodHost)
			maps.Copy(want, tt.want)
			got := map[string]string{}
			fix, mtlsDetail := "", ""
			for _, r := range results {
				if r.Check == "mtls" {
					mtlsDetail = r.Detail
				}
				key := r.Check
				if r.Env != "" {
					key += "/" + r.Env
				}
				if _, dup := got[key]; dup {
					t.Errorf("line %s twice", key)
				}
				got[key] = r.Status
				if r.Status != d1.Pass.String() && fix == "" {
					fix = r.Fix
				}
				if r.Status == d1.Pass.String() && r.Fix != "" || r.Status != d1.Pass.String() && r.Fix == "" {
					t.Errorf("%s: status %s with fix %q", key, r.Status, r.Fix)
				}
			}
			for _, key := range slices.Sorted(maps.Keys(want)) {
				w := want[key]
				if w == "-" {
					w = ""
				}
				if got[key] != w {
					t.Errorf("%s: %q, want %q", key, got[key], w)
				}
			}
			for key := range got {
				if _, ok := want[key]; !ok {
					t.Errorf("unexpected line %s", key)
				}
			}
			if code != tt.code {
				t.Errorf("exit %d, want %d; stderr %q", code, tt.code, stderr)
			}
			if tt.mtls == "" {
				tt.mtls = "completed (TLS 1.3)"
			}
			if got["mtls/PPR"] != "" && !strings.Contains(mtlsDetail, tt.mtls) {
				t.Errorf("mtls detail %q, want %q", mtlsDetail, tt.mtls)
			}
			if !strings.Contains(fix, tt.fix) {
				t.Errorf("fix %q, want %q", fix, tt.fix)
			}
			if t.Failed() || os.Getenv("DOCTOR_DEBUG") != "" {
				t.Logf("doctor printed:\n%s\n%s", stdout, stderr)
			}
			// Exit 1 comes with one line on stderr that names the failed checks; warnings alone are silent.
			if (code == 1) != strings.HasPrefix(stderr, "hsmagent: doctor: ") || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
				t.Errorf("stderr %q for exit %d", stderr, code)
			}
		})
	}
}

// TestDoctorText: the text checklist has one line per check with its
// status, environment and detail, a fix line under each problem, and a
// summary; labels found on the token make an environment without a config.
func TestDoctorText(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := fx.Open(t)
	// A PRD key with no certificate and an RSA 2048 PPR key: both wrong.
	if _, err := tok.GenerateKey("d1-prd-mtls", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.GenerateKey("d1-ppr-mtls", hsm.RSA2048, nil); err != nil {
		t.Fatal(err)
	}
	a := softhsmtest.StartAgent(t, tok, server.Options{Version: "test-text"})
	code, stdout, stderr := runCLI(t, "doctor", "--socket", a.Socket, "--module", fx.ModulePath, "--token", fx.Label, "--pin-file", fx.PINFile)
	if code != 1 || stderr != "hsmagent: doctor: 2 failed: PPR key, PRD certificate\n" {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
	for _, want := range []string{
		"WARN  -    config       no config file",
		"PASS  -    pin          logged in to",
		`FAIL  PPR  key          "d1-ppr-mtls": d1: RSA 2048-bit keys are not accepted by D1`,
		"fix: generate an ecdsa-p256 key",
		`PASS  PRD  key          "d1-prd-mtls": ecdsa-p256, sign only, sensitive, never extractable`,
		`FAIL  PRD  certificate  key "d1-prd-mtls" has no certificate`,
		"PASS  -    agent        version test-text, SERVING, 2 key(s) offered to this user",
		"PASS  -    served       the agent serves the token's 2 key(s) as stored",
		"\n8 pass, 1 warn, 2 fail\n",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("no %q in:\n%s", want, stdout)
		}
	}
}

// TestDoctorUsage: mistakes in how doctor is called exit 2 before any check.
func TestDoctorUsage(t *testing.T) {
	for _, args := range [][]string{
		{"doctor", "extra"},
		{"doctor", "--frobnicate"},
		{"doctor", "--token", "a", "--uri", "pkcs11:token=b"},
		{"doctor", "--timeout", "0s"},
	} {
		code, stdout, stderr := runCLI(t, args...)
		if code != 2 || stdout != "" || !strings.HasPrefix(stderr, "hsmagent: ") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want exit 2", args, code, stdout, stderr)
		}
	}
}

// TestDoctorConfigChecks: a config that the agent would refuse, or whose D1
// settings are wrong, fails the config line; DNS failures and IP addresses
// only warn (D1-C7).
func TestDoctorConfigChecks(t *testing.T) {
	tests := []struct {
		name, config string
		want         map[string]string
	}{
		{"access rule without users", "access:\n  - keys: [web]\n", map[string]string{"config": "fail"}},
		{"target not https", "d1:\n  PPR:\n    target: http://d1.example\n", map[string]string{"config": "fail"}},
		{"missing server_ca", "d1:\n  PPR:\n    server_ca: /nonexistent/ca.pem\n", map[string]string{"config": "fail"}},
		{"unknown setting", "d1:\n  PPR:\n    tagret: https://d1.example\n", map[string]string{"config": "fail"}},
		{"IP address target", "d1:\n  PPR:\n    target: https://192.0.2.1\n", map[string]string{"config": "pass", "dns/PPR": "warn"}},
		{"host that does not resolve", "d1:\n  PRD:\n    target: https://d1.invalid\n", map[string]string{"config": "pass", "dns/PRD": "warn"}},
		{"host that resolves", "d1:\n  PRD:\n    target: https://localhost\n", map[string]string{"config": "pass", "dns/PRD": "pass"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stdout, _ := runCLI(t, "doctor", "--config", writeConfig(t, tt.config), "--module", "/nonexistent/module.so", "--json", "--timeout", "2s")
			var results []checkResult
			if err := json.Unmarshal([]byte(stdout), &results); err != nil {
				t.Fatalf("not JSON: %v\n%s", err, stdout)
			}
			got := map[string]string{}
			for _, r := range results {
				got[strings.TrimSuffix(r.Check+"/"+r.Env, "/")] = r.Status
			}
			for k, w := range tt.want {
				if got[k] != w {
					t.Errorf("%s: %q, want %q (%+v)", k, got[k], w, results)
				}
			}
			if got["module"] != "fail" {
				t.Errorf("a module that does not exist: %q", got["module"])
			}
		})
	}
}

// TestDoctorKeyRoles: a key configured for one environment but named for
// the other fails (D1-G2) and is still checked in its own; a JWT key that
// cannot make ES256 assertions fails (D1-C8).
func TestDoctorKeyRoles(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := fx.Open(t)
	thales := softhsmtest.NewCA(t, "Test Thales CA")
	k, err := tok.GenerateKey("d1-prd-mtls", hsm.ECDSAP256, nil)
	if err != nil {
		t.Fatal(err)
	}
	leaf := thales.Leaf(t, pkix.Name{CommonName: "TLSMA-ECDSA/ABCDEFGHIJ/PRD"}, k.Public, time.Now().Add(-time.Hour), time.Now().Add(90*day))
	if err := tok.ImportChain("d1-prd-mtls", []*x509.Certificate{leaf}); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.GenerateKey("d1-ppr-jwt", hsm.RSA2048, nil); err != nil {
		t.Fatal(err)
	}
	cfg := writeConfig(t, "d1:\n  PPR:\n    key: d1-prd-mtls\n    jwt: {key: d1-ppr-jwt}\n")
	code, stdout, _ := runCLI(t, "doctor", "--config", cfg, "--module", fx.ModulePath, "--token", fx.Label, "--pin-file", fx.PINFile, "--json")
	var results []checkResult
	if err := json.Unmarshal([]byte(stdout), &results); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, stdout)
	}
	got := map[string]string{}
	for _, r := range results {
		got[strings.TrimSuffix(r.Check+"/"+r.Env, "/")] = r.Status
	}
	want := map[string]string{
		"key/PPR": "fail", "jwt-key/PPR": "fail",
		"key/PRD": "pass", "certificate/PRD": "pass", "chain/PRD": "pass", "cn/PRD": "pass", "expiry/PRD": "pass",
		"certificate/PPR": "", // not checked on a key of the other environment
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: %q, want %q", k, got[k], w)
		}
	}
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	if t.Failed() {
		t.Log(stdout)
	}
}

// TestDoctorServerKeyOnly: a key that only names an environment for the
// inbound side (d1-prd-server), with no d1 section asking for PRD, is not a
// missing mTLS client key: a warning, not a failure.
func TestDoctorServerKeyOnly(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := fx.Open(t)
	if _, err := tok.GenerateKey("d1-prd-server", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	a := softhsmtest.StartAgent(t, tok, server.Options{})
	code, stdout, stderr := runCLI(t, "doctor", "--socket", a.Socket, "--module", fx.ModulePath, "--token", fx.Label, "--pin-file", fx.PINFile)
	if code != 0 || !regexp.MustCompile(`WARN  PRD  key +no mTLS client key for PRD`).MatchString(stdout) {
		t.Errorf("exit %d, stderr %q, stdout:\n%s", code, stderr, stdout)
	}
}
