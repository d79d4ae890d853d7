package agent_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/agent/server/storetest"
	"github.com/hsmagent/hsmagent/hsm/hsmstore"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// fixture is a key store with an ECDSA P-256 and an RSA key, each with a
// certificate from a test CA, served by an agent on a real socket. The
// in-memory store is the default (the contract suite holds the PKCS#11 store
// to the same behaviour); newSoftHSMFixture serves a real token, for what
// only a token proves.
type fixture struct {
	store  storetest.Store
	hsm    *softhsmtest.Token // nil for the in-memory store
	ca     *softhsmtest.CA
	agent  *agenttest.Agent
	client *agent.Client
}

var keyLabels = []string{"ec", "rsa"}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	return startFixture(t, server.NewMemoryStore(), nil, keytype.RSA2048)
}

func newSoftHSMFixture(t *testing.T) *fixture {
	t.Helper()
	tok := softhsmtest.New(t)
	return startFixture(t, hsmstore.New(tok.Open(t)), tok, keytype.RSA4096)
}

func startFixture(t *testing.T, store storetest.Store, tok *softhsmtest.Token, rsaType keytype.Type) *fixture {
	t.Helper()
	f := &fixture{store: store, hsm: tok, ca: softhsmtest.NewCAWithIntermediate(t, "Agent Test CA")}
	for label, kt := range map[string]keytype.Type{"ec": keytype.ECDSAP256, "rsa": rsaType} {
		pub, err := store.Generate(label, kt)
		if err != nil {
			t.Fatal(err)
		}
		f.importLeaf(t, label, pub, "localhost")
	}
	f.agent = agenttest.Start(t, store, server.Options{})
	f.client = dial(t, f.agent.Socket)
	return f
}

func (f *fixture) importLeaf(t *testing.T, label string, pub crypto.PublicKey, cn string) *x509.Certificate {
	t.Helper()
	leaf := f.ca.Leaf(t, pkix.Name{CommonName: cn}, pub, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour), "localhost")
	if err := f.store.SetChain(label, append([]*x509.Certificate{leaf}, f.ca.Chain()...)); err != nil {
		t.Fatal(err)
	}
	return leaf
}

// key returns the key labelled label as the store lists it.
func (f *fixture) key(t *testing.T, label string) server.Key {
	t.Helper()
	keys, err := f.store.Keys()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.Label == label {
			return k
		}
	}
	t.Fatalf("no key %q in the store", label)
	return server.Key{}
}

