package softhsmtest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	_ "crypto/sha256" // crypto.SHA256.New
	_ "crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// p11KitClient is Debian's p11-kit-client.so (package p11-kit-modules):
// the PKCS#11 module that forwards every call to P11_KIT_SERVER_ADDRESS.
func p11KitClient(tb testing.TB) string {
	tb.Helper()
	for _, dir := range []string{"/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"} {
		if p := filepath.Join(dir, "pkcs11", "p11-kit-client.so"); fileExists(p) {
			if _, err := exec.LookPath("pkcs11-tool"); err == nil {
				return p
			}
		}
	}
	if os.Getenv("CI") != "" {
		tb.Fatal("p11-kit-client.so or pkcs11-tool is missing: apt-get install p11-kit-modules opensc")
	}
	tb.Skip("p11-kit-client.so or pkcs11-tool is missing (apt-get install p11-kit-modules opensc)")
	return ""
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// p11Fixture is a token with an EC key (with a certificate and its chain)
// and an RSA key, served by "hsmagent serve" with --pkcs11-socket.
type p11Fixture struct {
	fx     *Token
	d      *daemon
	module string
	socket string // the PKCS#11 socket
	keys   map[string]keyFacts
	dir    string
	public string // a directory every uid may read
	ca     *CA
}

type keyFacts struct {
	id  string // hex
	pub crypto.PublicKey
}

func startP11(t *testing.T, config string) *p11Fixture {
	t.Helper()
	p := &p11Fixture{module: p11KitClient(t), fx: New(t), keys: map[string]keyFacts{}, dir: t.TempDir()}
	fx := p.fx
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "ec", "--type", "ecdsa-p256")...)
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "rsa", "--type", "rsa-2048")...)
	tok := fx.Open(t)
	for _, label := range []string{"ec", "rsa"} {
		k, err := tok.Key(label)
		if err != nil {
			t.Fatal(err)
		}
		p.keys[label] = keyFacts{id: hex.EncodeToString(k.ID), pub: k.Public}
	}
	tok.Close()
	p.ca = NewCAWithIntermediate(t, "PKCS11 CA")
	now := time.Now()
	chain := writePEM(t, filepath.Join(p.dir, "chain.pem"), p.ca.Chain()...)
	writePEM(t, filepath.Join(p.dir, "root.pem"), p.ca.Cert)
	for _, label := range []string{"ec", "rsa"} {
		leaf := p.ca.Leaf(t, pkix.Name{CommonName: label}, p.keys[label].pub, now.Add(-time.Hour), now.Add(48*time.Hour), "localhost")
		fx.ok(t, fx.args([]string{"cert", "import"}, "--key", label,
			"--cert", writePEM(t, filepath.Join(p.dir, label+".pem"), leaf), "--chain", chain)...)
	}

	// Sockets in a directory every user may walk, so that other uids reach them.
	sockDir := SocketDir(t)
	if err := os.Chmod(sockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	p.socket, p.public = filepath.Join(sockDir, "pkcs11.sock"), sockDir
	args := append([]string{"serve", "--socket", filepath.Join(sockDir, "agent.sock"), "--socket-mode", "0666"}, fx.tokenArgs()...)
	if config == "" {
		args = append(args, "--pkcs11-socket", p.socket)
	} else { // the setting in the file, where the flag is not given
		path := filepath.Join(p.dir, "agent.yaml")
		if err := os.WriteFile(path, []byte("pkcs11_socket: "+p.socket+"\n"+config), 0o600); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--config", path)
	}
	cmd := exec.Command(binary, args...)
	cmd.Env = fx.Env()
	p.d = fx.runDaemon(t, &daemon{socket: filepath.Join(sockDir, "agent.sock")}, cmd)
	return p
}

