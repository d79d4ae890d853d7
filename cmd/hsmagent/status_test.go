package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

// addKey stores a P-256 key under label in store, with a self-signed
// certificate that expires after notAfter (none if zero).
func addKey(t *testing.T, store *server.MemoryStore, label string, notAfter time.Duration) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var chain []*x509.Certificate
	if notAfter != 0 {
		chain = []*x509.Certificate{agenttest.SelfSigned(t, key, label+".example", time.Now().Add(notAfter))}
	}
	if err := store.Add(label, key, chain); err != nil {
		t.Fatal(err)
	}
}

const day = 24 * time.Hour

// TestStatus: the verdict and the exit status follow the certificates'
// expiry and the agent's health; the text names each key's certificate.
func TestStatus(t *testing.T) {
	tests := []struct {
		name   string
		keys   map[string]time.Duration // label -> certificate lifetime left (0: no certificate)
		code   int
		rows   map[string]string // label -> "SUBJECT DAYS" in its row
		stderr string
	}{
		{"all good", map[string]time.Duration{"long": 100*day + time.Hour, "jwt": 0}, 0,
			map[string]string{"long": "CN=long.example 100", "jwt": "- -"}, ""},
		{"expires within 30 days", map[string]time.Duration{"long": 100*day + time.Hour, "short": 10*day + time.Hour}, 1,
			map[string]string{"short": "CN=short.example 10", "long": "CN=long.example 100"}, `the certificate of key "short" expires in 10 days`},
		{"expired", map[string]time.Duration{"old": -day - time.Hour}, 1, map[string]string{"old": "CN=old.example -1"}, `the certificate of key "old" expired on`},
		{"no keys offered", nil, 0, nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store := server.NewMemoryStore()
			for label, left := range tt.keys {
				addKey(t, store, label, left)
			}
			a := agenttest.Start(t, store, server.Options{Version: "test-1.2"})
			code, stdout, stderr := runCLI(t, "status", "--socket", a.Socket)
			if code != tt.code {
				t.Fatalf("exit %d, want %d; stdout %q stderr %q", code, tt.code, stdout, stderr)
			}
			if !strings.Contains(stdout, "version: test-1.2\n") || !strings.Contains(stdout, "health:  SERVING\n") {
				t.Errorf("no version or health:\n%s", stdout)
			}
			if tt.keys == nil && !strings.Contains(stdout, "none offered") {
				t.Errorf("no keys, but not said:\n%s", stdout)
			}
			for label, want := range tt.rows {
				if got := statusRow(stdout, label); got != "ecdsa-p256 "+want {
					t.Errorf("row of %q: %q, want type, subject and days %q:\n%s", label, got, want, stdout)
				}
			}
			if tt.stderr == "" && stderr != "" || !strings.Contains(stderr, tt.stderr) {
				t.Errorf("stderr %q, want %q", stderr, tt.stderr)
			}
			if strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
				t.Errorf("error is not one line: %q", stderr)
			}
		})
	}
}

// statusRow returns the row of label in the table, without the label and
// the not-after column: "TYPE SUBJECT DAYS".
func statusRow(out, label string) string {
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) == 5 && f[0] == label {
			return strings.Join([]string{f[1], f[2], f[4]}, " ")
		}
	}
	return ""
}

func TestStatusJSON(t *testing.T) {
	store := server.NewMemoryStore()
	addKey(t, store, "long", 100*day+time.Hour)
	addKey(t, store, "short", 10*day+time.Hour)
	addKey(t, store, "jwt", 0)
	a := agenttest.Start(t, store, server.Options{Version: "test-1.2"})
	code, stdout, _ := runCLI(t, "status", "--json", "--socket", a.Socket)
	if code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	var v struct {
		Socket, Version, Health string
		Exit                    int
		Problems                []string
		Keys                    []struct {
			Label, Type, Subject string
			NotAfter             *time.Time
			DaysLeft             *int
		}
	}
	if err := json.Unmarshal([]byte(stdout), &v); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, stdout)
	}
	if v.Socket != a.Socket || v.Version != "test-1.2" || v.Health != "SERVING" || v.Exit != 1 || len(v.Problems) != 1 {
		t.Errorf("header fields: %+v", v)
	}
	want := map[string]int{"long": 100, "short": 10, "jwt": -1}
	if len(v.Keys) != len(want) {
		t.Fatalf("keys: %+v", v.Keys)
	}
	for _, k := range v.Keys {
		days, ok := want[k.Label]
		switch {
		case !ok:
			t.Errorf("unexpected key %q", k.Label)
		case days < 0 && (k.NotAfter != nil || k.DaysLeft != nil || k.Subject != ""):
			t.Errorf("key %q without a certificate has certificate fields: %+v", k.Label, k)
		case days >= 0 && (k.DaysLeft == nil || *k.DaysLeft != days || k.Subject != "CN="+k.Label+".example" || k.NotAfter == nil):
			t.Errorf("key %q: %+v, want %d days left", k.Label, k, days)
		}
	}
}

// TestStatusUnreachable: no agent, or a stopped one, is exit 2.
func TestStatusUnreachable(t *testing.T) {
	a := agenttest.Start(t, server.NewMemoryStore(), server.Options{})
	a.Stop()
	for _, sock := range []string{filepath.Join(agenttest.SocketDir(t), "none.sock"), a.Socket} {
		code, stdout, stderr := runCLI(t, "status", "--socket", sock, "--timeout", "300ms")
		if code != 2 || stdout != "" || !strings.Contains(stderr, "hsmagent: agent:") {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want exit 2 and one error", sock, code, stdout, stderr)
		}
	}
}

// TestStatusNotServing: an agent whose HSM is stuck reports NOT_SERVING, and
// status says so with exit 1.
func TestStatusNotServing(t *testing.T) {
	store := &hangingStore{MemoryStore: server.NewMemoryStore(), release: make(chan struct{})}
	defer close(store.release)
	addKey(t, store.MemoryStore, "long", 100*day)
	a := agenttest.Start(t, store, server.Options{HSMTimeout: 50 * time.Millisecond})
	client, err := agent.Dial(context.Background(), a.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	signer, err := client.Signer(context.Background(), "long")
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("x"))
	if _, err := signer.Sign(nil, digest[:], crypto.SHA256); err == nil {
		t.Fatal("a hung HSM signed")
	}
	code, stdout, stderr := runCLI(t, "status", "--socket", a.Socket)
	if code != 1 || !strings.Contains(stdout, "NOT_SERVING") || !strings.Contains(stderr, "agent health is NOT_SERVING") {
		t.Errorf("exit %d, stdout %q, stderr %q; want exit 1 and NOT_SERVING", code, stdout, stderr)
	}
}

// hangingStore's signers wait for release, as a hung HSM does.
type hangingStore struct {
	*server.MemoryStore
	release chan struct{}
}

func (s *hangingStore) Signer(label string) (crypto.Signer, error) {
	inner, err := s.MemoryStore.Signer(label)
	return hangingSigner{inner, s.release}, err
}

type hangingSigner struct {
	crypto.Signer
	release chan struct{}
}

func (h hangingSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	<-h.release
	return h.Signer.Sign(r, digest, opts)
}
