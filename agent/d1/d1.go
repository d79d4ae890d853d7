// Package d1 holds the Thales D1 connectivity rules that hsmagent enforces:
// environments, the shape of mTLS keys and CSRs, and (as they are added) the
// TLS and OAuth profiles for calls in both directions.
//
// Rule IDs such as D1-C2 refer to the project's D1 requirements page.
//
// # Checks
//
// The checks of 'hsmagent doctor' live here: CheckKeys, CheckSocket,
// CheckAgent, CheckDNS, CheckOnline and Settings.Problems. They take plain
// values (key labels and certificates, a socket's mode, what the agent
// answered, the settings of an environment, a resolver, the agent as
// Credentials) and return Findings, which doctor only prints; so they run
// without the CLI, cgo or an HSM.
package d1

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/hsmagent/hsmagent/agent/keytype"
)

// Env is a D1 environment code. PreProd and Production are isolated: each has
// its own keys, CSRs and certificates (D1-G2).
type Env string

const (
	PreProd    Env = "PPR"
	Production Env = "PRD"
)

// ParseEnv accepts PPR or PRD, and preprod/production as aliases, in any case.
func ParseEnv(s string) (Env, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "ppr", "preprod", "pre-prod", "preproduction":
		return PreProd, nil
	case "prd", "prod", "production":
		return Production, nil
	}
	return "", fmt.Errorf("d1: environment %q is not PPR or PRD (preprod/production also accepted)", s)
}

// Key types as a D1 CN names them (D1-C4).
const (
	KeyTypeECDSA = "ECDSA"
	KeyTypeRSA   = "RSA"
)

// CNKeyType checks that pub is a key D1 accepts for mTLS, ECDSA P-256 or
// RSA 4096 (D1-C2), and returns how the CN names its type.
func CNKeyType(pub crypto.PublicKey) (string, error) {
	switch keytype.Of(pub) {
	case keytype.ECDSAP256:
		return KeyTypeECDSA, nil
	case keytype.RSA4096:
		return KeyTypeRSA, nil
	}
	return "", fmt.Errorf("d1: %s are not accepted by D1; generate an ecdsa-p256 or rsa-4096 key", describeKey(pub))
}

// describeKey names a key's algorithm and size for an error message.
func describeKey(pub crypto.PublicKey) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return "ECDSA keys on " + k.Curve.Params().Name
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA %d-bit keys", k.N.BitLen())
	}
	return fmt.Sprintf("%T keys", pub)
}

// DefaultCNTemplate is the CN pattern used unless the Thales Delivery Team
// gives another one at onboarding (D1-C4).
const DefaultCNTemplate = "TLSMA-{keyType}/{issuerId}/{env}"

var placeholder = regexp.MustCompile(`\{[^{}]*\}`)

// issuerIDPattern keeps the issuerId to characters that cannot break a subject
// or a CN template: D1 issues 10-character alphanumeric identifiers (D1-G3).
var issuerIDPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

var countryPattern = regexp.MustCompile(`^[A-Za-z]{2}$`)

// CheckIssuerID validates an issuerId.
func CheckIssuerID(id string) error {
	if id == "" {
		return errors.New("d1: issuerId is empty; use the identifier Thales gave at onboarding")
	}
	if !issuerIDPattern.MatchString(id) {
		return fmt.Errorf("d1: issuerId %q may only hold letters, digits, '-' and '_'", id)
	}
	return nil
}

// SubjectRequest is the operator's input for a D1 client CSR (D1-C3, D1-C4).
type SubjectRequest struct {
	IssuerID string
	Env      Env
	// KeyType is KeyTypeECDSA or KeyTypeRSA, from CNKeyType.
	KeyType      string
	Country      string
	State        string
	Locality     string
	Organization string
	OrgUnit      string
	// CNTemplate defaults to DefaultCNTemplate. Placeholders: {keyType},
	// {issuerId}, {env}.
	CNTemplate string
}

