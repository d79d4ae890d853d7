package hsm

import (
	"bytes"
	"crypto/x509"
	"encoding/asn1"
	"fmt"
)

// ParseCertificates reads the certificates of a file as CAs send them:
// PEM (CERTIFICATE blocks, or a PKCS7 block), DER (one certificate), or
// PKCS #7 (.p7b, .p7c: a certificates-only SignedData, DER or PEM). name
// is the file name used in errors.
func ParseCertificates(name string, data []byte) ([]*x509.Certificate, error) {
	if bytes.Contains(data, []byte("-----BEGIN")) {
		return ParseCertificatesPEM(name, data)
	}
	if c, err := x509.ParseCertificate(data); err == nil {
		return []*x509.Certificate{c}, nil
	}
	if certs, err := parsePKCS7(data); err == nil {
		if len(certs) == 0 {
			return nil, fmt.Errorf("hsm: %q is a PKCS #7 file with no certificate in it", name)
		}
		return certs, nil
	}
	return nil, fmt.Errorf("hsm: %q is neither PEM (-----BEGIN CERTIFICATE-----), a DER certificate nor PKCS #7 (.p7b)", name)
}

// oidSignedData is PKCS #7's signedData content type (RFC 2315).
var oidSignedData = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 2}

// parsePKCS7 reads the certificates of a PKCS #7 SignedData, as CAs ship
// chains: ContentInfo { contentType, [0] EXPLICIT SignedData { version,
// digestAlgorithms, contentInfo, [0] IMPLICIT certificates, ... } }.
func parsePKCS7(der []byte) ([]*x509.Certificate, error) {
	var ci struct {
		ContentType asn1.ObjectIdentifier
		Content     asn1.RawValue `asn1:"explicit,tag:0"`
	}
	if rest, err := asn1.Unmarshal(der, &ci); err != nil || len(rest) != 0 {
		return nil, fmt.Errorf("hsm: not PKCS #7")
	}
	if !ci.ContentType.Equal(oidSignedData) {
		return nil, fmt.Errorf("hsm: PKCS #7 content %v is not signedData", ci.ContentType)
	}
	var sd struct {
		Version          int
		DigestAlgorithms asn1.RawValue
		ContentInfo      asn1.RawValue
		Certificates     asn1.RawValue `asn1:"optional,tag:0"`
		// crls and signerInfos follow; encoding/asn1 leaves them unread.
	}
	if _, err := asn1.Unmarshal(ci.Content.Bytes, &sd); err != nil {
		return nil, fmt.Errorf("hsm: PKCS #7 signedData: %w", err)
	}
	return x509.ParseCertificates(sd.Certificates.Bytes)
}
