package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestCheckLoopback(t *testing.T) {
	for addr, ok := range map[string]bool{
		"127.0.0.1:8080": true, "[::1]:8080": true, "localhost:8080": true, "127.0.0.5:1": true,
		"0.0.0.0:8080": false, ":8080": false, "10.0.0.1:80": false, "example.com:80": false, "nonsense": false,
	} {
		if err := CheckLoopback(addr); (err == nil) != ok {
			t.Errorf("CheckLoopback(%q) = %v", addr, err)
		}
	}
}

// TestOAuthTokens checks the D1-S6 issuer without TLS: credentials, grant
// type, Bearer verification, expiry.
func TestOAuthTokens(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	o := &OAuth{ClientID: "d1", Secret: []byte("0123456789abcdef"), Signer: key, KeyID: "k", TTL: time.Second,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if err := o.Check(); err != nil {
		t.Fatal(err)
	}
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok auth="+r.Header.Get("Authorization"))
	}))
	defer backend.Close()
	u, _ := url.Parse(backend.URL)
	h := NewServer(u, o.Log, 0, o)

	token := func(id, secret, grant string) *httptest.ResponseRecorder {
		r := httptest.NewRequest("POST", TokenPath, strings.NewReader("grant_type="+grant))
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		r.SetBasicAuth(id, secret)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w
	}
	call := func(bearer string) *httptest.ResponseRecorder {
		r := httptest.NewRequest("GET", "/api", nil)
		if bearer != "" {
			r.Header.Set("Authorization", "Bearer "+bearer)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w
	}
	if w := token("d1", "wrong-secret-xxxx", "client_credentials"); w.Code != 401 {
		t.Errorf("wrong secret: %d", w.Code)
	}
	if w := token("d1", "0123456789abcdef", "password"); w.Code != 400 || !strings.Contains(w.Body.String(), "unsupported_grant_type") {
		t.Errorf("wrong grant: %d %s", w.Code, w.Body)
	}
	w := token("d1", "0123456789abcdef", "client_credentials")
	if w.Code != 200 {
		t.Fatalf("token: %d %s", w.Code, w.Body)
	}
	tok := strings.Split(strings.Split(w.Body.String(), `"access_token":"`)[1], `"`)[0]
	if w := call(tok); w.Code != 200 || w.Body.String() != "ok auth=" {
		t.Errorf("with token: %d %q", w.Code, w.Body)
	}
	if w := call(""); w.Code != 401 {
		t.Errorf("without token: %d", w.Code)
	}
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	forger := *o
	forger.Signer = other
	fw := httptest.NewRecorder()
	fr := httptest.NewRequest("POST", TokenPath, strings.NewReader("grant_type=client_credentials"))
	fr.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	fr.SetBasicAuth("d1", "0123456789abcdef")
	forger.Wrap(nil).ServeHTTP(fw, fr)
	forged := strings.Split(strings.Split(fw.Body.String(), `"access_token":"`)[1], `"`)[0]
	if w := call(forged); w.Code != 401 {
		t.Errorf("token signed by another key: %d", w.Code)
	}
	o.Now = func() time.Time { return time.Now().Add(10 * time.Second) } // past TTL and the 5 s leeway
	if w := call(tok); w.Code != 401 {
		t.Errorf("expired token: %d", w.Code)
	}
}
