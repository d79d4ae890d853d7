package hsm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net"
	"strings"
)

// CSRRequest is what goes into a certificate signing request.
type CSRRequest struct {
	Subject  pkix.Name
	DNSNames []string
	IPs      []net.IP
}

// CreateCSR builds a PKCS #10 request signed by signer with SHA-256
// (sha256WithRSAEncryption or ecdsa-with-SHA256), then verifies the request's
// own signature so a faulty HSM signature is caught before the CSR is sent.
// The subject's attributes are encoded in the order C, ST, L, O, OU, CN.
func CreateCSR(signer crypto.Signer, req CSRRequest) ([]byte, error) {
	var alg x509.SignatureAlgorithm
	switch signer.Public().(type) {
	case *ecdsa.PublicKey:
		alg = x509.ECDSAWithSHA256
	case *rsa.PublicKey:
		alg = x509.SHA256WithRSA
	default:
		return nil, fmt.Errorf("hsm: CSR: unsupported public key type %T", signer.Public())
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:            req.Subject,
		DNSNames:           req.DNSNames,
		IPAddresses:        req.IPs,
		SignatureAlgorithm: alg,
	}, signer)
	if err != nil {
		return nil, fmt.Errorf("hsm: signing CSR: %w", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("hsm: parsing the CSR just made: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("hsm: the CSR's signature does not verify: %w", err)
	}
	return der, nil
}

// ParseSubject reads a distinguished name written as in RFC 4514 but in
// reading order, e.g. "CN=api.example.com,OU=Payments,O=Example Bank,C=FR".
// Supported attributes: C, ST, L, O, OU, CN, SERIALNUMBER, STREET, POSTALCODE.
// A comma or plus inside a value is escaped with a backslash. The form
// OpenSSL's -subj takes and 'hsmagent csr' prints, "/C=FR/O=Example
// Bank/CN=api.example.com", is read too; there a '/' inside a value (a D1
// CN's) needs no escape, as no attribute lacks its '='.
func ParseSubject(s string) (pkix.Name, error) {
	var name pkix.Name
	s = strings.TrimSpace(s)
	if s == "" || s == "/" {
		return name, errors.New("hsm: subject is empty")
	}
	rdns := splitUnescaped(s, ',')
	if s[0] == '/' {
		rdns = slashRDNs(strings.TrimSuffix(s[1:], "/"))
	}
	for _, rdn := range rdns {
		key, value, ok := strings.Cut(rdn, "=")
		key = strings.ToUpper(strings.TrimSpace(key))
		value = unescapeDN(strings.TrimSpace(value))
		if !ok || key == "" {
			return name, fmt.Errorf("hsm: subject part %q is not KEY=VALUE", strings.TrimSpace(rdn))
		}
		if value == "" {
			return name, fmt.Errorf("hsm: subject attribute %q has an empty value", key)
		}
		switch key {
		case "C":
			if len(value) != 2 {
				return name, fmt.Errorf("hsm: subject country %q is not a two-letter code", value)
			}
			name.Country = append(name.Country, strings.ToUpper(value))
		case "ST", "S":
			name.Province = append(name.Province, value)
		case "L":
			name.Locality = append(name.Locality, value)
		case "O":
			name.Organization = append(name.Organization, value)
		case "OU":
			name.OrganizationalUnit = append(name.OrganizationalUnit, value)
		case "CN":
			if name.CommonName != "" {
				return name, errors.New("hsm: subject has more than one CN")
			}
			name.CommonName = value
		case "SERIALNUMBER":
			name.SerialNumber = value
		case "STREET":
			name.StreetAddress = append(name.StreetAddress, value)
		case "POSTALCODE":
			name.PostalCode = append(name.PostalCode, value)
		default:
			return name, fmt.Errorf("hsm: subject attribute %q is not supported; use C, ST, L, O, OU, CN, SERIALNUMBER, STREET or POSTALCODE", key)
		}
	}
	return name, nil
}

// slashRDNs splits the OpenSSL form at its '/'s, a part without '=' being
// the rest of the value before it.
func slashRDNs(s string) []string {
	var rdns []string
	for _, part := range splitUnescaped(s, '/') {
		if n := len(rdns); n > 0 && !strings.Contains(part, "=") {
			rdns[n-1] += `\/` + part
			continue
		}
		rdns = append(rdns, part)
	}
	return rdns
}

func splitUnescaped(s string, sep byte) []string {
	var parts []string
	start := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\':
			i++
		case sep:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	return append(parts, s[start:])
}

func unescapeDN(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
