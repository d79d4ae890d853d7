package d1_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/hsm"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// world stands in for both sides of D1: an agent holding the issuer's keys in
// SoftHSM, a "Thales" CA for D1 client certificates and an "Amazon" CA for
// D1's server certificate.
type world struct {
	token  *hsm.Token
	agent  *softhsmtest.Agent
	client *agent.Client
	thales *softhsmtest.CA
	amazon *softhsmtest.CA
}

func newWorld(t *testing.T) *world {
	t.Helper()
	w := &world{thales: softhsmtest.NewCA(t, "Test Thales CA"), amazon: softhsmtest.NewCAWithIntermediate(t, "Test Amazon")}
	fx := softhsmtest.New(t)
	w.token = fx.Open(t)
	w.addKey(t, "d1-ppr-mtls", "TLSMA-ECDSA/ABCDEFGHIJ/PPR")
	w.addKey(t, "d1-prd-mtls", "TLSMA-ECDSA/ABCDEFGHIJ/PRD")
	w.addKey(t, "d1-ppr-jwt", "")
	a := softhsmtest.StartAgent(t, w.token, server.Options{})
	w.agent = a
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, a.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	w.client = c
	return w
}

func (w *world) addKey(t *testing.T, label, cn string) {
	t.Helper()
	k, err := w.token.GenerateKey(label, hsm.ECDSAP256, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cn == "" {
		return
	}
	leaf := w.thales.Leaf(t, pkix.Name{CommonName: cn}, k.Public, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	if err := w.token.ImportChain(label, []*x509.Certificate{leaf}); err != nil {
		t.Fatal(err)
	}
}

// d1Server is a TLS server standing in for D1: its certificate comes from
// the Amazon test CA and it requires a client certificate from the Thales CA.
func (w *world) d1Server(t *testing.T, addr string, maxVersion uint16, name string) string {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := w.amazon.Leaf(t, pkix.Name{CommonName: "d1.test"}, &key.PublicKey, time.Now().Add(-time.Hour), time.Now().Add(time.Hour), "d1.test", "localhost")
	cert := tls.Certificate{Certificate: [][]byte{leaf.Raw, w.amazon.Intermediate.Raw}, PrivateKey: key}
	l, err := tls.Listen("tcp", addr, &tls.Config{
		Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: w.thales.Pool(),
		MinVersion: tls.VersionTLS10, MaxVersion: maxVersion,
	})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{ErrorLog: quietLog, Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(rw, "%s saw %s", name, r.TLS.PeerCertificates[0].Subject.CommonName)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

func (w *world) options(env d1.Env, label string) d1.ClientOptions {
	return d1.ClientOptions{Env: env, GetClientCertificate: w.client.GetClientCertificate(label), ServerRoots: w.amazon.Pool()}
}

func get(t *testing.T, c *http.Client, url string) (string, error) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b), nil
}

// TestInboundProfile: mutual TLS to a D1 stand-in with the client key in the
// agent (D1-G1, D1-C1), D1's chain verified against its roots (D1-C6), TLS
// versions below 1.2 refused (D1-G4).
func TestInboundProfile(t *testing.T) {
	w := newWorld(t)
	addr := w.d1Server(t, "127.0.0.1:0", tls.VersionTLS13, "d1")
	c, err := d1.NewHTTPClient(w.options(d1.PreProd, "d1-ppr-mtls"))
	if err != nil {
		t.Fatal(err)
	}
	port := addr[strings.LastIndex(addr, ":")+1:]
	body, err := get(t, c, "https://localhost:"+port+"/")
	if err != nil || body != "d1 saw TLSMA-ECDSA/ABCDEFGHIJ/PPR" {
		t.Fatalf("mTLS call: %q %v", body, err)
	}

	t.Run("D1-C6 server from another CA refused", func(t *testing.T) {
		opts := w.options(d1.PreProd, "d1-ppr-mtls")
		opts.ServerRoots = nil // the embedded Amazon roots do not know the test CA
		c, err := d1.NewHTTPClient(opts)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := get(t, c, "https://localhost:"+port+"/"); err == nil || !strings.Contains(err.Error(), "certificate signed by unknown authority") {
			t.Errorf("got %v", err)
		}
	})
	t.Run("D1-G4 TLS 1.1 refused", func(t *testing.T) {
		old := w.d1Server(t, "127.0.0.1:0", tls.VersionTLS11, "old")
		_, err := get(t, c, "https://localhost:"+old[strings.LastIndex(old, ":")+1:]+"/")
		if err == nil || !strings.Contains(err.Error(), "protocol version") {
			t.Errorf("got %v", err)
		}
	})
	t.Run("D1-G2 certificate of the other environment refused before connecting", func(t *testing.T) {
		_, err := d1.NewHTTPClient(w.options(d1.PreProd, "d1-prd-mtls"))
		if err == nil || !strings.Contains(err.Error(), "is for PRD but this connection goes to PPR") {
			t.Errorf("got %v", err)
		}
	})
	t.Run("D1-C6 embedded roots are the Amazon Trust Services roots", func(t *testing.T) {
		subjects := d1.ServerRoots().Subjects() //nolint:staticcheck // fine for a count
		if len(subjects) != 5 {
			t.Errorf("%d embedded roots, want 5", len(subjects))
		}
		for _, want := range []string{"Amazon Root CA 1", "Amazon Root CA 4", "Starfield Services Root Certificate Authority - G2"} {
			found := false
			for _, s := range subjects {
				found = found || strings.Contains(string(s), want)
			}
			if !found {
				t.Errorf("embedded roots lack %q", want)
			}
		}
	})
}

// TestOutboundProfile: the issuer's server for D1's calls accepts only
// clients from the Thales client CA (D1-S3), at TLS 1.2+ (D1-S2), any valid
// certificate of that CA, a rotated one without restart (D1-S4), and a
// replaced CA file after Reload.
func TestOutboundProfile(t *testing.T) {
	w := newWorld(t)
	// The issuer's server key is in the agent with a chain from a public-like CA (D1-S5).
	pub := softhsmtest.NewCAWithIntermediate(t, "Test Public")
	k, err := w.token.GenerateKey("issuer-server", hsm.ECDSAP256, nil)
	if err != nil {
		t.Fatal(err)
	}
	leaf := pub.Leaf(t, pkix.Name{CommonName: "issuer.test"}, k.Public, time.Now().Add(-time.Hour), time.Now().Add(time.Hour), "localhost")
	if err := w.token.ImportChain("issuer-server", []*x509.Certificate{leaf, pub.Intermediate}); err != nil {
		t.Fatal(err)
	}
	if err := w.agent.Server.Reload(nil); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	caFile := filepath.Join(dir, "thales-client-ca.pem")
	writeCA(t, caFile, w.thales.Cert)
	srvTLS, err := d1.NewServerTLS(d1.ServerOptions{GetCertificate: w.client.GetCertificate("issuer-server"), ClientCAFile: caFile})
	if err != nil {
		t.Fatal(err)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", srvTLS.TLSConfig())
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{ErrorLog: quietLog, Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		fmt.Fprint(rw, r.TLS.PeerCertificates[0].Subject.CommonName)
	})}
	go srv.Serve(l)
	defer srv.Close()
	url := "https://localhost:" + fmt.Sprint(l.Addr().(*net.TCPAddr).Port) + "/"

	call := func(cert tls.Certificate, maxVersion uint16) (string, error) {
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: pub.Pool(), Certificates: []tls.Certificate{cert}, MaxVersion: maxVersion, MinVersion: tls.VersionTLS10}}}
		return get(t, c, url)
	}
	d1Client := func(ca *softhsmtest.CA, cn string, notAfter time.Time) tls.Certificate {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		l := ca.Leaf(t, pkix.Name{CommonName: cn}, &key.PublicKey, time.Now().Add(-48*time.Hour), notAfter)
		return tls.Certificate{Certificate: [][]byte{l.Raw}, PrivateKey: key}
	}
	day := 24 * time.Hour
	if body, err := call(d1Client(w.thales, "d1-client-1", time.Now().Add(day)), tls.VersionTLS13); err != nil || body != "d1-client-1" {
		t.Fatalf("D1 client: %q %v", body, err)
	}
	t.Run("D1-S4 rotated client certificate accepted without restart", func(t *testing.T) {
		if body, err := call(d1Client(w.thales, "d1-client-2", time.Now().Add(day)), tls.VersionTLS12); err != nil || body != "d1-client-2" {
			t.Errorf("%q %v", body, err)
		}
	})
	t.Run("D1-S3 client from another CA refused", func(t *testing.T) {
		if _, err := call(d1Client(softhsmtest.NewCA(t, "Other"), "intruder", time.Now().Add(day)), tls.VersionTLS13); err == nil {
			t.Error("accepted")
		}
	})
	t.Run("expired client certificate refused", func(t *testing.T) {
		if _, err := call(d1Client(w.thales, "old", time.Now().Add(-day)), tls.VersionTLS13); err == nil {
			t.Error("accepted")
		}
	})
	t.Run("D1-S2 TLS 1.1 refused", func(t *testing.T) {
		if _, err := call(d1Client(w.thales, "d1", time.Now().Add(day)), tls.VersionTLS11); err == nil || !strings.Contains(err.Error(), "protocol version") {
			t.Errorf("got %v", err)
		}
	})
	t.Run("replaced CA file applies after Reload", func(t *testing.T) {
		next := softhsmtest.NewCA(t, "Next Thales CA")
		writeCA(t, caFile, next.Cert)
		if changed, err := srvTLS.Reload(); !changed || err != nil {
			t.Fatalf("Reload: %v %v", changed, err)
		}
		if body, err := call(d1Client(next, "from-next-ca", time.Now().Add(day)), tls.VersionTLS13); err != nil || body != "from-next-ca" {
			t.Errorf("new CA: %q %v", body, err)
		}
		if _, err := call(d1Client(w.thales, "from-old-ca", time.Now().Add(day)), tls.VersionTLS13); err == nil {
			t.Error("old CA still trusted after reload")
		}
		os.WriteFile(caFile, []byte("garbage"), 0o644)
		if _, err := srvTLS.Reload(); err == nil {
			t.Error("a broken CA file was accepted")
		}
		if _, err := call(d1Client(next, "still-served", time.Now().Add(day)), tls.VersionTLS13); err != nil {
			t.Errorf("a failed reload dropped the working CA: %v", err)
		}
	})
}

func writeCA(t *testing.T, path string, c *x509.Certificate) {
	t.Helper()
	if err := os.WriteFile(path, hsm.EncodeCertificatesPEM([]*x509.Certificate{c}), 0o644); err != nil {
		t.Fatal(err)
	}
}
