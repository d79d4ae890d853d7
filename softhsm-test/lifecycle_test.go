package softhsmtest

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestD1Onboarding walks the operator's path for one D1 environment with the
// built binary: generate, CSR, signature by an outside CA (openssl x509 -req),
// import, show and export (D1-K1, D1-C1..C5).
func TestD1Onboarding(t *testing.T) {
	fx := New(t)
	dir := t.TempDir()
	for _, tc := range []struct{ keyType, cnType string }{{"ecdsa-p256", "ECDSA"}, {"rsa-4096", "RSA"}} {
		t.Run(tc.keyType, func(t *testing.T) {
			label := "d1-ppr-" + tc.keyType
			fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", label, "--type", tc.keyType)...)

			csrPath := filepath.Join(dir, label+".csr")
			r := fx.ok(t, fx.args([]string{"csr"}, "--key", label, "--profile", "d1", "--issuer-id", "ABCDEFGHIJ",
				"--env", "preprod", "--country", "fr", "--state", "Ile-de-France", "--locality", "Paris",
				"--org", "Example Bank", "--org-unit", "Card Issuing", "--out", csrPath)...)
			wantCN := "TLSMA-" + tc.cnType + "/ABCDEFGHIJ/PPR"
			if !strings.Contains(r.stderr, "subject: /C=FR/ST=Ile-de-France/L=Paris/O=Example Bank/OU=Card Issuing/CN="+wantCN) ||
				!strings.Contains(r.stderr, "public key SHA-256: ") {
				t.Errorf("summary on stderr:\n%s", r.stderr)
			}
			// OpenSSL as the outside peer: the CSR verifies and has the D1 shape.
			out, err := exec.Command("openssl", "req", "-in", csrPath, "-noout", "-verify", "-subject", "-text").CombinedOutput()
			if err != nil {
				t.Fatalf("openssl req: %v\n%s", err, out)
			}
			text := string(out)
			for _, want := range []string{
				"verify OK",
				"subject=C = FR, ST = Ile-de-France, L = Paris, O = Example Bank, OU = Card Issuing, CN = " + wantCN,
				map[string]string{"ECDSA": "ecdsa-with-SHA256", "RSA": "sha256WithRSAEncryption"}[tc.cnType],
				map[string]string{"ECDSA": "NIST CURVE: P-256", "RSA": "Public-Key: (4096 bit)"}[tc.cnType],
			} {
				if !strings.Contains(text, want) {
					t.Errorf("openssl output lacks %q:\n%s", want, text)
				}
			}

			// The CA (standing in for Thales) signs the CSR with OpenSSL.
			caKey, caCert := opensslCA(t, dir)
			certPath := filepath.Join(dir, label+".crt")
			if out, err := exec.Command("openssl", "x509", "-req", "-in", csrPath, "-CA", caCert, "-CAkey", caKey,
				"-CAcreateserial", "-days", "90", "-out", certPath).CombinedOutput(); err != nil {
				t.Fatalf("openssl x509 -req: %v\n%s", err, out)
			}
			fx.ok(t, fx.args([]string{"cert", "import"}, "--key", label, "--cert", certPath, "--chain", caCert)...)

			var shown []struct {
				Subject  string `json:"subject"`
				DaysLeft int    `json:"daysLeft"`
			}
			r = fx.ok(t, fx.args([]string{"cert", "show"}, "--key", label, "--json")...)
			if err := json.Unmarshal([]byte(r.stdout), &shown); err != nil {
				t.Fatalf("cert show --json: %v\n%s", err, r.stdout)
			}
			if len(shown) != 2 || !strings.Contains(shown[0].Subject, "CN="+wantCN) || shown[0].DaysLeft < 88 {
				t.Errorf("cert show: %+v", shown)
			}
			r = fx.ok(t, fx.args([]string{"cert", "export"}, "--key", label)...)
			want, _ := os.ReadFile(certPath)
			if !strings.HasPrefix(r.stdout, string(want)) || strings.Count(r.stdout, "BEGIN CERTIFICATE") != 2 {
				t.Errorf("exported chain does not start with the imported leaf:\n%s", r.stdout)
			}
		})
	}

	var keys []struct {
		Label   string `json:"label"`
		Type    string `json:"type"`
		HasCert bool   `json:"hasCertificate"`
	}
	r := fx.ok(t, fx.args([]string{"keys", "list"}, "--json")...)
	if err := json.Unmarshal([]byte(r.stdout), &keys); err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || keys[0].Label != "d1-ppr-ecdsa-p256" || keys[0].Type != "ecdsa-p256" || !keys[0].HasCert ||
		keys[1].Type != "rsa-4096" {
		t.Errorf("keys list: %+v", keys)
	}
}

