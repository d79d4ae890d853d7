package d1

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/hsmagent/hsmagent/agent/keytype"
)

// Key is a key pair on the token, as the key checks see it.
type Key struct {
	Label  string
	ID     []byte       // CKA_ID
	Type   keytype.Type // "" for a type hsmagent does not generate
	Public crypto.PublicKey
	// CanSign and PolicyProblems are what the token reports of the private
	// half: whether it may sign, and what departs from hsmagent's key policy
	// ("decrypt", "extractable", "once not sensitive"...).
	CanSign        bool
	PolicyProblems []string
	Chain          []*x509.Certificate // as stored, leaf first
}

// Chains orders and dates a stored chain the way certificate import does
// (hsm.SortChain, hsm.ChainWarnings), so that doctor and import agree;
// package hsm itself needs cgo, which this package does without.
type Chains interface {
	// Sort returns the chain leaf first, each certificate followed by its
	// issuer, or why the certificates do not link.
	Sort(leafKey crypto.PublicKey, certs []*x509.Certificate) ([]*x509.Certificate, error)
	// Warnings is an error for a certificate invalid at now, and a warning
	// for each that expires within 30 days.
	Warnings(chain []*x509.Certificate, now time.Time) ([]string, error)
}

// CheckKeys checks the keys of each environment PlanKeys finds: the mTLS
// client keys with their certificates (D1-C2, D1-K1, D1-G2), and the JWT key
// the settings name (D1-C8).
func CheckKeys(keys []Key, settings map[Env]*Settings, chains Chains, now time.Time) []Finding {
	byLabel := map[string]*Key{}
	labels := make([]string, len(keys))
	for i := range keys {
		byLabel[keys[i].Label], labels[i] = &keys[i], keys[i].Label
	}
	plans := PlanKeys(settings, labels)
	if len(plans) == 0 {
		return []Finding{warned(KeysCheck, "", "no D1 environment: no d1 section in the config and no key label naming PPR or PRD",
			"follow the D1 onboarding runbook: hsmagent keys generate --label d1-ppr-mtls --type ecdsa-p256")}
	}
	kc := &keyChecks{chains: chains, now: now}
	for _, env := range Envs {
		if p := plans[env]; p != nil {
			kc.env(env, p, byLabel)
		}
	}
	return kc.out
}

// keyChecks collects the findings of CheckKeys.
type keyChecks struct {
	chains Chains
	now    time.Time
	out    []Finding
}

func (kc *keyChecks) add(f Finding) { kc.out = append(kc.out, f) }

func (kc *keyChecks) env(env Env, p *KeyPlan, byLabel map[string]*Key) {
	if len(p.MTLS) == 0 {
		f := failed(KeyCheck, env, fmt.Sprintf("no mTLS client key for %s", env),
			fmt.Sprintf("hsmagent keys generate --label d1-%s-mtls --type ecdsa-p256, then the runbook (CSR, Thales, import); or name the key in d1.%s.key", strings.ToLower(string(env)), env))
		if p.Settings == nil {
			// Only a server, JWT or OAuth key names this environment and no
			// settings ask for it: maybe a host for the inbound side only.
			f.Status = Warn
		}
		kc.add(f)
	}
	for _, label := range p.MTLS {
		kc.clientKey(env, p.Settings, label, byLabel[label])
	}
	if p.Settings != nil && p.Settings.JWT.Key != "" {
		kc.jwtKey(env, p.Settings.JWT.Key, byLabel[p.Settings.JWT.Key])
	}
}

func (kc *keyChecks) clientKey(env Env, s *Settings, label string, k *Key) {
	if k == nil {
		kc.add(failed(KeyCheck, env, fmt.Sprintf("no key %q on the token", label),
			fmt.Sprintf("generate it (hsmagent keys generate --label %s --type ecdsa-p256) or correct d1.%s.key", label, env)))
		return
	}
	if labelEnv, ok := EnvOfLabel(label); ok && labelEnv != env {
		kc.add(failed(KeyCheck, env, fmt.Sprintf("%q is named for %s but configured for %s", label, labelEnv, env),
			fmt.Sprintf("use a key of its own for %s (D1-G2): correct d1.%s.key", env, env)))
		return
	}
	policy := keyPolicy(KeyCheck, env, k, func(pub crypto.PublicKey) error { _, err := CNKeyType(pub); return err })
	kc.add(policy)
	if policy.Status != Pass || !kc.certificate(env, k) {
		return
	}
	var issuerID string
	if s != nil {
		issuerID = s.JWT.IssuerID
	}
	kc.chain(env, k)
	kc.add(checkCN(env, label, k.Chain[0].Subject.CommonName, k.Public, issuerID))
	kc.expiry(env, k.Chain)
}

