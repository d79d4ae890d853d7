package softhsmtest

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// d1World is the issuer's host (token, agent daemon) and stand-ins for
// Thales (client CA), Amazon (D1's server CA) and a public CA (the issuer's
// server certificate), all on loopback.
type d1World struct {
	fx     *Token
	dir    string
	daemon *daemon
	thales *CA
	amazon *CA
	public *CA
	jwtKey *ecdsa.PublicKey
}

func newD1World(t *testing.T) *d1World {
	t.Helper()
	w := &d1World{fx: New(t), dir: t.TempDir(), thales: NewCA(t, "Test Thales CA"),
		amazon: NewCAWithIntermediate(t, "Test Amazon"), public: NewCAWithIntermediate(t, "Test Public")}
	for _, label := range []string{"d1-ppr-mtls", "d1-ppr-jwt", "issuer-server"} {
		w.fx.ok(t, w.fx.args([]string{"keys", "generate"}, "--label", label, "--type", "ecdsa-p256")...)
	}
	tok := w.fx.Open(t)
	now := time.Now()
	k, _ := tok.Key("d1-ppr-mtls")
	writePEM(t, w.path("client.pem"), w.thales.Leaf(t, pkix.Name{CommonName: "TLSMA-ECDSA/ABCDEFGHIJ/PPR"}, k.Public, now.Add(-time.Hour), now.Add(48*time.Hour)))
	k, _ = tok.Key("issuer-server")
	writePEM(t, w.path("server.pem"), w.public.Leaf(t, pkix.Name{CommonName: "issuer.test"}, k.Public, now.Add(-time.Hour), now.Add(48*time.Hour), "localhost"), w.public.Intermediate)
	k, _ = tok.Key("d1-ppr-jwt")
	w.jwtKey = k.Public.(*ecdsa.PublicKey)
	tok.Close()
	w.fx.ok(t, w.fx.args([]string{"cert", "import"}, "--key", "d1-ppr-mtls", "--cert", w.path("client.pem"))...)
	w.fx.ok(t, w.fx.args([]string{"cert", "import"}, "--key", "issuer-server", "--cert", w.path("server.pem"))...)
	writePEM(t, w.path("thales-ca.pem"), w.thales.Cert)
	writePEM(t, w.path("amazon-root.pem"), w.amazon.Cert)
	writePEM(t, w.path("public-root.pem"), w.public.Cert)
	w.daemon = w.fx.startDaemon(t)
	return w
}

func (w *d1World) path(name string) string { return filepath.Join(w.dir, name) }

// peerFiles issues a software-keyed certificate and writes it with its key.
func (w *d1World) peerFiles(t *testing.T, ca *CA, cn string, notAfter time.Time, dns ...string) (certFile, keyFile string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := ca.Leaf(t, pkix.Name{CommonName: cn}, &key.PublicKey, time.Now().Add(-48*time.Hour), notAfter, dns...)
	chain := append([]*x509.Certificate{leaf}, ca.Chain()...)
	certFile = writePEM(t, w.path(cn+".pem"), chain...)
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	keyFile = w.path(cn + ".key")
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	return certFile, keyFile
}

// background runs a long-lived hsmagent command (a proxy) and waits for the
// log line that says it serves.
func (w *d1World) background(t *testing.T, ready string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(binary, append(args, "--socket", w.daemon.socket)...)
	cmd.Env = w.fx.Env()
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default:
			}
		}
		close(lines)
	}()
	timeout := time.After(15 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("hsmagent %v exited before %q", args, ready)
			}
			if strings.Contains(l, ready) {
				go func() {
					for range lines {
					}
				}()
				return cmd
			}
		case <-timeout:
			t.Fatalf("hsmagent %v did not log %q", args, ready)
		}
	}
}

