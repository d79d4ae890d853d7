package agent_test

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writePeerFiles writes the software peer's key and chain and the CA root as
// PEM files for OpenSSL.
func (f *fixture) writePeerFiles(t *testing.T) (certFile, keyFile, caFile string) {
	t.Helper()
	cert, _ := f.peerConfig(t)
	dir := t.TempDir()
	der, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	keyFile = filepath.Join(dir, "peer.key")
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	// OpenSSL sends only the first certificate of -cert; the rest goes in -cert_chain.
	certFile = filepath.Join(dir, "peer.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o644)
	var chain []byte
	for _, c := range cert.Certificate[1:] {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c})...)
	}
	os.WriteFile(filepath.Join(dir, "peer-chain.pem"), chain, 0o644)
	caFile = filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: f.ca.Cert.Raw}), 0o644)
	return certFile, keyFile, caFile
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestOpenSSLServerAcceptsAgentClient: openssl s_server demands and verifies
// a client certificate; a Go client whose key is in the agent gets through.
func TestOpenSSLServerAcceptsAgentClient(t *testing.T) {
	f := newFixture(t)
	certFile, keyFile, caFile := f.writePeerFiles(t)
	port := freePort(t)
	srv := exec.Command("openssl", "s_server", "-accept", fmt.Sprintf("127.0.0.1:%d", port), "-cert", certFile, "-cert_chain", filepath.Join(filepath.Dir(certFile), "peer-chain.pem"), "-key", keyFile,
		"-CAfile", caFile, "-Verify", "2", "-verify_return_error", "-www")
	stdout, _ := srv.StdoutPipe()
	srv.Stderr = srv.Stdout
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	waitForLine(t, stdout, "ACCEPT")

	for _, label := range keyLabels {
		for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
			t.Run(label+"/"+tls.VersionName(version), func(t *testing.T) {
				_, pool := f.peerConfig(t)
				hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
					RootCAs: pool, ServerName: "localhost", MinVersion: version, MaxVersion: version,
					GetClientCertificate: f.client.GetClientCertificate(label)}}}
				resp, err := hc.Get(fmt.Sprintf("https://127.0.0.1:%d/", port))
				if err != nil {
					t.Fatalf("GET from openssl s_server: %v", err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				want := map[uint16]string{tls.VersionTLS12: "TLSv1.2", tls.VersionTLS13: "TLSv1.3"}[version]
				if resp.StatusCode != 200 || !strings.Contains(string(body), want) {
					t.Errorf("status %d, body lacks %s:\n%s", resp.StatusCode, want, body)
				}
			})
		}
	}
}

// TestOpenSSLClientVerifiesAgentServer: openssl s_client verifies the chain
// of a Go server whose key is in the agent.
func TestOpenSSLClientVerifiesAgentServer(t *testing.T) {
	f := newFixture(t)
	_, _, caFile := f.writePeerFiles(t)
	for _, label := range keyLabels {
		for _, version := range []string{"-tls1_2", "-tls1_3"} {
			t.Run(label+version, func(t *testing.T) {
				l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: f.client.GetCertificate(label)})
				if err != nil {
					t.Fatal(err)
				}
				defer l.Close()
				go func() {
					for {
						c, err := l.Accept()
						if err != nil {
							return
						}
						go func() {
							defer c.Close()
							c.(*tls.Conn).Handshake()
							io.Copy(io.Discard, c)
						}()
					}
				}()
				out, err := exec.Command("openssl", "s_client", "-connect", l.Addr().String(), "-servername", "localhost",
					"-CAfile", caFile, "-verify_return_error", "-verify_hostname", "localhost", version, "-brief").CombinedOutput()
				text := string(out)
				if err != nil && !strings.Contains(text, "Verification: OK") {
					t.Fatalf("openssl s_client: %v\n%s", err, text)
				}
				wantProto := map[string]string{"-tls1_2": "Protocol version: TLSv1.2", "-tls1_3": "Protocol version: TLSv1.3"}[version]
				if !strings.Contains(text, "Verification: OK") || !strings.Contains(text, wantProto) {
					t.Errorf("openssl s_client output:\n%s", text)
				}
			})
		}
	}
}

func waitForLine(t *testing.T, r io.Reader, want string) {
	t.Helper()
	found := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			if strings.Contains(sc.Text(), want) {
				found <- true
				io.Copy(io.Discard, r)
				return
			}
		}
		found <- false
	}()
	select {
	case ok := <-found:
		if !ok {
			t.Fatalf("process ended before printing %q", want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %q", want)
	}
}