// tool runs pkcs11-tool on p11-kit-client.so pointed at the agent, as the
// test's user or, with uid >= 0, as that uid (setpriv).
func (p *p11Fixture) tool(t *testing.T, uid int, args ...string) (string, error) {
	t.Helper()
	argv := append([]string{"--module", p.module}, args...)
	cmd := exec.Command("pkcs11-tool", argv...)
	if uid >= 0 {
		cmd = exec.Command("setpriv", append([]string{"--reuid=" + itoa(uid), "--regid=" + itoa(uid), "--clear-groups", "pkcs11-tool"}, argv...)...)
	}
	cmd.Env = []string{"P11_KIT_SERVER_ADDRESS=unix:path=" + p.socket, "PATH=" + os.Getenv("PATH")}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func itoa(i int) string { return big.NewInt(int64(i)).String() }

// TestPKCS11ToolThroughP11KitClient: OpenSC's pkcs11-tool, loading Debian's
// p11-kit-client.so (protocol version 0), sees the agent's token, its
// objects, and signs with each key and each mechanism that client carries;
// each signature verifies against the key's public key. Writes are refused.
func TestPKCS11ToolThroughP11KitClient(t *testing.T) {
	p := startP11(t, "")
	out, err := p.tool(t, -1, "--list-slots")
	if err != nil {
		t.Fatalf("pkcs11-tool -L: %v\n%s", err, out)
	}
	for _, want := range []string{"token label        : hsmagent", "token initialized", "readonly"} {
		if !strings.Contains(out, want) {
			t.Errorf("pkcs11-tool -L has no %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "login required") {
		t.Errorf("the token asks for a login:\n%s", out)
	}

	out, err = p.tool(t, -1, "--list-objects")
	if err != nil {
		t.Fatalf("pkcs11-tool -O: %v\n%s", err, out)
	}
	for _, want := range []string{"Private Key Object; EC", "Private Key Object; RSA", "Public Key Object; RSA 2048 bits",
		"Certificate Object; type = X.509 cert", "label:      ec chain 1", "subject:    DN: CN=ec",
		"ID:         " + p.keys["ec"].id, "Access:     sensitive, always sensitive, never extractable"} {
		if !strings.Contains(out, want) {
			t.Errorf("pkcs11-tool -O has no %q:\n%s", want, out)
		}
	}

	data := []byte("signed through p11-kit-client.so\n")
	sum := func(h crypto.Hash) []byte { x := h.New(); x.Write(data); return x.Sum(nil) }
	dataFile := filepath.Join(p.dir, "data")
	os.WriteFile(dataFile, data, 0o644)
	for _, tc := range []struct {
		mech  string
		key   string
		hash  crypto.Hash
		input []byte // what pkcs11-tool is given; nil: data
		extra []string
		pss   bool
	}{
		{mech: "ECDSA", key: "ec", hash: crypto.SHA256, input: sum(crypto.SHA256)},
		{mech: "ECDSA", key: "ec", hash: crypto.SHA384, input: sum(crypto.SHA384)},
		{mech: "RSA-PKCS", key: "rsa", hash: crypto.SHA256, input: digestInfo256(sum(crypto.SHA256))},
		{mech: "SHA256-RSA-PKCS", key: "rsa", hash: crypto.SHA256},
		{mech: "SHA384-RSA-PKCS", key: "rsa", hash: crypto.SHA384},
		{mech: "SHA512-RSA-PKCS", key: "rsa", hash: crypto.SHA512},
		{mech: "RSA-PKCS-PSS", key: "rsa", hash: crypto.SHA256, input: sum(crypto.SHA256), pss: true,
			extra: []string{"--hash-algorithm", "SHA256", "--mgf", "MGF1-SHA256"}},
		{mech: "RSA-PKCS-PSS", key: "rsa", hash: crypto.SHA512, input: sum(crypto.SHA512), pss: true,
			extra: []string{"--hash-algorithm", "SHA512", "--mgf", "MGF1-SHA512"}},
	} {
		t.Run(tc.mech+"-"+tc.hash.String(), func(t *testing.T) {
			in := dataFile
			if tc.input != nil {
				in = filepath.Join(p.dir, tc.mech+tc.hash.String()+".in")
				os.WriteFile(in, tc.input, 0o644)
			}
			sigFile := filepath.Join(p.dir, tc.mech+tc.hash.String()+".sig")
			args := append([]string{"--sign", "-m", tc.mech, "--id", p.keys[tc.key].id, "-i", in, "-o", sigFile}, tc.extra...)
			if out, err := p.tool(t, -1, args...); err != nil {
				t.Fatalf("pkcs11-tool %v: %v\n%s", args, err, out)
			}
			sig, err := os.ReadFile(sigFile)
			if err != nil {
				t.Fatal(err)
			}
			verifyP11(t, p.keys[tc.key].pub, tc.hash, sum(tc.hash), sig, tc.pss)
		})
	}

	// OpenSSL agrees: the RSA signature verifies with openssl dgst.
	sigFile := filepath.Join(p.dir, "SHA256-RSA-PKCSSHA-256.sig")
	pubFile := filepath.Join(p.dir, "rsa.pub.pem")
	der, _ := x509.MarshalPKIXPublicKey(p.keys["rsa"].pub)
	os.WriteFile(pubFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644)
	if out, err := exec.Command("openssl", "dgst", "-sha256", "-verify", pubFile, "-signature", sigFile, dataFile).CombinedOutput(); err != nil {
		t.Errorf("openssl dgst -verify: %v\n%s", err, out)
	}

	// Any PIN logs in; the agent never asks for the HSM's.
	if out, err := p.tool(t, -1, "--login", "--pin", "not-the-hsm-pin", "--sign", "-m", "ECDSA", "--id", p.keys["ec"].id,
		"-i", filepath.Join(p.dir, "ECDSASHA-256.in"), "-o", filepath.Join(p.dir, "login.sig")); err != nil {
		t.Errorf("signing after C_Login with any PIN: %v\n%s", err, out)
	}
	// Writes are refused, with the code that says why.
	out, err = p.tool(t, -1, "--delete-object", "--type", "privkey", "--id", p.keys["ec"].id)
	if err == nil || !strings.Contains(out, "CKR_TOKEN_WRITE_PROTECTED") {
		t.Errorf("pkcs11-tool --delete-object: %v, want CKR_TOKEN_WRITE_PROTECTED:\n%s", err, out)
	}
	if !regexp.MustCompile(`msg=sign .*key=rsa .*result=ok .*transport=pkcs11`).MatchString(p.d.logText()) {
		t.Errorf("no audit record of a PKCS#11 signature naming the transport:\n%s", p.d.logText())
	}
}

// TestPKCS11CallersSeeTheirKeys: each caller sees the keys its rules give
// it, at once on the same socket; a caller no rule names sees an empty
// token, and its listing is audited with the keys hidden from it.
func TestPKCS11CallersSeeTheirKeys(t *testing.T) {
	if os.Getuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("runs as root in CI: it connects as other uids with setpriv")
		}
		t.Skip("needs root, to connect as other uids with setpriv")
	}
	p := startP11(t, "access:\n  - keys: [\"ec\"]\n    users: [\"65534\"]\n")
	for _, tc := range []struct {
		name       string
		uid        int
		see, notSe []string
	}{
		{"the agent's own user: every key", -1, []string{"label:      ec", "label:      rsa"}, nil},
		{"a rule's user: its key only", 65534, []string{"label:      ec", "Certificate Object"}, []string{"label:      rsa"}},
		{"a user no rule names: nothing", 65533, nil, []string{"Private Key Object", "Certificate Object", "label:"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := p.tool(t, tc.uid, "--list-objects")
			if err != nil {
				t.Fatalf("pkcs11-tool -O as uid %d: %v\n%s", tc.uid, err, out)
			}
			for _, want := range tc.see {
				if !strings.Contains(out, want) {
					t.Errorf("uid %d does not see %q:\n%s", tc.uid, want, out)
				}
			}
			for _, hidden := range tc.notSe {
				if strings.Contains(out, hidden) {
					t.Errorf("uid %d sees %q:\n%s", tc.uid, hidden, out)
				}
			}
		})
	}
	if !regexp.MustCompile(`msg=list uid=65533 .*visible=0 hidden=2 .*transport=pkcs11`).MatchString(p.d.logText()) {
		t.Errorf("no audit record of the refused caller's listing:\n%s", p.d.logText())
	}
	// Signing with a key the rules do not give it fails: it finds no key.
	in := filepath.Join(p.public, "digest")
	os.WriteFile(in, make([]byte, 32), 0o644)
	out, err := p.tool(t, 65533, "--sign", "-m", "ECDSA", "--id", p.keys["ec"].id, "-i", in, "-o", "/dev/null")
	if err == nil || !strings.Contains(out, "not found") {
		t.Errorf("uid 65533 signing with a key no rule gives it: %v, want the key not found:\n%s", err, out)
	}
}

func digestInfo256(digest []byte) []byte {
	prefix := []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}
	return append(prefix, digest...)
}