// startBackend serves h in plain HTTP on loopback until the test ends: the
// issuer's backend behind the server proxy.
func startBackend(t *testing.T, h http.HandlerFunc) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{ErrorLog: log.New(io.Discard, "", 0), Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func waitListening(t *testing.T, addr string) {
	t.Helper()
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("nothing listens on %s", addr)
}

func port(addr string) string { return addr[strings.LastIndex(addr, ":")+1:] }

// TestProxyClientToOpenSSL: the client proxy takes plain HTTP on loopback and
// calls an openssl s_server that demands a client certificate from the Thales
// CA (D1-G1, D1-C1), verifying the server against the given roots (D1-C6).
func TestProxyClientToOpenSSL(t *testing.T) {
	w := newD1World(t)
	srvCert, srvKey := w.peerFiles(t, w.amazon, "d1-server", time.Now().Add(24*time.Hour), "localhost")
	d1Addr := freeAddr(t)
	// OpenSSL sends only the first certificate of -cert; the intermediate goes in -cert_chain.
	inter := writePEM(t, w.path("amazon-intermediate.pem"), w.amazon.Intermediate)
	openssl := exec.Command("openssl", "s_server", "-quiet", "-accept", d1Addr, "-cert", srvCert, "-cert_chain", inter, "-key", srvKey,
		"-CAfile", w.path("thales-ca.pem"), "-Verify", "1", "-verify_return_error", "-www")
	if err := openssl.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { openssl.Process.Kill(); openssl.Wait() }()
	waitListening(t, d1Addr)

	listen := freeAddr(t)
	w.background(t, "proxy client serving", "proxy", "client", "--listen", listen, "--target", "https://localhost:"+port(d1Addr),
		"--key", "d1-ppr-mtls", "--server-ca", w.path("amazon-root.pem"))
	resp, err := http.Get("http://" + listen + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "TLSv1.3") {
		t.Errorf("through the proxy: %d\n%.400s", resp.StatusCode, body)
	}

	t.Run("D1-C6 embedded roots refuse the test server", func(t *testing.T) {
		listen := freeAddr(t)
		w.background(t, "proxy client serving", "proxy", "client", "--listen", listen, "--target", "https://localhost:"+port(d1Addr), "--key", "d1-ppr-mtls")
		resp, err := http.Get("http://" + listen + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadGateway {
			t.Errorf("status %d, want 502", resp.StatusCode)
		}
	})
	t.Run("listens on loopback only", func(t *testing.T) {
		r := w.fx.hsmagent(t, "proxy", "client", "--listen", "0.0.0.0:8080", "--target", "https://localhost:1", "--key", "d1-ppr-mtls", "--socket", w.daemon.socket)
		if r.code != 2 || !strings.Contains(r.stderr, "loopback only") {
			t.Errorf("exit %d: %s", r.code, r.stderr)
		}
	})
	t.Run("D1-G2 environment guard", func(t *testing.T) {
		r := w.fx.hsmagent(t, "proxy", "client", "--listen", freeAddr(t), "--target", "https://localhost:1", "--key", "d1-ppr-mtls", "--env", "PRD", "--socket", w.daemon.socket)
		if r.code != 1 || !strings.Contains(r.stderr, "is for PPR but this connection goes to PRD") {
			t.Errorf("exit %d: %s", r.code, r.stderr)
		}
	})
}

// TestProxyServerWithCurl: curl plays D1 calling the issuer (D1-S1..S5).
func TestProxyServerWithCurl(t *testing.T) {
	w := newD1World(t)
	backendAddr := startBackend(t, func(rw http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(rw, "subject=%s serial=%s fp=%s forged=%v",
			r.Header.Get("X-D1-Client-Subject"), r.Header.Get("X-D1-Client-Serial"), r.Header.Get("X-D1-Client-Fingerprint"),
			len(r.Header.Values("X-D1-Client-Subject")) > 1)
	})

	caFile := w.path("client-ca-in-use.pem")
	writePEM(t, caFile, w.thales.Cert)
	listen := freeAddr(t)
	// Configured from the same file as the agent, one section per environment.
	config := w.path("hsmagent.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf(`socket: %s
d1:
  PPR:
    server:
      listen: %q
      backend: http://%s
      key: issuer-server
      client_ca: %s
  PRD:
    server:
      listen: "127.0.0.1:1"
      backend: http://127.0.0.1:1
      key: d1-prd-server
      client_ca: /nonexistent
`, w.daemon.socket, listen, backendAddr, caFile)), 0o644)
	proxyCmd := w.background(t, "proxy server serving", "proxy", "server", "--config", config, "--env", "preprod")
	url := "https://localhost:" + port(listen) + "/notify"

	curl := func(cert, key string, extra ...string) (string, int) {
		args := append([]string{"-sS", "--max-time", "10", "--cacert", w.path("public-root.pem"), "--cert", cert, "--key", key,
			"-H", "X-D1-Client-Subject: CN=forged"}, extra...)
		out, err := exec.Command("curl", append(args, url)...).CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		return string(out), code
	}
	day := 24 * time.Hour
	cert, key := w.peerFiles(t, w.thales, "d1-client-1", time.Now().Add(day))
	out, code := curl(cert, key)
	if code != 0 || !strings.Contains(out, "subject=CN=d1-client-1") || !strings.Contains(out, "forged=false") || !strings.Contains(out, "fp=") {
		t.Fatalf("curl through the proxy server: exit %d: %s", code, out)
	}
	t.Run("HTTP/2 offered", func(t *testing.T) {
		if out, code := curl(cert, key, "--http2", "-o", "/dev/null", "-w", "%{http_version}"); code != 0 || out != "2" {
			t.Errorf("exit %d, HTTP version %q", code, out)
		}
	})
	t.Run("D1-S4 rotated D1 certificate accepted without restart", func(t *testing.T) {
		cert, key := w.peerFiles(t, w.thales, "d1-client-2", time.Now().Add(day))
		if out, code := curl(cert, key); code != 0 || !strings.Contains(out, "subject=CN=d1-client-2") {
			t.Errorf("exit %d: %s", code, out)
		}
	})
	t.Run("D1-S3 certificate from another CA refused", func(t *testing.T) {
		cert, key := w.peerFiles(t, NewCA(t, "Other CA"), "intruder", time.Now().Add(day))
		if out, code := curl(cert, key); code == 0 {
			t.Errorf("accepted: %s", out)
		}
	})
	t.Run("expired certificate refused", func(t *testing.T) {
		cert, key := w.peerFiles(t, w.thales, "expired", time.Now().Add(-day))
		if out, code := curl(cert, key); code == 0 {
			t.Errorf("accepted: %s", out)
		}
	})
	t.Run("D1-S2 TLS 1.1 refused", func(t *testing.T) {
		if out, code := curl(cert, key, "--tlsv1.1", "--tls-max", "1.1"); code == 0 {
			t.Errorf("accepted: %s", out)
		}
	})
	t.Run("D1-S5 full chain served", func(t *testing.T) {
		out, _ := exec.Command("openssl", "s_client", "-connect", listen, "-servername", "localhost", "-showcerts",
			"-CAfile", w.path("public-root.pem"), "-cert", cert, "-key", key, "-verify_return_error").CombinedOutput()
		text := string(out)
		if strings.Count(text, "BEGIN CERTIFICATE") != 2 || !strings.Contains(text, "Verify return code: 0 (ok)") ||
			!strings.Contains(text, "Test Public Intermediate") {
			t.Errorf("openssl s_client -showcerts:\n%s", text)
		}
	})
	t.Run("a new Thales CA applies after SIGHUP", func(t *testing.T) {
		next := NewCA(t, "Next Thales CA")
		writePEM(t, caFile, next.Cert)
		proxyCmd.Process.Signal(syscall.SIGHUP)
		cert, key := w.peerFiles(t, next, "from-next-ca", time.Now().Add(day))
		deadline := time.Now().Add(10 * time.Second)
		for {
			out, code := curl(cert, key)
			if code == 0 && strings.Contains(out, "from-next-ca") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("new CA never accepted: exit %d %s", code, out)
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	proxyCmd.Process.Signal(syscall.SIGTERM)
	if err := proxyCmd.Wait(); err != nil {
		t.Errorf("proxy server after SIGTERM: %v", err)
	}
}

// TestD1TokenAndJWTSign: "hsmagent d1 token" gets an access token from a D1
// stand-in that verifies the ES256 assertion (D1-C8); "hsmagent jwt sign"
// signs given claims with a key in the agent.
func TestD1TokenAndJWTSign(t *testing.T) {
	w := newD1World(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := w.amazon.Leaf(t, pkix.Name{CommonName: "d1.test"}, &key.PublicKey, time.Now().Add(-time.Hour), time.Now().Add(time.Hour), "localhost")
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{leaf.Raw, w.amazon.Intermediate.Raw}, PrivateKey: key}},
		ClientAuth:   tls.RequireAndVerifyClientCert, ClientCAs: w.thales.Pool()})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{ErrorLog: log.New(io.Discard, "", 0), Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		tok, err := jwt.ParseSigned(r.FormValue("assertion"), []jose.SignatureAlgorithm{jose.ES256})
		var c jwt.Claims
		if err != nil || tok.Claims(w.jwtKey, &c) != nil || tok.Headers[0].KeyID != "kid-1" || c.Subject != "ABCDEFGHIJ" ||
			r.FormValue("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
			http.Error(rw, `{"error":"invalid_grant"}`, http.StatusBadRequest)
			return
		}
		fmt.Fprint(rw, `{"access_token":"at-123","token_type":"Bearer","expires_in":900}`)
	})}
	go srv.Serve(l)
	defer srv.Close()
	tokenURL := fmt.Sprintf("https://localhost:%d/authz/v1/oauth2/token", l.Addr().(*net.TCPAddr).Port)
	args := []string{"d1", "token", "--socket", w.daemon.socket, "--key", "d1-ppr-mtls", "--jwt-key", "d1-ppr-jwt", "--kid", "kid-1",
		"--issuer-id", "ABCDEFGHIJ", "--token-url", tokenURL, "--server-ca", w.path("amazon-root.pem")}
	r := w.fx.ok(t, args...)
	if strings.TrimSpace(r.stdout) != "at-123" {
		t.Errorf("d1 token printed %q", r.stdout)
	}
	badKid := append([]string(nil), args...)
	badKid[9] = "unknown" // the value after --kid
	r = w.fx.hsmagent(t, badKid...)
	if r.code != 1 || !strings.Contains(r.stderr, "answered 400 Bad Request") || !strings.Contains(r.stderr, "invalid_grant") {
		t.Errorf("refused token: exit %d %s", r.code, r.stderr)
	}

	claims := w.path("claims.json")
	os.WriteFile(claims, []byte(`{"iss":"ABCDEFGHIJ","sub":"ABCDEFGHIJ","custom":42}`), 0o644)
	r = w.fx.ok(t, "jwt", "sign", "--socket", w.daemon.socket, "--key", "d1-ppr-jwt", "--kid", "kid-9", "--claims", claims)
	tok, err := jwt.ParseSigned(strings.TrimSpace(r.stdout), []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := tok.Claims(w.jwtKey, &got); err != nil || got["custom"] != float64(42) || tok.Headers[0].KeyID != "kid-9" {
		t.Errorf("jwt sign: %v %v", got, err)
	}
	r = w.fx.hsmagent(t, "jwt", "sign", "--socket", w.daemon.socket, "--key", "d1-ppr-jwt", "--kid", "k", "--claims", w.path("client.pem"))
	if r.code != 2 || !strings.Contains(r.stderr, "not a JSON object") {
		t.Errorf("bad claims: exit %d %s", r.code, r.stderr)
	}
}

// TestProxyServerOAuth (D1-S6): D1 trades client credentials for an access
// token signed by a key in the agent, then calls with it as Bearer.
func TestProxyServerOAuth(t *testing.T) {
	w := newD1World(t)
	backendAddr := startBackend(t, func(rw http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(rw, "backend got %s authorization=%q", r.URL.Path, r.Header.Get("Authorization"))
	})
	secretFile := w.path("d1-oauth-secret")
	os.WriteFile(secretFile, []byte("s3cret-s3cret-s3cret\n"), 0o600)
	listen := freeAddr(t)
	config := w.path("oauth.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf(`d1:
  PPR:
    server:
      listen: %q
      backend: http://%s
      key: issuer-server
      client_ca: %s
      oauth_client_id: d1
      oauth_secret_file: %s
      oauth_key: d1-ppr-jwt
`, listen, backendAddr, w.path("thales-ca.pem"), secretFile)), 0o644)
	w.background(t, "proxy server serving", "proxy", "server", "--config", config)
	cert, key := w.peerFiles(t, w.thales, "d1-caller", time.Now().Add(24*time.Hour))
	base := "https://localhost:" + port(listen)
	curl := func(args ...string) string {
		all := append([]string{"-sS", "--max-time", "10", "--cacert", w.path("public-root.pem"), "--cert", cert, "--key", key,
			"-w", " HTTP%{http_code}"}, args...)
		out, _ := exec.Command("curl", all...).CombinedOutput()
		return string(out)
	}

	out := curl("-u", "d1:s3cret-s3cret-s3cret", "-d", "grant_type=client_credentials", base+"/authz/d1/v1/oauth2/token")
	var tr struct {
		AccessToken string `json:"access_token"`
		TokenType   string `json:"token_type"`
		ExpiresIn   int    `json:"expires_in"`
	}
	if err := json.Unmarshal([]byte(strings.TrimSuffix(out, " HTTP200")), &tr); err != nil || tr.TokenType != "Bearer" || tr.ExpiresIn != 900 {
		t.Fatalf("token endpoint: %s", out)
	}
	tok, err := jwt.ParseSigned(tr.AccessToken, []jose.SignatureAlgorithm{jose.ES256})
	var claims jwt.Claims
	if err != nil || tok.Claims(w.jwtKey, &claims) != nil || claims.Subject != "d1" {
		t.Errorf("access token is not signed by the agent's key: %v %+v", err, claims)
	}
	if out := curl(base + "/api/notify"); !strings.Contains(out, "invalid_token") || !strings.HasSuffix(out, "HTTP401") {
		t.Errorf("without a token: %s", out)
	}
	if out := curl("-H", "Authorization: Bearer "+tr.AccessToken, base+"/api/notify"); !strings.Contains(out, `backend got /api/notify authorization=""`) {
		t.Errorf("with the token: %s", out)
	}
	if out := curl("-H", "Authorization: Bearer "+tr.AccessToken+"x", base+"/api/notify"); !strings.HasSuffix(out, "HTTP401") {
		t.Errorf("with a tampered token: %s", out)
	}
	if out := curl("-u", "d1:wrong-secret-wrong", "-d", "grant_type=client_credentials", base+"/authz/d1/v1/oauth2/token"); !strings.Contains(out, "invalid_client") {
		t.Errorf("wrong secret: %s", out)
	}
}
