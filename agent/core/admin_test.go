package core

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"log/slog"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
)

// syncBuffer is an audit sink the test reads while the core writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// records are the audit records of msg "admin", decoded.
func (s *syncBuffer) records(t *testing.T) []map[string]any {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(s.b.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		if m["msg"] == "admin" {
			out = append(out, m)
		}
	}
	return out
}

type adminWorld struct {
	core  *Core
	store *MemoryStore
	audit *syncBuffer
}

var (
	rootPeer     = Peer{UID: 0, GID: 0, PID: 1}
	operatorPeer = Peer{UID: 4100, GID: 4100, PID: 2, Groups: []int{4200}} // in the admin group by a supplementary group
	strangerPeer = Peer{UID: 4300, GID: 4300, PID: 3}
)

func newAdminWorld(t *testing.T) *adminWorld {
	t.Helper()
	store := NewMemoryStore()
	if _, err := store.Generate("web", "ecdsa-p256"); err != nil {
		t.Fatal(err)
	}
	policy, err := NewPolicyWithAdmin(nil, AdminRule{Groups: []string{"4200"}})
	if err != nil {
		t.Fatal(err)
	}
	audit := &syncBuffer{}
	c, err := New(store, Options{Policy: policy, Logger: slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)),
		Audit: slog.New(slog.NewJSONHandler(audit, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return &adminWorld{core: c, store: store, audit: audit}
}

// testCA issues certificates for the import tests.
type testCA struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
}

func newTestCA(t *testing.T, cn string) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{key: key, cert: cert}
}

func (ca *testCA) leaf(t *testing.T, cn string, pub crypto.PublicKey, notAfter time.Time) *x509.Certificate {
	t.Helper()
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-2 * time.Hour), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return cert
}

func ders(certs ...*x509.Certificate) [][]byte {
	var out [][]byte
	for _, c := range certs {
		out = append(out, c.Raw)
	}
	return out
}

func TestPolicyIsAdmin(t *testing.T) {
	p, err := NewPolicyWithAdmin(nil, AdminRule{Users: []string{"4100"}, Groups: []string{"4200"}})
	if err != nil {
		t.Fatal(err)
	}
	def, err := NewPolicy(nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		policy *Policy
		peer   Peer
		want   bool
	}{
		{"root, no rule", def, Peer{UID: 0, GID: 0}, true},
		{"anyone else, no rule", def, Peer{UID: 4100, GID: 4100}, false},
		{"user named", p, Peer{UID: 4100, GID: 1}, true},
		{"primary group", p, Peer{UID: 7, GID: 4200}, true},
		{"supplementary group", p, Peer{UID: 7, GID: 7, Groups: []int{1, 4200}}, true},
		{"stranger", p, Peer{UID: 7, GID: 7, Groups: []int{1}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.policy.IsAdmin(tt.peer); got != tt.want {
				t.Errorf("IsAdmin = %v, want %v", got, tt.want)
			}
		})
	}
	if _, err := NewPolicyWithAdmin(nil, AdminRule{Users: []string{"no-such-user-hsmagent"}}); err == nil {
		t.Error("an admin rule naming an unknown user was accepted")
	} else if re := (*AdminRuleError)(nil); !errors.As(err, &re) || !strings.Contains(err.Error(), `admin rule: unknown user "no-such-user-hsmagent"`) {
		t.Errorf("unknown admin user: %v", err)
	}
}

func TestAdminRefusesNonAdmins(t *testing.T) {
	w := newAdminWorld(t)
	ctx := context.Background()
	calls := []struct {
		op   string
		call func() error
	}{
		{"token", func() error { _, _, err := w.core.AdminToken(ctx, strangerPeer); return err }},
		{"keys", func() error { _, _, err := w.core.AdminKeys(ctx, strangerPeer); return err }},
		{"generate-key", func() error { _, _, err := w.core.GenerateKey(ctx, strangerPeer, "new", "ecdsa-p256"); return err }},
		{"delete-key", func() error { _, err := w.core.DeleteKey(ctx, strangerPeer, "web"); return err }},
		{"import-certificate", func() error {
			_, err := w.core.ImportCertificate(ctx, strangerPeer, &agentpb.ImportCertificateRequest{Label: "web"})
			return err
		}},
		{"create-csr", func() error { _, _, err := w.core.CreateCSR(ctx, strangerPeer, "web", nil); return err }},
	}
	for i, tt := range calls {
		t.Run(tt.op, func(t *testing.T) {
			err := tt.call()
			if CodeOf(err) != CodePermissionDenied || RequestIDOf(err) == "" ||
				!strings.Contains(err.Error(), "uid 4300 may not change the agent's keys: its admin rule allows root, groups 4200") ||
				!strings.Contains(err.Error(), "admin:") {
				t.Fatalf("refusal: %v (%v)", err, CodeOf(err))
			}
			recs := w.audit.records(t)
			if len(recs) != i+1 {
				t.Fatalf("%d admin records, want %d", len(recs), i+1)
			}
			r := recs[i]
			if r["op"] != tt.op || r["uid"] != float64(4300) || r["result"] != "not-admin" || r["code"] != "PermissionDenied" || r["request_id"] != RequestIDOf(err) {
				t.Errorf("record: %v", r)
			}
		})
	}
	if _, err := w.store.Signer("web"); err != nil {
		t.Errorf("the refused delete deleted: %v", err)
	}
}