// opensslCA makes a CA key and certificate with OpenSSL, once per directory.
func opensslCA(t *testing.T, dir string) (keyPath, certPath string) {
	t.Helper()
	keyPath, certPath = filepath.Join(dir, "ca.key"), filepath.Join(dir, "ca.crt")
	if _, err := os.Stat(certPath); err == nil {
		return keyPath, certPath
	}
	out, err := exec.Command("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", keyPath, "-out", certPath, "-days", "365", "-subj", "/O=Test/CN=Test Thales CA").CombinedOutput()
	if err != nil {
		t.Fatalf("openssl CA: %v\n%s", err, out)
	}
	return keyPath, certPath
}

func writePEM(t *testing.T, path string, certs ...*x509.Certificate) string {
	t.Helper()
	var data []byte
	for _, c := range certs {
		data = append(data, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestCLIErrors runs the binary the way operators get it wrong: each error is
// one line on stderr, exit status 1 (2 for usage), and never shows the PIN.
func TestCLIErrors(t *testing.T) {
	fx := New(t)
	dir := t.TempDir()
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "d1-ppr", "--type", "ecdsa-p256")...)
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "other", "--type", "ecdsa-p256")...)
	badPIN := filepath.Join(dir, "bad.pin")
	os.WriteFile(badPIN, []byte("99999999\n"), 0o600)

	ca := NewCA(t, "Test CA")
	key := fx.Open(t)
	other, err := key.Key("other")
	if err != nil {
		t.Fatal(err)
	}
	mine, err := key.Key("d1-ppr")
	if err != nil {
		t.Fatal(err)
	}
	key.Close()
	now := time.Now()
	foreign := writePEM(t, filepath.Join(dir, "foreign.pem"), ca.Leaf(t, pkix.Name{CommonName: "x"}, other.Public, now.Add(-time.Hour), now.Add(time.Hour)))
	expired := writePEM(t, filepath.Join(dir, "expired.pem"), ca.Leaf(t, pkix.Name{CommonName: "old"}, mine.Public, now.Add(-48*time.Hour), now.Add(-24*time.Hour)))
	garbage := filepath.Join(dir, "garbage.pem")
	os.WriteFile(garbage, []byte("not a certificate\n"), 0o644)
	keyFile := filepath.Join(dir, "key.pem")
	os.WriteFile(keyFile, []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), 0o600)

	d1CSR := []string{"csr", "--key", "d1-ppr", "--profile", "d1", "--issuer-id", "ABCDEFGHIJ", "--env", "PPR",
		"--country", "FR", "--state", "S", "--locality", "L", "--org", "O", "--org-unit", "OU"}
	withFlag := func(args []string, flag, value string) []string {
		out := append([]string(nil), args...)
		for i := range out {
			if out[i] == flag {
				out[i+1] = value
			}
		}
		return out
	}
	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"wrong PIN", []string{"keys", "list", "--token", fx.Label, "--pin-file", badPIN}, 1, "wrong PIN"},
		{"token not found", []string{"keys", "list", "--token", "nope", "--pin-file", fx.PINFile}, 1, `token "nope" not found; tokens present: "` + fx.Label + `"`},
		{"module missing", fx.args([]string{"keys", "list"}, "--module", "/nonexistent/libp11.so"), 1, `module "/nonexistent/libp11.so" not found`},
		{"no token selected", []string{"keys", "list", "--pin-file", fx.PINFile}, 2, "no token selected"},
		{"no PIN source", []string{"keys", "list", "--token", fx.Label}, 1, "no PIN: pass --pin-file"},
		{"key not found", fx.args([]string{"cert", "show"}, "--key", "nope"), 1, `key "nope" not found on token "` + fx.Label + `"; keys present: ["d1-ppr" "other"]`},
		{"duplicate label", fx.args([]string{"keys", "generate"}, "--label", "d1-ppr"), 1, `a key labelled "d1-ppr" exists already`},
		{"unsupported key type", fx.args([]string{"keys", "generate"}, "--label", "x", "--type", "ed25519"), 2, "unsupported key type \"ed25519\"; use one of ecdsa-p256"},
		{"delete without --yes", fx.args([]string{"keys", "delete"}, "--label", "d1-ppr"), 2, "add --yes"},
		{"bad country", fx.args(withFlag(d1CSR, "--country", "FRA")), 2, `country "FRA" is not a two-letter`},
		{"bad env", fx.args(withFlag(d1CSR, "--env", "DEV")), 2, `environment "DEV" is not PPR or PRD`},
		{"bad issuerId", fx.args(withFlag(d1CSR, "--issuer-id", "AB,CN=x")), 2, `issuerId "AB,CN=x" may only hold`},
		{"env differs from key label (D1-G2)", fx.args(withFlag(d1CSR, "--env", "PRD")), 2, "separate key per environment"},
		{"no CSR mode", fx.args([]string{"csr"}, "--key", "d1-ppr"), 2, "give --profile d1"},
		{"certificate of another key", fx.args([]string{"cert", "import"}, "--key", "d1-ppr", "--cert", foreign), 1, `does not belong to key "d1-ppr": its public key differs`},
		{"expired certificate", fx.args([]string{"cert", "import"}, "--key", "d1-ppr", "--cert", expired), 1, "expired on"},
		{"neither PEM, DER nor PKCS #7", fx.args([]string{"cert", "import"}, "--key", "d1-ppr", "--cert", garbage), 1, "is neither PEM (-----BEGIN CERTIFICATE-----), a DER certificate nor PKCS #7"},
		{"private key in PEM", fx.args([]string{"cert", "import"}, "--key", "d1-ppr", "--cert", keyFile), 1, "holds a private key"},
		{"no certificate yet", fx.args([]string{"cert", "export"}, "--key", "d1-ppr"), 1, "no certificate stored"},
		{"unknown flag", fx.args([]string{"keys", "list"}, "--bogus"), 2, "unknown flag --bogus"},
		{"pin-value in URI", []string{"keys", "list", "--uri", "pkcs11:token=" + fx.Label + "?pin-value=" + fx.PIN}, 2, "pin-value"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := fx.hsmagent(t, tt.args...)
			if r.code != tt.code {
				t.Errorf("exit %d, want %d; stderr: %s", r.code, tt.code, r.stderr)
			}
			lines := errorLines(r.stderr)
			if len(lines) != 1 || !strings.HasPrefix(lines[0], "hsmagent: ") {
				t.Errorf("want one 'hsmagent: ' line on stderr, got:\n%s", r.stderr)
			}
			if !strings.Contains(r.stderr, tt.want) {
				t.Errorf("stderr %q lacks %q", r.stderr, tt.want)
			}
		})
	}
}