// verifyP11 checks a signature in PKCS#11's form (ECDSA as r||s) of digest.
func verifyP11(t *testing.T, pub crypto.PublicKey, h crypto.Hash, digest, sig []byte, pss bool) {
	t.Helper()
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		if len(sig) != 64 {
			t.Fatalf("ECDSA P-256 signature of %d bytes, want r||s of 64", len(sig))
		}
		if !ecdsa.Verify(pub, digest, new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
			t.Fatal("the ECDSA signature does not verify")
		}
	case *rsa.PublicKey:
		var err error
		if pss {
			err = rsa.VerifyPSS(pub, h, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		} else {
			err = rsa.VerifyPKCS1v15(pub, h, digest, sig)
		}
		if err != nil {
			t.Fatalf("the RSA signature does not verify: %v", err)
		}
	default:
		t.Fatalf("key of type %T", pub)
	}
}

// TestPKCS11OpenSSLEngineAndCurl: OpenSSL's pkcs11 engine (libp11, package
// libengine-pkcs11-openssl) loads p11-kit-client.so; openssl s_server signs
// its handshakes with one agent key, curl as its mTLS client with the
// other, in TLS 1.2 and 1.3, both key types on both sides (RSA signs
// RSA-PSS there).
func TestPKCS11OpenSSLEngineAndCurl(t *testing.T) {
	engine := ""
	for _, dir := range []string{"/usr/lib/x86_64-linux-gnu/engines-3", "/usr/lib/aarch64-linux-gnu/engines-3", "/usr/lib64/engines-3"} {
		if fileExists(filepath.Join(dir, "pkcs11.so")) {
			engine = filepath.Join(dir, "pkcs11.so")
		}
	}
	if engine == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("OpenSSL's pkcs11 engine is missing: apt-get install libengine-pkcs11-openssl")
		}
		t.Skip("OpenSSL's pkcs11 engine is missing (apt-get install libengine-pkcs11-openssl)")
	}
	p := startP11(t, "")
	conf := filepath.Join(p.dir, "openssl.cnf")
	os.WriteFile(conf, []byte(`openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
dynamic_path = `+engine+`
MODULE_PATH = `+p.module+`
init = 0
`), 0o600)
	env := []string{"OPENSSL_CONF=" + conf, "P11_KIT_SERVER_ADDRESS=unix:path=" + p.socket, "PATH=" + os.Getenv("PATH")}
	for _, tc := range []struct{ server, client, tls string }{
		{"ec", "rsa", "1.2"}, {"rsa", "ec", "1.2"}, {"ec", "rsa", "1.3"}, {"rsa", "ec", "1.3"},
	} {
		t.Run(tc.server+"-server-"+tc.client+"-client-TLS"+tc.tls, func(t *testing.T) {
			port := freePort(t)
			flag := map[string]string{"1.2": "-tls1_2", "1.3": "-tls1_3"}[tc.tls]
			srv := exec.Command("openssl", "s_server", "-accept", "127.0.0.1:"+port, flag, "-www", "-naccept", "1",
				"-cert", filepath.Join(p.dir, tc.server+".pem"), "-cert_chain", filepath.Join(p.dir, "chain.pem"),
				"-engine", "pkcs11", "-keyform", "engine", "-key", "pkcs11:object="+tc.server+";type=private",
				"-Verify", "2", "-CAfile", filepath.Join(p.dir, "root.pem"), "-chainCAfile", filepath.Join(p.dir, "chain.pem"))
			srv.Env = env
			var srvOut syncBuf
			srv.Stdout, srv.Stderr = &srvOut, &srvOut
			if err := srv.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { srv.Process.Kill(); srv.Wait() }()
			deadline := time.Now().Add(10 * time.Second)
			for !strings.Contains(srvOut.String(), "ACCEPT") {
				if time.Now().After(deadline) {
					t.Fatalf("openssl s_server did not start:\n%s", srvOut.String())
				}
				time.Sleep(50 * time.Millisecond)
			}
			curl := exec.Command("curl", "-sS", "--max-time", "20", "--tlsv"+tc.tls, "--tls-max", tc.tls,
				"--cacert", filepath.Join(p.dir, "root.pem"),
				"--engine", "pkcs11", "--key-type", "ENG", "--key", "pkcs11:object="+tc.client+";type=private",
				"--cert", filepath.Join(p.dir, tc.client+"-full.pem"), "https://localhost:"+port+"/")
			os.WriteFile(filepath.Join(p.dir, tc.client+"-full.pem"), concat(t, filepath.Join(p.dir, tc.client+".pem"), filepath.Join(p.dir, "chain.pem")), 0o600)
			curl.Env = env
			out, err := curl.CombinedOutput()
			if err != nil {
				t.Fatalf("curl: %v\n%s\ns_server:\n%s", err, out, srvOut.String())
			}
			if want := "TLSv" + tc.tls; !strings.Contains(string(out), want) {
				t.Errorf("s_server's page does not say %s:\n%s", want, out)
			}
			if !strings.Contains(string(out), "Subject: CN="+tc.client+"\n") {
				t.Errorf("s_server did not see the client certificate of %q:\n%s", tc.client, out)
			}
		})
	}
	if n := len(regexp.MustCompile(`msg=sign .*result=ok .*transport=pkcs11`).FindAllString(p.d.logText(), -1)); n < 8 {
		t.Errorf("%d audit records of the PKCS#11 transport, want a signature each side of 4 handshakes:\n%s", n, p.d.logText())
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return itoa(l.Addr().(*net.TCPAddr).Port)
}