func dial(t *testing.T, socket string) *agent.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, socket, agent.WithSignTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// peerConfig is the software-keyed side of a handshake, with a certificate
// from the same CA.
func (f *fixture) peerConfig(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(ecdsaCurve(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leaf := f.ca.Leaf(t, pkix.Name{CommonName: "peer"}, &key.PublicKey, time.Now().Add(-time.Hour), time.Now().Add(time.Hour), "localhost")
	cert := tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}
	for _, c := range f.ca.Chain() {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return cert, f.ca.Pool()
}

// TestTLSHandshakes runs real TLS over loopback with the agent-held key on
// the client side and on the server side, for both key types and both TLS
// versions (TLS 1.3 with RSA needs RSA-PSS from the HSM).
func TestTLSHandshakes(t *testing.T) {
	t.Run("memory", func(t *testing.T) { testTLSHandshakes(t, newFixture(t)) })
	t.Run("softhsm", func(t *testing.T) { testTLSHandshakes(t, newSoftHSMFixture(t)) })
}

func testTLSHandshakes(t *testing.T, f *fixture) {
	peerCert, pool := f.peerConfig(t)
	for _, label := range keyLabels {
		for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
			for _, side := range []string{"client", "server"} {
				t.Run(fmt.Sprintf("%s/%s/%s", label, tls.VersionName(version), side), func(t *testing.T) {
					serverConf := &tls.Config{MinVersion: version, MaxVersion: version, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
					clientConf := &tls.Config{MinVersion: version, MaxVersion: version, RootCAs: pool, ServerName: "localhost"}
					if side == "client" {
						clientConf.GetClientCertificate = f.client.GetClientCertificate(label)
						serverConf.Certificates = []tls.Certificate{peerCert}
					} else {
						serverConf.GetCertificate = f.client.GetCertificate(label)
						clientConf.Certificates = []tls.Certificate{peerCert}
					}
					state := handshake(t, serverConf, clientConf)
					if state.Version != version {
						t.Errorf("negotiated %s", tls.VersionName(state.Version))
					}
					k := f.key(t, label)
					if side == "client" && !state.serverSawClient.Equal(k.Chain[0]) {
						t.Error("server did not see the agent's certificate")
					}
					if side == "server" && !state.PeerCertificates[0].Equal(k.Chain[0]) {
						t.Error("client did not see the agent's certificate")
					}
				})
			}
		}
	}
}

type handshakeState struct {
	tls.ConnectionState
	serverSawClient *x509.Certificate
}

func handshake(t *testing.T, serverConf, clientConf *tls.Config) handshakeState {
	t.Helper()
	l, err := tls.Listen("tcp", "127.0.0.1:0", serverConf)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	serverSide := make(chan *x509.Certificate, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			serverSide <- nil
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		if err := tc.Handshake(); err != nil {
			serverSide <- nil
			return
		}
		var peer *x509.Certificate
		if certs := tc.ConnectionState().PeerCertificates; len(certs) > 0 {
			peer = certs[0]
		}
		tc.Write([]byte("x"))
		serverSide <- peer
	}()
	conn, err := tls.Dial("tcp", l.Addr().String(), clientConf)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	defer conn.Close()
	buf := make([]byte, 1)
	if _, err := io.ReadFull(conn, buf); err != nil {
		t.Fatalf("reading after handshake: %v", err)
	}
	return handshakeState{ConnectionState: conn.ConnectionState(), serverSawClient: <-serverSide}
}

func TestSignerMatchesSoftwareVerification(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	digest := sha256.Sum256([]byte("message"))
	ec, err := f.client.Signer(ctx, "ec")
	if err != nil {
		t.Fatal(err)
	}
	sig, err := ec.Sign(nil, digest[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(ec.Public().(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatalf("ECDSA: %v", err)
	}
	rs, err := f.client.Signer(ctx, "rsa")
	if err != nil {
		t.Fatal(err)
	}
	pub := rs.Public().(*rsa.PublicKey)
	for _, opts := range []crypto.SignerOpts{
		crypto.SHA256,
		&rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash},
		&rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthAuto},
		&rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 20},
	} {
		sig, err := rs.Sign(nil, digest[:], opts)
		if err != nil {
			t.Fatalf("%T %v: %v", opts, opts, err)
		}
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			err = rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: pss.SaltLength})
		} else {
			err = rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig)
		}
		if err != nil {
			t.Errorf("%+v: signature does not verify: %v", opts, err)
		}
	}
	if _, err := f.client.Signer(ctx, "nope"); err == nil || !strings.Contains(err.Error(), `key "nope" not found`) {
		t.Errorf("unknown key: %v", err)
	}
}