const fixRegenerate = "generate a new key inside the HSM with 'hsmagent keys generate' (D1-K1): a key that was once readable cannot be made safe"

// keyPolicy checks the key's type with typeOK, then that it may only sign
// and was never readable (D1-K1).
func keyPolicy(check Check, env Env, k *Key, typeOK func(crypto.PublicKey) error) Finding {
	if err := typeOK(k.Public); err != nil {
		return failed(check, env, fmt.Sprintf("%q: %v", k.Label, err), "generate an ecdsa-p256 key (rsa-4096 is accepted for mTLS, D1-C2) and repeat the runbook")
	}
	problems := k.PolicyProblems
	if !k.CanSign {
		problems = append([]string{"cannot sign"}, problems...)
	}
	if len(problems) > 0 {
		return failed(check, env, fmt.Sprintf("%q (%s) departs from the D1 key policy: %s", k.Label, k.Type, strings.Join(problems, ", ")), fixRegenerate)
	}
	return passed(check, env, "%q: %s, sign only, sensitive, never extractable", k.Label, k.Type)
}

// certificate checks that the key has a certificate of its own; false when not.
func (kc *keyChecks) certificate(env Env, k *Key) bool {
	if len(k.Chain) == 0 {
		kc.add(failed(CertificateCheck, env, fmt.Sprintf("key %q has no certificate", k.Label),
			fmt.Sprintf("send a CSR to Thales (hsmagent csr --key %s --profile d1 --env %s ...) and import what they return: hsmagent cert import --key %s --cert FILE --chain FILE", k.Label, env, k.Label)))
		return false
	}
	leaf := k.Chain[0]
	if !samePublicKey(leaf.PublicKey, k.Public) {
		kc.add(failed(CertificateCheck, env, fmt.Sprintf("the certificate stored with %q (%q) is for another key", k.Label, leaf.Subject.CommonName),
			fmt.Sprintf("import the certificate Thales issued for this key's CSR: hsmagent cert import --key %s --cert FILE", k.Label)))
		return false
	}
	kc.add(passed(CertificateCheck, env, "%q matches key %q, issued by %q", leaf.Subject.CommonName, k.Label, leaf.Issuer.CommonName))
	return true
}

func (kc *keyChecks) chain(env Env, k *Key) {
	fix := fmt.Sprintf("re-import the certificate with the chain Thales sent: hsmagent cert import --key %s --cert FILE --chain FILE", k.Label)
	sorted, err := kc.chains.Sort(k.Public, k.Chain)
	if err != nil {
		kc.add(failed(ChainCheck, env, err.Error(), fix))
		return
	}
	for i := range sorted {
		if sorted[i] != k.Chain[i] {
			kc.add(warned(ChainCheck, env, "the stored chain is out of order (leaf, then each issuer)", fix))
			return
		}
	}
	names := make([]string, len(sorted))
	for i, c := range sorted {
		names[i] = strconv.Quote(c.Subject.CommonName)
	}
	top := sorted[len(sorted)-1]
	kc.add(passed(ChainCheck, env, "%s, top issued by %q", strings.Join(names, " <- "), top.Issuer.CommonName))
}

func (kc *keyChecks) expiry(env Env, chain []*x509.Certificate) {
	const fix = "renew: a new CSR (hsmagent csr --profile d1), signed by Thales, imported with hsmagent cert import"
	warnings, err := kc.chains.Warnings(chain, kc.now)
	switch {
	case err != nil:
		kc.add(failed(ExpiryCheck, env, err.Error(), fix))
	case len(warnings) > 0:
		kc.add(warned(ExpiryCheck, env, strings.Join(warnings, "; "), fix))
	default:
		na := chain[0].NotAfter
		kc.add(passed(ExpiryCheck, env, "valid until %s (%d days)", na.UTC().Format(time.DateOnly), int(na.Sub(kc.now)/(24*time.Hour))))
	}
}

func (kc *keyChecks) jwtKey(env Env, label string, k *Key) {
	if k == nil {
		kc.add(failed(JWTKeyCheck, env, fmt.Sprintf("no key %q on the token", label),
			fmt.Sprintf("generate it (hsmagent keys generate --label %s --type ecdsa-p256), register its public key with D1, or correct d1.%s.jwt.key", label, env)))
		return
	}
	kc.add(keyPolicy(JWTKeyCheck, env, k, func(pub crypto.PublicKey) error {
		if keytype.Of(pub) != keytype.ECDSAP256 {
			return errors.New("D1 takes ES256 assertions only (D1-C8): the JWT key must be ecdsa-p256")
		}
		return nil
	}))
}

func samePublicKey(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}