func concat(t *testing.T, files ...string) []byte {
	t.Helper()
	var out []byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b...)
	}
	return out
}

// syncBuf is an output buffer read while a process writes it.
type syncBuf struct {
	mu sync.Mutex
	b  []byte
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b = append(s.b, p...)
	return len(p), nil
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return string(s.b)
}

// TestPKCS11Java: Java 17's SunPKCS11 on p11-kit-client.so loads the
// agent's token as a KeyStore without a PIN (each key an entry with its
// chain: leaf and intermediate) and makes mTLS requests with its keys (EC
// and RSA, TLS 1.3 and 1.2: RSA-PSS in 1.3) to a server that requires a client
// certificate of the CA.
func TestPKCS11Java(t *testing.T) {
	if _, err := exec.LookPath("java"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("java is missing: apt-get install default-jdk-headless")
		}
		t.Skip("java is missing (apt-get install default-jdk-headless)")
	}
	p := startP11(t, "")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serverCert := p.ca.Leaf(t, pkix.Name{CommonName: "localhost"}, key.Public(), time.Now().Add(-time.Hour), time.Now().Add(time.Hour), "localhost")
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "client=%s", r.TLS.PeerCertificates[0].Subject.CommonName)
	}))
	srv.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: p.ca.Pool(),
		Certificates: []tls.Certificate{{Certificate: [][]byte{serverCert.Raw, p.ca.Intermediate.Raw}, PrivateKey: key}}}
	srv.StartTLS()
	defer srv.Close()
	cfg := filepath.Join(p.dir, "java-pkcs11.cfg")
	os.WriteFile(cfg, []byte("name = hsmagent\nlibrary = "+p.module+"\nslotListIndex = 0\n"), 0o600)
	port := srv.Listener.Addr().(*net.TCPAddr).Port
	for _, tc := range []struct{ alias, protocol string }{{"ec", "TLSv1.3"}, {"ec", "TLSv1.2"}, {"rsa", "TLSv1.3"}, {"rsa", "TLSv1.2"}} {
		t.Run(tc.alias+"-"+tc.protocol, func(t *testing.T) {
			cmd := exec.Command("java", "testdata/P11Client.java", cfg, filepath.Join(p.dir, "root.pem"),
				fmt.Sprintf("https://localhost:%d/", port), tc.alias, tc.protocol)
			cmd.Env = []string{"P11_KIT_SERVER_ADDRESS=unix:path=" + p.socket, "PATH=" + os.Getenv("PATH"), "HOME=" + p.dir}
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("java: %v\n%s", err, out)
			}
			for _, want := range []string{"entry ec key=true chain=2", "entry rsa key=true chain=2", "response client=" + tc.alias + "\n"} {
				if !strings.Contains(string(out), want) {
					t.Errorf("no %q:\n%s", want, out)
				}
			}
		})
	}
	if !regexp.MustCompile(`msg=sign .*result=ok .*transport=pkcs11`).MatchString(p.d.logText()) {
		t.Errorf("no signature by the agent for Java:\n%s", p.d.logText())
	}
}
