package agent_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
)

// exampleEnv is what the examples need around them: an agent holding key
// "d1-ppr-mtls" with a certificate from a test CA, and that CA for the peers.
// The agent serves the in-memory store, so the examples run anywhere; the
// same client code works unchanged against an agent on a PKCS#11 token.
type exampleEnv struct {
	socket string
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	roots  *x509.CertPool
	close  func()
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

func newExampleEnv() *exampleEnv {
	dir, err := os.MkdirTemp("", "hsa-example")
	must(err)
	store := server.NewMemoryStore()
	pub, err := store.Generate("d1-ppr-mtls", keytype.ECDSAP256)
	must(err)

	env := &exampleEnv{socket: filepath.Join(dir, "agent.sock")}
	env.caKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Example CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &env.caKey.PublicKey, env.caKey)
	must(err)
	env.ca, _ = x509.ParseCertificate(der)
	env.roots = x509.NewCertPool()
	env.roots.AddCert(env.ca)
	leaf := env.issue(pub, "TLSMA-ECDSA/EXAMPLE001/PPR")
	must(store.SetChain("d1-ppr-mtls", []*x509.Certificate{leaf.Leaf}))

	srv, err := server.New(store, server.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	must(err)
	l, err := server.Listen(env.socket, 0o600)
	must(err)
	go srv.Serve(l)
	env.close = func() {
		srv.Shutdown(context.Background())
		os.RemoveAll(dir)
	}
	return env
}

// issue makes a certificate from the example CA; with a nil public key it
// also makes the (software) key, for the peer that is not in the agent.
func (e *exampleEnv) issue(pub any, cn string) tls.Certificate {
	var key *ecdsa.PrivateKey
	if pub == nil {
		key, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		pub = &key.PublicKey
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn}, DNSNames: []string{"localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, e.ca, pub, e.caKey)
	must(err)
	leaf, _ := x509.ParseCertificate(der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// serve runs an HTTPS server on loopback until the example ends.
func (e *exampleEnv) serve(conf *tls.Config, h http.Handler) (url string) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	srv := &http.Server{Handler: h, TLSConfig: conf}
	go srv.ServeTLS(l, "", "")
	prev := e.close
	e.close = func() { srv.Close(); prev() }
	return "https://localhost:" + l.Addr().(*net.TCPAddr).AddrPort().String()[len("127.0.0.1:"):]
}
