package d1_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hsmagent/hsmagent/agent/d1"
)

// tokenEndpoint stands in for D1's OAuth endpoint: it checks the assertion's
// ES256 signature against the registered key and its claims (D1-C8), and
// hands out numbered tokens.
type tokenEndpoint struct {
	t        *testing.T
	key      *ecdsa.PublicKey
	kid      string
	issued   atomic.Int64
	lifetime atomic.Int64
	refuse   atomic.Bool
	mu       sync.Mutex
	problems []string
}

func (e *tokenEndpoint) problem(format string, args ...any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.problems = append(e.problems, fmt.Sprintf(format, args...))
}

func (e *tokenEndpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/authz/v1/oauth2/token":
	case "/api":
		fmt.Fprint(w, r.Header.Get("Authorization"))
		return
	default:
		http.NotFound(w, r)
		return
	}
	if e.refuse.Load() {
		http.Error(w, `{"error":"invalid_client","error_description":"unknown kid"}`, http.StatusUnauthorized)
		return
	}
	if r.FormValue("grant_type") != d1.JWTBearerGrant {
		e.problem("grant_type %q", r.FormValue("grant_type"))
	}
	tok, err := jwt.ParseSigned(r.FormValue("assertion"), []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		e.problem("parse: %v", err)
		http.Error(w, "bad assertion", http.StatusBadRequest)
		return
	}
	if tok.Headers[0].KeyID != e.kid {
		e.problem("kid %q", tok.Headers[0].KeyID)
	}
	var c jwt.Claims
	if err := tok.Claims(e.key, &c); err != nil {
		e.problem("signature: %v", err)
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	now := time.Now()
	if c.Issuer != "AGGREGATOR" || c.Subject != "ABCDEFGHIJ" || len(c.Audience) != 1 || c.Audience[0] != "https://d1.test" || c.ID == "" {
		e.problem("claims %+v", c)
	}
	if c.Expiry == nil || c.IssuedAt == nil || c.Expiry.Time().After(now.Add(15*time.Minute)) || c.Expiry.Time().Before(now) {
		e.problem("exp %v iat %v", c.Expiry, c.IssuedAt)
	}
	n := e.issued.Add(1)
	json.NewEncoder(w).Encode(map[string]any{"access_token": fmt.Sprintf("token-%d", n), "token_type": "Bearer", "expires_in": e.lifetime.Load()})
}

// TestJWTBearerFlow (D1-C8): the assertion is signed in the HSM through the
// agent with ES256, verified by the endpoint, the token is shared by
// concurrent callers, renewed shortly before it expires, and sent as Bearer.
func TestJWTBearerFlow(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	signer, err := w.client.Signer(ctx, "d1-ppr-jwt")
	if err != nil {
		t.Fatal(err)
	}
	ep := &tokenEndpoint{t: t, key: signer.Public().(*ecdsa.PublicKey), kid: "kid-ppr-1"}
	ep.lifetime.Store(900)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := w.amazon.Leaf(t, pkix.Name{CommonName: "d1.test"}, &key.PublicKey, time.Now().Add(-time.Hour), time.Now().Add(time.Hour), "localhost")
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{leaf.Raw, w.amazon.Intermediate.Raw}, PrivateKey: key}},
		ClientAuth:   tls.RequireAndVerifyClientCert, ClientCAs: w.thales.Pool()})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: ep, ErrorLog: quietLog}
	go srv.Serve(l)
	defer srv.Close()
	base := fmt.Sprintf("https://localhost:%d", l.Addr().(*net.TCPAddr).Port)

	hc, err := d1.NewHTTPClient(w.options(d1.PreProd, "d1-ppr-mtls"))
	if err != nil {
		t.Fatal(err)
	}
	bearer := &d1.JWTBearer{Signer: signer, KeyID: "kid-ppr-1", IssuerID: "ABCDEFGHIJ", Issuer: "AGGREGATOR",
		Audience: "https://d1.test", TokenURL: base + "/authz/v1/oauth2/token", HTTPClient: hc}
	ts, err := bearer.TokenSource()
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	tokens := make([]string, 20)
	for i := range tokens {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok, err := ts.Token()
			if err != nil {
				t.Error(err)
				return
			}
			tokens[i] = tok.AccessToken
		}()
	}
	wg.Wait()
	for _, tok := range tokens {
		if tok != "token-1" {
			t.Fatalf("concurrent callers got %q; want one shared token-1", tokens)
		}
	}
	api := &http.Client{Transport: d1.BearerTransport(hc.Transport, ts)}
	resp, err := api.Get(base + "/api")
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(got) != "Bearer token-1" {
		t.Errorf("API saw Authorization %q", got)
	}

	t.Run("renewed shortly before expiry", func(t *testing.T) {
		ep.lifetime.Store(61) // with the one-minute margin it is stale after a second
		b2 := *bearer
		ts2, _ := b2.TokenSource()
		first, err := ts2.Token()
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(1200 * time.Millisecond)
		second, err := ts2.Token()
		if err != nil || second.AccessToken == first.AccessToken {
			t.Errorf("token not renewed: %v then %v (%v)", first.AccessToken, second.AccessToken, err)
		}
	})
	t.Run("endpoint errors carry status and body", func(t *testing.T) {
		ep.refuse.Store(true)
		defer ep.refuse.Store(false)
		_, err := bearer.Token()
		if err == nil || !strings.Contains(err.Error(), "401 Unauthorized") || !strings.Contains(err.Error(), "unknown kid") {
			t.Errorf("got %v", err)
		}
	})
	t.Run("only ES256 P-256 keys", func(t *testing.T) {
		p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
		b := *bearer
		b.Signer = p384
		if _, err := b.Assertion(); err == nil || !strings.Contains(err.Error(), "ES256") {
			t.Errorf("got %v", err)
		}
		b = *bearer
		b.Lifetime = 16 * time.Minute
		if _, err := b.Assertion(); err == nil || !strings.Contains(err.Error(), "15 minutes") {
			t.Errorf("got %v", err)
		}
	})
	ep.mu.Lock()
	defer ep.mu.Unlock()
	for _, p := range ep.problems {
		t.Errorf("token endpoint: %s", p)
	}
}
