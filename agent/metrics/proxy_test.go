package metrics_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/agent/metrics"
	"github.com/hsmagent/hsmagent/agent/proxy"
)

// scrape serves m on a loopback listener and returns one scrape, checked by
// promtool.
func scrape(t *testing.T, h http.Handler) string {
	t.Helper()
	l, err := metrics.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go metrics.Serve(l, h)
	resp, err := http.Get("http://" + l.Addr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	cmd := exec.Command(promtool(t), "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
	return string(body)
}

func checkSeries(t *testing.T, text string, want []string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(text, w) {
			t.Errorf("metrics lack %q", w)
		}
	}
	if t.Failed() {
		t.Logf("scrape:\n%s", text)
	}
}

// deadURL is an address nothing listens on: calls to it fail at connect.
func deadURL(t *testing.T) *url.URL {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return &url.URL{Scheme: "http", Host: addr}
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// TestProxyClientScrape: the client proxy's metrics count requests by
// status class, time the calls to a stand-in D1, count the token fetches
// (one good, one refused by the token endpoint) and follow the current
// token's expiry; promtool accepts the scrape.
func TestProxyClientScrape(t *testing.T) {
	d1Stub := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/token":
			if r.URL.Query().Get("fail") != "" {
				http.Error(w, `{"error":"invalid_grant"}`, http.StatusBadRequest)
				return
			}
			io.WriteString(w, `{"access_token":"t","token_type":"Bearer","expires_in":900}`)
		case "/missing":
			http.NotFound(w, r)
		default:
			io.WriteString(w, "ok")
		}
	}))
	defer d1Stub.Close()
	m := metrics.NewProxy("client")
	target, _ := url.Parse(d1Stub.URL)
	h := proxy.NewClient(target, d1Stub.Client().Transport, quiet, 0, proxy.WithObserver(m))
	for _, path := range []string{"/a", "/b", "/missing"} {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("GET", path, nil))
	}
	dead := proxy.NewClient(deadURL(t), http.DefaultTransport, quiet, 0, proxy.WithObserver(m))
	dead.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/", nil))

	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Unix(1_900_000_000, 0)
	j := &d1.JWTBearer{Signer: key, KeyID: "k", IssuerID: "issuer", TokenURL: d1Stub.URL + "/token", HTTPClient: d1Stub.Client(),
		Now: func() time.Time { return now }, Observe: m.TokenFetched}
	if _, err := j.Token(); err != nil {
		t.Fatal(err)
	}
	j.TokenURL += "?fail=1"
	if _, err := j.Token(); err == nil {
		t.Fatal("the refused token fetch succeeded")
	}

	checkSeries(t, scrape(t, m.Handler()), []string{
		`hsmagent_proxy_requests_total{code="2xx",proxy="client"} 2`,
		`hsmagent_proxy_requests_total{code="4xx",proxy="client"} 1`,
		`hsmagent_proxy_requests_total{code="5xx",proxy="client"} 1`,
		`hsmagent_proxy_upstream_duration_seconds_count{proxy="client"} 4`,
		`hsmagent_proxy_upstream_errors_total{proxy="client"} 1`,
		`hsmagent_proxy_request_duration_seconds_count{proxy="client"} 4`,
		`hsmagent_proxy_token_fetches_total{proxy="client",result="ok"} 1`,
		`hsmagent_proxy_token_fetches_total{proxy="client",result="error"} 1`,
		fmt.Sprintf(`hsmagent_proxy_token_expiry_timestamp_seconds{proxy="client"} %s`, formatFloat(now.Add(900*time.Second).Unix())),
	})
}

// TestProxyServerScrape: the server proxy's metrics count the requests
// (refused without a token, passed with one), time the calls to a stand-in
// backend and count the tokens issued and refused by result.
func TestProxyServerScrape(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer backend.Close()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	o := &proxy.OAuth{ClientID: "d1", Secret: []byte("0123456789abcdef"), Signer: key, KeyID: "k", Log: quiet}
	m := metrics.NewProxy("server")
	u, _ := url.Parse(backend.URL)
	h := proxy.NewServer(u, quiet, 0, o, proxy.WithObserver(m))
	token := func(secret string) *httptest.ResponseRecorder {
		r := httptest.NewRequest("POST", proxy.TokenPath, strings.NewReader("grant_type=client_credentials"))
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		r.SetBasicAuth("d1", secret)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w
	}
	if w := token("wrong-secret-xxxx"); w.Code != http.StatusUnauthorized {
		t.Fatalf("wrong secret: %d", w.Code)
	}
	w := token("0123456789abcdef")
	if w.Code != http.StatusOK {
		t.Fatalf("token: %d %s", w.Code, w.Body)
	}
	tok := strings.Split(strings.Split(w.Body.String(), `"access_token":"`)[1], `"`)[0]
	for _, bearer := range []string{tok, tok, ""} {
		r := httptest.NewRequest("GET", "/api", nil)
		if bearer != "" {
			r.Header.Set("Authorization", "Bearer "+bearer)
		}
		h.ServeHTTP(httptest.NewRecorder(), r)
	}
	dead := proxy.NewServer(deadURL(t), quiet, 0, nil, proxy.WithObserver(m))
	dead.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/", nil))

	text := scrape(t, m.Handler())
	checkSeries(t, text, []string{
		`hsmagent_proxy_requests_total{code="2xx",proxy="server"} 3`, // a token and two calls
		`hsmagent_proxy_requests_total{code="4xx",proxy="server"} 2`, // wrong secret, no token
		`hsmagent_proxy_requests_total{code="5xx",proxy="server"} 1`, // backend down
		`hsmagent_proxy_upstream_duration_seconds_count{proxy="server"} 3`,
		`hsmagent_proxy_upstream_errors_total{proxy="server"} 1`,
		`hsmagent_proxy_tokens_issued_total{proxy="server",result="ok"} 1`,
		`hsmagent_proxy_tokens_issued_total{proxy="server",result="invalid_client"} 1`,
	})
	if strings.Contains(text, "hsmagent_proxy_token_fetches_total") {
		t.Error("the server proxy exports the client's token fetches")
	}
}