func TestAdminGenerateAndDelete(t *testing.T) {
	w := newAdminWorld(t)
	ctx := context.Background()
	long := strings.Repeat("k", MaxLabel+1)
	tests := []struct {
		name, label, keyType string
		code                 Code
		want                 string
	}{
		{"ecdsa-p256", "d1-ppr-mtls", "ecdsa-p256", CodeOK, ""},
		{"rsa-2048", "jwt", "rsa-2048", CodeOK, ""},
		{"label in use", "web", "ecdsa-p256", CodeAlreadyExists, `a key labelled "web" exists already`},
		{"empty label", "", "ecdsa-p256", CodeInvalidArgument, "the key label is empty"},
		{"control character", "a\nb", "ecdsa-p256", CodeInvalidArgument, "control or non-printable"},
		{"too long", long, "ecdsa-p256", CodeInvalidArgument, "longer than"},
		{"bad UTF-8", "a\xffb", "ecdsa-p256", CodeInvalidArgument, "not valid UTF-8"},
		{"unknown type", "x", "ed25519", CodeInvalidArgument, `unsupported key type "ed25519"`},
		{"a successor's label", "web/successor", "ecdsa-p256", CodeInvalidArgument, "only a rotation makes; to rotate the key: hsmagent keys rotate --label web"},
		{"a retired key's label", "web/retired-20990101T000000Z", "ecdsa-p256", CodeInvalidArgument, "only a rotation makes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := w.core.Revision()
			changed := w.core.state.Load().changed
			k, rid, err := w.core.GenerateKey(ctx, operatorPeer, tt.label, tt.keyType)
			if CodeOf(err) != tt.code || (err != nil && !strings.Contains(err.Error(), tt.want)) || rid == "" {
				t.Fatalf("GenerateKey: %v (%v), want %v %q", err, CodeOf(err), tt.code, tt.want)
			}
			recs := w.audit.records(t)
			last := recs[len(recs)-1]
			if last["op"] != "generate-key" || last["request_id"] != rid || last["code"] != tt.code.String() || last["uid"] != float64(4100) {
				t.Errorf("record: %v", last)
			}
			if tt.code != CodeOK {
				if w.core.Revision() != before {
					t.Error("a refused generate changed the revision")
				}
				return
			}
			if k.Label != tt.label || w.core.Revision() != before+1 {
				t.Errorf("key %v, revision %d after %d", k.Label, w.core.Revision(), before)
			}
			select {
			case <-changed: // watchers are told
			default:
				t.Error("the state a watcher waits on was not replaced")
			}
			pub, _ := x509.ParsePKIXPublicKey(k.PublicKey)
			if last["result"] != "ok" || last["key"] != tt.label || last["key_type"] != tt.keyType || last["public_key_sha256"] != PublicKeyFingerprint(pub) {
				t.Errorf("record: %v", last)
			}
			if resp, _, _ := w.core.List(ctx, rootPeer); len(resp.Keys) == 0 || !hasKey(resp, tt.label) {
				t.Errorf("the listing lacks %q", tt.label)
			}
		})
	}

	for _, tt := range []struct {
		name, label string
		code        Code
	}{
		{"deleted", "jwt", CodeOK},
		{"unknown", "nope", CodeNotFound},
	} {
		t.Run("delete "+tt.name, func(t *testing.T) {
			_, err := w.core.DeleteKey(ctx, operatorPeer, tt.label)
			if CodeOf(err) != tt.code {
				t.Fatalf("DeleteKey: %v", err)
			}
			if resp, _, _ := w.core.List(ctx, rootPeer); hasKey(resp, tt.label) {
				t.Errorf("%q still listed", tt.label)
			}
			recs := w.audit.records(t)
			if last := recs[len(recs)-1]; last["op"] != "delete-key" || last["code"] != tt.code.String() {
				t.Errorf("record: %v", last)
			}
		})
	}
}