// Subject validates r and returns the CSR subject: C, ST, L, O, OU and the CN
// built from the template.
func (r SubjectRequest) Subject() (pkix.Name, error) {
	if r.KeyType != KeyTypeECDSA && r.KeyType != KeyTypeRSA {
		return pkix.Name{}, fmt.Errorf("d1: key type %q is not %s or %s", r.KeyType, KeyTypeECDSA, KeyTypeRSA)
	}
	if err := CheckIssuerID(r.IssuerID); err != nil {
		return pkix.Name{}, err
	}
	if _, err := ParseEnv(string(r.Env)); err != nil {
		return pkix.Name{}, err
	}
	if !countryPattern.MatchString(r.Country) {
		return pkix.Name{}, fmt.Errorf("d1: country %q is not a two-letter ISO 3166 code such as FR or US", r.Country)
	}
	fields := []struct{ name, value string }{
		{"state", r.State}, {"locality", r.Locality}, {"organization", r.Organization}, {"organization unit", r.OrgUnit},
	}
	for _, f := range fields {
		if strings.TrimSpace(f.value) == "" {
			return pkix.Name{}, fmt.Errorf("d1: %s is empty; D1 requires C, ST, L, O, OU and CN", f.name)
		}
		if len(f.value) > 64 {
			return pkix.Name{}, fmt.Errorf("d1: %s %q is longer than 64 characters", f.name, f.value)
		}
	}
	cn, err := r.CommonName()
	if err != nil {
		return pkix.Name{}, err
	}
	return pkix.Name{
		Country:            []string{strings.ToUpper(r.Country)},
		Province:           []string{r.State},
		Locality:           []string{r.Locality},
		Organization:       []string{r.Organization},
		OrganizationalUnit: []string{r.OrgUnit},
		CommonName:         cn,
	}, nil
}

// CommonName fills the CN template.
func (r SubjectRequest) CommonName() (string, error) {
	tmpl := r.CNTemplate
	if tmpl == "" {
		tmpl = DefaultCNTemplate
	}
	var bad []string
	cn := placeholder.ReplaceAllStringFunc(tmpl, func(p string) string {
		switch p {
		case "{keyType}":
			return r.KeyType
		case "{issuerId}":
			return r.IssuerID
		case "{env}":
			return string(r.Env)
		}
		bad = append(bad, p)
		return p
	})
	if len(bad) > 0 {
		return "", fmt.Errorf("d1: CN template %q has unknown placeholder %s; use {keyType}, {issuerId}, {env}", tmpl, bad[0])
	}
	if strings.ContainsAny(cn, "{}") {
		return "", fmt.Errorf("d1: CN template %q has an unbalanced brace", tmpl)
	}
	if len(cn) > 64 {
		return "", fmt.Errorf("d1: CN %q is longer than 64 characters", cn)
	}
	return cn, nil
}

// EnvOfCN returns the environment a D1 certificate's CN names, if it names
// exactly one of them as a '/'-separated field.
func EnvOfCN(cn string) (Env, bool) {
	var found []Env
	for _, part := range strings.Split(cn, "/") {
		switch strings.ToUpper(part) {
		case string(PreProd):
			found = append(found, PreProd)
		case string(Production):
			found = append(found, Production)
		}
	}
	if len(found) != 1 {
		return "", false
	}
	return found[0], true
}

// EnvOfLabel guesses the environment a key label refers to, when it names one
// as a word: "d1-ppr-mtls", "PRD_client".
func EnvOfLabel(label string) (Env, bool) {
	var found []Env
	for _, w := range labelWords(label) {
		if e, err := ParseEnv(w); err == nil {
			found = append(found, e)
		}
	}
	if len(found) != 1 {
		return "", false
	}
	return found[0], true
}

// InferEnv decides which D1 environment a command works in: the one given
// (flag or config) when there is one, else the one the certificate's CN
// names, else the one the key label names. It is an error when none does.
func InferEnv(given, certCN, keyLabel string) (Env, error) {
	if given != "" {
		return ParseEnv(given)
	}
	if e, ok := EnvOfCN(certCN); ok {
		return e, nil
	}
	if e, ok := EnvOfLabel(keyLabel); ok {
		return e, nil
	}
	return "", fmt.Errorf("d1: cannot tell PPR from PRD for key %q: pass --env", keyLabel)
}

// CheckImportEnv returns a warning when a certificate's CN names one
// environment and the key label the other (D1-G2), or "".
func CheckImportEnv(certCN, keyLabel string) string {
	certEnv, ok := EnvOfCN(certCN)
	if !ok {
		return ""
	}
	if keyEnv, ok := EnvOfLabel(keyLabel); ok && keyEnv != certEnv {
		return fmt.Sprintf("certificate CN %q names %s but key %q looks like a %s key; D1 environments must not share credentials (D1-G2)",
			certCN, certEnv, keyLabel, keyEnv)
	}
	return ""
}

// NewJWTID returns a random JWT id (jti): 16 bytes, hex-encoded.
func NewJWTID() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("d1: generating a JWT id: %w", err)
	}
	return hex.EncodeToString(b), nil
}
