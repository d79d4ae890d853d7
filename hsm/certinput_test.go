package hsm

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestParseCertificates: a chain as CAs send it, in PEM, DER and PKCS #7
// (made by OpenSSL, DER and PEM), reads the same; a corrupt PEM body is
// named as such, wherever it is in the file.
func TestParseCertificates(t *testing.T) {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := testCert(t, "Input CA", &caKey.PublicKey, caKey, nil, true, time.Now().Add(time.Hour))
	leaf := testCert(t, "input.example", &leafKey.PublicKey, caKey, ca, false, time.Now().Add(time.Hour))
	dir := t.TempDir()
	chainPEM := EncodeCertificatesPEM([]*x509.Certificate{leaf, ca})
	pemFile := filepath.Join(dir, "chain.pem")
	os.WriteFile(pemFile, chainPEM, 0o600)
	p7b := func(form string) []byte {
		out := filepath.Join(dir, "chain."+form)
		if b, err := exec.Command("openssl", "crl2pkcs7", "-nocrl", "-certfile", pemFile, "-outform", form, "-out", out).CombinedOutput(); err != nil {
			t.Fatalf("openssl crl2pkcs7: %v\n%s", err, b)
		}
		b, _ := os.ReadFile(out)
		return b
	}
	corrupt := bytes.Replace(chainPEM, chainPEM[40:44], []byte("!!!!"), 1)
	lines := bytes.SplitAfter(chainPEM, []byte("\n"))
	second := 0 // the second block's first line
	for i, l := range lines {
		if i > 0 && bytes.HasPrefix(l, []byte("-----BEGIN")) {
			second = i
		}
	}
	lines[second+1] = []byte("####\n")
	corruptSecond := bytes.Join(lines, nil)
	for _, tc := range []struct {
		name string
		data []byte
		want int    // certificates
		err  string // or the error
	}{
		{"PEM", chainPEM, 2, ""},
		{"DER", leaf.Raw, 1, ""},
		{"PKCS #7 DER", p7b("DER"), 2, ""},
		{"PKCS #7 PEM", p7b("PEM"), 2, ""},
		{"corrupt PEM body", corrupt, 0, "the PEM block at line 1 does not decode"},
		{"corrupt second block", corruptSecond, 0, "line " + strconv.Itoa(second+1) + " does not decode"},
		{"neither", []byte("hello"), 0, "neither PEM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			certs, err := ParseCertificates("in", tc.data)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %d certificates, %v; want %q", len(certs), err, tc.err)
				}
				return
			}
			if err != nil || len(certs) != tc.want || !certs[0].Equal(leaf) && !certs[len(certs)-1].Equal(leaf) {
				t.Fatalf("got %d certificates, %v; want %d with the leaf", len(certs), err, tc.want)
			}
		})
	}
}
