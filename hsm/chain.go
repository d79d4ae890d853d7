package hsm

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"time"
)

// ParseCertificatesPEM reads every CERTIFICATE block of a PEM file (and the
// certificates of PKCS7 blocks), in order. name is the file name used in
// errors; a block whose body does not decode is named, with its line.
func ParseCertificatesPEM(name string, data []byte) ([]*x509.Certificate, error) {
	begin := []byte("-----BEGIN")
	var certs []*x509.Certificate
	for off := 0; ; {
		i := bytes.Index(data[off:], begin)
		if i < 0 {
			break
		}
		start := off + i
		block, rest := pem.Decode(data[start:])
		end := len(data) - len(rest)
		// pem.Decode skips a block it cannot decode and returns the next
		// one: then another BEGIN lies between this one and the end.
		if block == nil || bytes.Contains(data[start+len(begin):end], begin) {
			return nil, fmt.Errorf("hsm: %q: the PEM block at line %d does not decode (its base64 body is corrupt or cut); copy the file again from the CA",
				name, bytes.Count(data[:start], []byte("\n"))+1)
		}
		off = end
		switch {
		case block.Type == "PKCS7":
			more, err := parsePKCS7(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("hsm: %q: PKCS7 block: %w", name, err)
			}
			certs = append(certs, more...)
		case strings.Contains(block.Type, "PRIVATE KEY"):
			return nil, fmt.Errorf("hsm: %q holds a private key; keys belong in the HSM, remove it from this file", name)
		case block.Type != "CERTIFICATE":
			return nil, fmt.Errorf("hsm: %q: unexpected PEM block %q; want CERTIFICATE", name, block.Type)
		default:
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("hsm: %q: certificate %d: %w", name, len(certs)+1, err)
			}
			certs = append(certs, c)
		}
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("hsm: %q holds no PEM certificate (want -----BEGIN CERTIFICATE-----)", name)
	}
	return certs, nil
}

// EncodeCertificatesPEM writes certs as consecutive CERTIFICATE blocks.
func EncodeCertificatesPEM(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// Fingerprint is the SHA-256 of DER bytes as colon-separated upper-case hex,
// the form OpenSSL prints.
func Fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	h := strings.ToUpper(hex.EncodeToString(sum[:]))
	var b strings.Builder
	for i := 0; i < len(h); i += 2 {
		if i > 0 {
			b.WriteByte(':')
		}
		b.WriteString(h[i : i+2])
	}
	return b.String()
}

// PublicKeyFingerprint is the Fingerprint of a key's DER SubjectPublicKeyInfo.
func PublicKeyFingerprint(pub any) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("hsm: encoding public key: %w", err)
	}
	return Fingerprint(der), nil
}

// ErrNoMatchingCertificate means no certificate carries the key's public key.
var ErrNoMatchingCertificate = errors.New("hsm: no certificate matches the key's public key")

// SortChain puts a leaf-plus-intermediates bundle in order: the certificate
// whose public key matches leafKey first, then each certificate's issuer.
// Certificates that do not belong to the path are an error.
func SortChain(leafKey any, certs []*x509.Certificate) ([]*x509.Certificate, error) {
	var leaf *x509.Certificate
	rest := make([]*x509.Certificate, 0, len(certs))
	for _, c := range certs {
		if leaf == nil && publicKeysEqual(leafKey, c.PublicKey) {
			leaf = c
			continue
		}
		rest = append(rest, c)
	}
	if leaf == nil {
		return nil, ErrNoMatchingCertificate
	}
	chain := []*x509.Certificate{leaf}
	for len(rest) > 0 {
		last := chain[len(chain)-1]
		next := -1
		for i, c := range rest {
			if last.CheckSignatureFrom(c) == nil {
				next = i
				break
			}
		}
		if next < 0 {
			return nil, fmt.Errorf("hsm: certificate %q does not sign %q nor any other in the chain; the chain does not link", rest[0].Subject, last.Subject)
		}
		chain = append(chain, rest[next])
		rest = append(rest[:next], rest[next+1:]...)
	}
	return chain, nil
}

// ChainWarnings checks validity dates at now. It returns an error for a
// certificate that is expired or not yet valid, and warnings for one that
// expires within 30 days.
func ChainWarnings(chain []*x509.Certificate, now time.Time) (warnings []string, err error) {
	for i, c := range chain {
		what := "certificate"
		if i > 0 {
			what = "chain certificate"
		}
		switch {
		case now.After(c.NotAfter):
			return nil, fmt.Errorf("hsm: %s %q expired on %s", what, c.Subject, c.NotAfter.UTC().Format(time.DateOnly))
		case now.Before(c.NotBefore):
			return nil, fmt.Errorf("hsm: %s %q is not valid before %s", what, c.Subject, c.NotBefore.UTC().Format(time.RFC3339))
		case c.NotAfter.Sub(now) < 30*24*time.Hour:
			warnings = append(warnings, fmt.Sprintf("%s %q expires in %s (%s)", what, c.Subject,
				days(int(c.NotAfter.Sub(now).Hours()/24)), c.NotAfter.UTC().Format(time.DateOnly)))
		}
	}
	return warnings, nil
}

// days words a count of days: "1 day", "0 days", "12 days".
func days(n int) string {
	if n == 1 {
		return "1 day"
	}
	return fmt.Sprintf("%d days", n)
}
