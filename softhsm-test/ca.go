package softhsmtest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"
)

// CA is an in-memory certificate authority standing in for Thales or a
// public CA in tests. Its keys are software keys: they play the outside party.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
	// Intermediate, when set by NewCAWithIntermediate, signs the leaves.
	Intermediate    *x509.Certificate
	intermediateKey crypto.Signer
}

// NewCA makes a self-signed root named cn.
func NewCA(tb testing.TB, cn string) *CA {
	tb.Helper()
	key := mustKey(tb)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(tb),
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"hsmagent test"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		tb.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &CA{Cert: cert, Key: key}
}

// NewCAWithIntermediate makes a root and an intermediate that signs leaves.
func NewCAWithIntermediate(tb testing.TB, cn string) *CA {
	tb.Helper()
	ca := NewCA(tb, cn+" Root")
	key := mustKey(tb)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(tb),
		Subject:               pkix.Name{CommonName: cn + " Intermediate", Organization: []string{"hsmagent test"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		tb.Fatal(err)
	}
	ca.Intermediate, _ = x509.ParseCertificate(der)
	ca.intermediateKey = key
	return ca
}

// Leaf issues a certificate for pub. Both client and server auth are allowed.
func (ca *CA) Leaf(tb testing.TB, subject pkix.Name, pub crypto.PublicKey, notBefore, notAfter time.Time, dnsNames ...string) *x509.Certificate {
	tb.Helper()
	parent, key := ca.Cert, ca.Key
	if ca.Intermediate != nil {
		parent, key = ca.Intermediate, ca.intermediateKey
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(tb),
		Subject:      subject,
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		DNSNames:     dnsNames,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		tb.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return cert
}

// SignCSR issues a one-day certificate for a PKCS #10 request after checking its signature.
func (ca *CA) SignCSR(tb testing.TB, csrDER []byte, dnsNames ...string) *x509.Certificate {
	tb.Helper()
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		tb.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		tb.Fatalf("CSR signature: %v", err)
	}
	return ca.Leaf(tb, csr.Subject, csr.PublicKey, time.Now().Add(-time.Minute), time.Now().Add(24*time.Hour), append(dnsNames, csr.DNSNames...)...)
}

// Chain is the certificates a server or client presents after its leaf.
func (ca *CA) Chain() []*x509.Certificate {
	if ca.Intermediate != nil {
		return []*x509.Certificate{ca.Intermediate}
	}
	return nil
}

// Pool holds the root.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

func mustKey(tb testing.TB) crypto.Signer {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

func serial(tb testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		tb.Fatal(err)
	}
	return n
}