func hasKey(resp *agentpb.ListKeysResponse, label string) bool {
	for _, k := range resp.GetKeys() {
		if k.Label == label {
			return true
		}
	}
	return false
}

func TestAdminImportCertificate(t *testing.T) {
	w := newAdminWorld(t)
	ctx := context.Background()
	if _, err := w.store.Generate("other", "ecdsa-p256"); err != nil {
		t.Fatal(err)
	}
	if err := w.core.Reload(nil); err != nil {
		t.Fatal(err)
	}
	web, _ := w.store.Signer("web")
	other, _ := w.store.Signer("other")
	ca, ca2 := newTestCA(t, "CA one"), newTestCA(t, "CA two")
	later := time.Now().Add(12 * time.Hour)
	first := ca.leaf(t, "first", web.Public(), later)

	tests := []struct {
		name      string
		certs     [][]byte
		replace   bool
		code      Code
		want      string
		chain     int // chain certificates stored after
		kept      int
		wantFirst string
	}{
		{"leaf and CA, CA first", ders(ca.cert, first), false, CodeOK, "", 1, 0, "first"},
		{"renewal, leaf alone keeps the chain", ders(ca.leaf(t, "second", web.Public(), later)), false, CodeOK, "", 1, 1, "second"},
		{"leaf of another CA alone: stored chain does not link", ders(ca2.leaf(t, "third", web.Public(), later)), false, CodeFailedPrecondition, "do not link to the new certificate", 1, 0, "second"},
		{"replace_chain drops the stored chain", ders(ca2.leaf(t, "third", web.Public(), later)), true, CodeOK, "", 0, 0, "third"},
		{"another key's certificate", ders(ca.leaf(t, "x", other.Public(), later)), false, CodeInvalidArgument, `does not belong to key "web"`, 0, 0, "third"},
		{"expired", ders(ca.leaf(t, "old", web.Public(), time.Now().Add(-time.Hour))), false, CodeInvalidArgument, "expired on", 0, 0, "third"},
		{"not DER", [][]byte{[]byte("-----BEGIN CERTIFICATE-----")}, false, CodeInvalidArgument, "certificate 1 of 1 is not a DER X.509 certificate", 0, 0, "third"},
		{"none", nil, false, CodeInvalidArgument, "no certificate to import", 0, 0, "third"},
		{"chain that does not link", ders(ca.leaf(t, "y", web.Public(), later), ca2.cert), false, CodeInvalidArgument, "does not link", 0, 0, "third"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := w.core.ImportCertificate(ctx, operatorPeer, &agentpb.ImportCertificateRequest{Label: "web", Certificates: tt.certs, ReplaceChain: tt.replace})
			if CodeOf(err) != tt.code || (err != nil && !strings.Contains(err.Error(), tt.want)) {
				t.Fatalf("ImportCertificate: %v (%v), want %v %q", err, CodeOf(err), tt.code, tt.want)
			}
			keys, _ := w.store.Keys()
			var stored []*x509.Certificate
			for _, k := range keys {
				if k.Label == "web" {
					stored = k.Chain
				}
			}
			if len(stored) != tt.chain+1 || stored[0].Subject.CommonName != tt.wantFirst {
				t.Fatalf("stored chain: %d certificates, leaf %q", len(stored), stored[0].Subject.CommonName)
			}
			recs := w.audit.records(t)
			last := recs[len(recs)-1]
			if last["op"] != "import-certificate" || last["code"] != tt.code.String() {
				t.Errorf("record: %v", last)
			}
			if tt.code != CodeOK {
				return
			}
			if int(resp.KeptChain) != tt.kept || len(resp.Key.CertificateChain) != tt.chain+1 ||
				last["serial"] != stored[0].SerialNumber.Text(16) || last["chain"] != float64(tt.chain) {
				t.Errorf("answer kept %d, %d served; record %v", resp.KeptChain, len(resp.Key.CertificateChain), last)
			}
			// What the agent serves is what it stored: no reload needed.
			if got, _, _ := w.core.List(ctx, rootPeer); !bytes.Equal(got.Keys[len(got.Keys)-1].CertificateChain[0], stored[0].Raw) {
				t.Error("the agent does not serve the imported leaf")
			}
		})
	}
}