// TestURIAndEnvironmentSelection uses the RFC 7512 URI and HSMAGENT_* variables instead of flags.
func TestURIAndEnvironmentSelection(t *testing.T) {
	fx := New(t)
	uri := "pkcs11:token=" + fx.Label + ";object=uri-key?module-path=" + fx.ModulePath + "&pin-source=file:" + fx.PINFile
	fx.ok(t, "keys", "generate", "--uri", uri)
	r := fx.hsmagentEnv(t, []string{"HSMAGENT_TOKEN=" + fx.Label, "HSMAGENT_PIN=" + fx.PIN}, "keys", "list")
	if r.code != 0 || !strings.Contains(r.stdout, "uri-key") {
		t.Errorf("keys list via environment: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	r = fx.ok(t, "tokens", "--json")
	if !strings.Contains(r.stdout, `"label": "`+fx.Label+`"`) {
		t.Errorf("tokens --json: %s", r.stdout)
	}
	fx.ok(t, "keys", "delete", "--uri", uri, "--yes")
	r = fx.ok(t, fx.args([]string{"keys", "list"}, "--json")...)
	if strings.TrimSpace(r.stdout) != "[]" {
		t.Errorf("after delete: %s", r.stdout)
	}
}

// TestBrokenSoftHSMConfigIsNamed: a SoftHSM that cannot start says which
// configuration file to check.
func TestBrokenSoftHSMConfigIsNamed(t *testing.T) {
	fx := New(t)
	r := fx.hsmagentEnv(t, []string{"SOFTHSM2_CONF=/nonexistent/softhsm2.conf"}, fx.args([]string{"keys", "list"})...)
	if r.code != 1 || !strings.Contains(r.stderr, `check the configuration file "/nonexistent/softhsm2.conf"`) {
		t.Errorf("exit %d: %s", r.code, r.stderr)
	}
}