// TestAgentRestart stops the agent under a live client and starts a new one
// on the same socket: calls fail within their deadline meanwhile, then work
// again with the same client.
func TestAgentRestart(t *testing.T) {
	f := newFixture(t)
	signer, err := f.client.Signer(context.Background(), "ec")
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("x"))
	if _, err := signer.Sign(nil, digest[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	f.agent.Stop()
	start := time.Now()
	_, err = signer.Sign(nil, digest[:], crypto.SHA256)
	if err == nil || !agent.IsUnavailable(err) {
		t.Fatalf("sign while the agent is down: %v", err)
	}
	if waited := time.Since(start); waited > 3*time.Second {
		t.Errorf("failed only after %v; the sign timeout is 2s", waited)
	}
	agenttest.StartAt(t, f.agent.Socket, 0o660, f.store, server.Options{})
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err = signer.Sign(nil, digest[:], crypto.SHA256)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the client did not reconnect: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRotationWithoutRestart re-imports a certificate, reloads the agent and
// expects the tls.Config callback to hand out the new chain.
func TestRotationWithoutRestart(t *testing.T) {
	f := newFixture(t)
	get := f.client.GetCertificate("ec")
	hello := &tls.ClientHelloInfo{}
	first, err := get(hello)
	if err != nil {
		t.Fatal(err)
	}
	k := f.key(t, "ec")
	rotated := f.importLeaf(t, "ec", k.Public, "rotated")
	if err := f.agent.Server.Reload(nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		cert, err := get(hello)
		if err != nil {
			t.Fatal(err)
		}
		if cert.Leaf.Equal(rotated) {
			break
		}
		if !cert.Leaf.Equal(first.Leaf) {
			t.Fatal("callback returned an unknown certificate")
		}
		if time.Now().After(deadline) {
			t.Fatal("the rotated certificate never reached the callback")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestAgentRecoversLostHSMSession closes every session of the slot behind the
// agent's back; the next signature through the agent must still succeed.
func TestAgentRecoversLostHSMSession(t *testing.T) {
	f := newSoftHSMFixture(t)
	signer, err := f.client.Signer(context.Background(), "rsa")
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("x"))
	p, slot := f.hsm.Raw(t)
	if err := p.CloseAllSessions(slot); err != nil {
		t.Fatal(err)
	}
	sig, err := signer.Sign(nil, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("sign after lost sessions: %v", err)
	}
	if err := rsa.VerifyPKCS1v15(signer.Public().(*rsa.PublicKey), crypto.SHA256, digest[:], sig); err != nil {
		t.Error(err)
	}
}

// Example-style check that an mTLS http.Client works end to end with the agent key.
func TestHTTPClientWithAgentKey(t *testing.T) {
	f := newFixture(t)
	peerCert, pool := f.peerConfig(t)
	srv := &http.Server{
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{peerCert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, r.TLS.PeerCertificates[0].Subject.CommonName)
		}),
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.ServeTLS(l, "", "")
	defer srv.Close()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs: pool, GetClientCertificate: f.client.GetClientCertificate("ec")}}}
	resp, err := hc.Get("https://localhost:" + fmt.Sprint(l.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "localhost" {
		t.Errorf("server saw client CN %q", body)
	}
	_ = errors.New
}

// TestConcurrentSignersGetTheirOwnSignatures: many goroutines share the
// client's sign stream; every signature must verify against its own digest.
func TestConcurrentSignersGetTheirOwnSignatures(t *testing.T) {
	f := newFixture(t)
	signer, err := f.client.Signer(context.Background(), "ec")
	if err != nil {
		t.Fatal(err)
	}
	pub := signer.Public().(*ecdsa.PublicKey)
	errs := make(chan error, 16)
	for g := range 16 {
		go func() {
			for i := range 40 {
				digest := sha256.Sum256(fmt.Appendf(nil, "%d/%d", g, i))
				sig, err := signer.Sign(nil, digest[:], crypto.SHA256)
				if err != nil {
					errs <- err
					return
				}
				if !ecdsa.VerifyASN1(pub, digest[:], sig) {
					errs <- fmt.Errorf("goroutine %d call %d: signature is for another digest", g, i)
					return
				}
			}
			errs <- nil
		}()
	}
	for range 16 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// TestSignAcrossIdleCloses: with the agent closing idle signing
// connections after 100 ms, signatures made with pauses of about that long
// (the sends land around the agent's close) all succeed: a request that
// went out as the agent closed the connection, which the agent never read,
// is sent again on a new one. (gRPC's connection, which the same idle
// timeout closes, is redialled by gRPC itself.)
func TestSignAcrossIdleCloses(t *testing.T) {
	store := server.NewMemoryStore()
	if _, err := store.Generate("ec", keytype.ECDSAP256); err != nil {
		t.Fatal(err)
	}
	const idle = 100 * time.Millisecond
	a := agenttest.Start(t, store, server.Options{IdleTimeout: idle})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, a.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := c.Signer(ctx, "ec")
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("idle"))
	failed := 0
	const n = 60
	for i := range n {
		if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
			failed++
			t.Logf("signature %d: %v", i, err)
		}
		time.Sleep(idle + time.Duration(i%9-4)*500*time.Microsecond)
	}
	if failed > 0 {
		t.Errorf("%d of %d signatures failed across idle closes; want none", failed, n)
	}
}