func TestAdminCreateCSR(t *testing.T) {
	w := newAdminWorld(t)
	ctx := context.Background()
	throwaway, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	subject := pkix.Name{Country: []string{"FR"}, Organization: []string{"Example"}, CommonName: "TLSMA-ECDSA/ABC/PPR"}
	template, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: subject, DNSNames: []string{"a.example"}}, throwaway)
	if err != nil {
		t.Fatal(err)
	}
	tmpl, _ := x509.ParseCertificateRequest(template)
	web, _ := w.store.Signer("web")
	tests := []struct {
		name, label string
		template    []byte
		code        Code
		want        string
	}{
		{"signed by the key", "web", template, CodeOK, ""},
		{"not a CSR", "web", []byte("garbage"), CodeInvalidArgument, "not a DER PKCS #10 request"},
		{"unknown key", "nope", template, CodeNotFound, `no key labelled "nope"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			der, rid, err := w.core.CreateCSR(ctx, operatorPeer, tt.label, tt.template)
			if CodeOf(err) != tt.code || (err != nil && !strings.Contains(err.Error(), tt.want)) {
				t.Fatalf("CreateCSR: %v, want %v %q", err, tt.code, tt.want)
			}
			recs := w.audit.records(t)
			if last := recs[len(recs)-1]; last["op"] != "create-csr" || last["request_id"] != rid || last["code"] != tt.code.String() {
				t.Errorf("record: %v", last)
			}
			if tt.code != CodeOK {
				return
			}
			csr, err := x509.ParseCertificateRequest(der)
			if err != nil || csr.CheckSignature() != nil {
				t.Fatalf("CSR: %v", err)
			}
			if !web.Public().(*ecdsa.PublicKey).Equal(csr.PublicKey) {
				t.Error("the CSR does not carry the key's public key")
			}
			if !bytes.Equal(csr.RawSubject, tmpl.RawSubject) || len(csr.DNSNames) != 1 || csr.DNSNames[0] != "a.example" ||
				csr.SignatureAlgorithm != x509.ECDSAWithSHA256 {
				t.Errorf("CSR subject %s, names %v, algorithm %v", csr.Subject, csr.DNSNames, csr.SignatureAlgorithm)
			}
		})
	}
}

// labelledStore is a MemoryStore that names its token, as the HSM stores do.
type labelledStore struct{ *MemoryStore }

func (labelledStore) TokenLabel() string { return "issuer" }

func TestAdminToken(t *testing.T) {
	ctx := context.Background()
	for _, tt := range []struct {
		name  string
		store KeyStore
		want  string
	}{
		{"a token", labelledStore{NewMemoryStore()}, "issuer"},
		{"no token", NewMemoryStore(), ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := New(tt.store, Options{Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			got, rid, err := c.AdminToken(ctx, rootPeer)
			if err != nil || got != tt.want || rid == "" {
				t.Errorf("AdminToken = %q %q %v, want %q", got, rid, err, tt.want)
			}
		})
	}
}

// failingWriter is an audit sink that fails while broken is set.
type failingWriter struct {
	mu     sync.Mutex
	broken bool
}

func (f *failingWriter) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.broken {
		return 0, errors.New("disk full")
	}
	return len(p), nil
}

// TestAdminRefusedWhileAuditDown: no change is made while the trail
// cannot record it, and the one whose record failed says so.
func TestAdminRefusedWhileAuditDown(t *testing.T) {
	store := NewMemoryStore()
	sink := &failingWriter{}
	c, err := New(store, Options{Logger: slog.New(slog.DiscardHandler), Audit: slog.New(slog.NewJSONHandler(sink, nil)), AuditProbeEvery: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	sink.mu.Lock()
	sink.broken = true
	sink.mu.Unlock()
	_, _, err = c.GenerateKey(ctx, rootPeer, "first", "ecdsa-p256")
	if CodeOf(err) != CodeUnavailable || !strings.Contains(err.Error(), "was made, but its audit record could not be written") {
		t.Fatalf("change whose record failed: %v", err)
	}
	_, _, err = c.GenerateKey(ctx, rootPeer, "second", "ecdsa-p256")
	if CodeOf(err) != CodeUnavailable || !strings.Contains(err.Error(), "audit trail cannot be written") {
		t.Fatalf("change while the trail is down: %v", err)
	}
	if _, err := store.Signer("second"); err == nil {
		t.Error("a key was generated while the audit trail could not record it")
	}
}
