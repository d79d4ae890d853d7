package hsm

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync/atomic"

	"github.com/ThalesGroup/crypto11"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/miekg/pkcs11"
)

// KeyType names a key algorithm and size as the CLI and config spell it.
type KeyType = keytype.Type

// Key types that can be generated.
const (
	ECDSAP256 = keytype.ECDSAP256
	ECDSAP384 = keytype.ECDSAP384
	RSA2048   = keytype.RSA2048
	RSA3072   = keytype.RSA3072
	RSA4096   = keytype.RSA4096
)

// KeyTypes lists the supported key types, strongest-preferred first.
var KeyTypes = keytype.All

// ParseKeyType checks s against the supported key types.
func ParseKeyType(s string) (KeyType, error) {
	kt, err := keytype.Parse(s)
	if err != nil {
		return "", errors.New("hsm: " + strings.TrimPrefix(err.Error(), "keytype: "))
	}
	return kt, nil
}

// KeyTypeOf names the type of a public key, or "" for one hsmagent does not generate.
func KeyTypeOf(pub crypto.PublicKey) KeyType { return keytype.Of(pub) }

// Key describes a key pair on the token and the certificates stored with it.
type Key struct {
	Label  string           `json:"label"`
	ID     []byte           `json:"id"`
	Type   KeyType          `json:"type"`
	Public crypto.PublicKey `json:"-"`
	// Chain is the stored certificate chain, leaf first; empty when no
	// certificate has been imported.
	Chain []*x509.Certificate `json:"-"`
	// Usage is what the private half allows, as read from the token; filled
	// by GenerateKey and Keys.
	Usage Usage `json:"usage"`
}

const chainLabelSep = "/chain/"

func chainLabel(keyLabel string, i int) []byte {
	return fmt.Appendf(nil, "%s%s%d", keyLabel, chainLabelSep, i)
}

func checkLabel(label string) error {
	switch {
	case label == "":
		return errors.New("hsm: key label is empty")
	case strings.Contains(label, chainLabelSep):
		return fmt.Errorf("hsm: key label %q may not contain %q (reserved for stored chains)", label, chainLabelSep)
	case len(label) > 128:
		return fmt.Errorf("hsm: key label %q is longer than 128 bytes", label)
	}
	return nil
}

// GenerateKey creates a key pair inside the token. The private half is
// sensitive, never extractable, private to the logged-in user and may only
// sign (no decrypt, unwrap, derive or sign-recover); the public half may only
// verify. Both halves are read back after generation, and a key on which the
// token did not apply all of this (CKA_ALWAYS_SENSITIVE and
// CKA_NEVER_EXTRACTABLE included) is deleted and refused. An empty id gets a
// random 8-byte CKA_ID.
func (t *Token) GenerateKey(label string, kt KeyType, id []byte) (*Key, error) {
	if err := checkLabel(label); err != nil {
		return nil, err
	}
	if _, err := ParseKeyType(string(kt)); err != nil {
		return nil, err
	}
	if len(id) == 0 {
		id = make([]byte, 8)
		if _, err := io.ReadFull(rand.Reader, id); err != nil {
			return nil, fmt.Errorf("hsm: generating key id: %w", err)
		}
	}
	var out *Key
	err := t.do(func(ctx *crypto11.Context, _ uint64) error {
		existing, err := ctx.FindKeyPairs(nil, []byte(label))
		if err != nil {
			return fmt.Errorf("hsm: looking up label %q: %w", label, explain(err))
		}
		if len(existing) > 0 {
			return fmt.Errorf("hsm: a key labelled %q exists already; choose another label or delete it first", label)
		}
		if other, err := ctx.FindKeyPairs(id, nil); err == nil && len(other) > 0 {
			return fmt.Errorf("hsm: a key with id %x exists already", id)
		}
		pub, priv, err := keyTemplates(id, label)
		if err != nil {
			return err
		}
		var signer crypto11.Signer
		if kt.IsRSA() {
			signer, err = ctx.GenerateRSAKeyPairWithAttributes(pub, priv, kt.RSABits())
		} else {
			signer, err = ctx.GenerateECDSAKeyPairWithAttributes(pub, priv, kt.Curve())
		}
		if err != nil {
			return fmt.Errorf("hsm: generating %s key %q: %w", kt, label, explain(err))
		}
		usage, err := checkKeyPolicy(ctx, signer)
		if err != nil {
			_ = signer.Delete()
			return fmt.Errorf("hsm: key %q deleted again: %w", label, err)
		}
		out = &Key{Label: label, ID: id, Type: kt, Public: signer.Public(), Usage: usage}
		return nil
	})
	return out, err
}

func keyTemplates(id []byte, label string) (pub, priv crypto11.AttributeSet, err error) {
	pub, err = crypto11.NewAttributeSetWithIDAndLabel(id, []byte(label))
	if err != nil {
		return nil, nil, fmt.Errorf("hsm: key template: %w", err)
	}
	priv = pub.Copy()
	// Every usage is spelled out: tokens differ in their defaults (SoftHSM
	// lets an ECDSA private key decrypt and unwrap, and any key sign-recover).
	pub.AddIfNotPresent([]*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY_RECOVER, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	})
	priv.AddIfNotPresent([]*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN_RECOVER, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	})
	return pub, priv, nil
}

// keyPolicy is what the private half of a generated key must show when read
// back; optional attributes may be missing (a token without sign-recover for
// EC keys need not report it) but must have the value when present.
var keyPolicy = []policyRule{
	{attr: crypto11.CkaSensitive, want: true},
	{attr: crypto11.CkaAlwaysSensitive, want: true},
	{attr: crypto11.CkaExtractable, want: false},
	{attr: crypto11.CkaNeverExtractable, want: true},
	{attr: crypto11.CkaPrivate, want: true},
	{attr: crypto11.CkaSign, want: true},
	{attr: crypto11.CkaDecrypt, want: false},
	{attr: crypto11.CkaUnwrap, want: false},
	{attr: crypto11.CkaDerive, want: false},
	{attr: crypto11.CkaSignRecover, want: false, optional: true},
}

// publicKeyPolicy is checked on the public half: a public key that may
// encrypt or wrap would let the token accept data for a key meant to sign.
var publicKeyPolicy = []policyRule{
	{attr: crypto11.CkaVerify, want: true},
	{attr: crypto11.CkaEncrypt, want: false},
	{attr: crypto11.CkaWrap, want: false},
}

type policyRule struct {
	attr     crypto11.AttributeType
	want     bool
	optional bool
}

// checkKeyPolicy reads both halves of a new key pair back from the token and
// returns the private half's usage.
func checkKeyPolicy(ctx *crypto11.Context, key crypto11.Signer) (Usage, error) {
	// keyPolicy covers every attribute Usage reports.
	priv, err := readFlags(ctx, key, false, ruleAttrs(keyPolicy))
	if err != nil {
		return Usage{}, fmt.Errorf("reading key attributes back: %w", explain(err))
	}
	pub, err := readFlags(ctx, key, true, ruleAttrs(publicKeyPolicy))
	if err != nil {
		return Usage{}, fmt.Errorf("reading public key attributes back: %w", explain(err))
	}
	bad := append(policyViolations("", keyPolicy, priv), policyViolations("public key ", publicKeyPolicy, pub)...)
	if len(bad) > 0 {
		return Usage{}, fmt.Errorf("the token did not apply the key policy: %s", strings.Join(bad, ", "))
	}
	return usageFrom(priv), nil
}

func ruleAttrs(rules []policyRule) []crypto11.AttributeType {
	var out []crypto11.AttributeType
	for _, r := range rules {
		out = append(out, r.attr)
	}
	return out
}

// policyViolations lists, sorted, the rules that got does not meet.
func policyViolations(prefix string, rules []policyRule, got map[crypto11.AttributeType]bool) []string {
	var bad []string
	for _, r := range rules {
		v, ok := got[r.attr]
		switch {
		case !ok && !r.optional:
			bad = append(bad, fmt.Sprintf("%s%s is not reported (should be %t)", prefix, pkcs11AttrName(r.attr), r.want))
		case ok && v != r.want:
			bad = append(bad, fmt.Sprintf("%s%s should be %t", prefix, pkcs11AttrName(r.attr), r.want))
		}
	}
	sort.Strings(bad)
	return bad
}

// readFlags reads boolean attributes of a key pair's private (or public)
// half. An attribute the token does not know is left out of the map rather
// than failing the whole read.
func readFlags(ctx *crypto11.Context, key crypto11.Signer, public bool, attrs []crypto11.AttributeType) (map[crypto11.AttributeType]bool, error) {
	get := ctx.GetAttributes
	if public {
		get = ctx.GetPubAttributes
	}
	got, err := get(key, attrs)
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)) {
		// One unknown attribute fails C_GetAttributeValue for all: ask one by one.
		got, err = crypto11.NewAttributeSet(), nil
		for _, a := range attrs {
			one, oneErr := get(key, []crypto11.AttributeType{a})
			if errors.Is(oneErr, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)) {
				continue
			}
			if oneErr != nil {
				return nil, oneErr
			}
			got.AddIfNotPresent(one.ToSlice())
		}
	}
	if err != nil {
		return nil, err
	}
	out := make(map[crypto11.AttributeType]bool, len(got))
	for a, v := range got {
		if v != nil && len(v.Value) == 1 {
			out[a] = v.Value[0] != 0
		}
	}
	return out, nil
}

func pkcs11AttrName(a crypto11.AttributeType) string {
	switch a {
	case crypto11.CkaSensitive:
		return "CKA_SENSITIVE"
	case crypto11.CkaAlwaysSensitive:
		return "CKA_ALWAYS_SENSITIVE"
	case crypto11.CkaExtractable:
		return "CKA_EXTRACTABLE"
	case crypto11.CkaNeverExtractable:
		return "CKA_NEVER_EXTRACTABLE"
	case crypto11.CkaPrivate:
		return "CKA_PRIVATE"
	case crypto11.CkaSign:
		return "CKA_SIGN"
	case crypto11.CkaSignRecover:
		return "CKA_SIGN_RECOVER"
	case crypto11.CkaDecrypt:
		return "CKA_DECRYPT"
	case crypto11.CkaUnwrap:
		return "CKA_UNWRAP"
	case crypto11.CkaDerive:
		return "CKA_DERIVE"
	case crypto11.CkaVerify:
		return "CKA_VERIFY"
	case crypto11.CkaEncrypt:
		return "CKA_ENCRYPT"
	case crypto11.CkaWrap:
		return "CKA_WRAP"
	}
	return fmt.Sprintf("attribute 0x%x", uint(a))
}

// Keys lists the key pairs on the token with their stored chains, sorted by label.
func (t *Token) Keys() ([]*Key, error) {
	var out []*Key
	err := t.do(func(ctx *crypto11.Context, _ uint64) error {
		out = nil
		signers, err := ctx.FindAllKeyPairs()
		if err != nil {
			return fmt.Errorf("hsm: listing keys: %w", explain(err))
		}
		for _, s := range signers {
			attrs, err := ctx.GetAttributes(s, []crypto11.AttributeType{crypto11.CkaLabel, crypto11.CkaId})
			if err != nil {
				return fmt.Errorf("hsm: reading key attributes: %w", explain(err))
			}
			k := &Key{Public: s.Public(), Type: KeyTypeOf(s.Public())}
			if a := attrs[crypto11.CkaLabel]; a != nil {
				k.Label = string(a.Value)
			}
			if a := attrs[crypto11.CkaId]; a != nil {
				k.ID = a.Value
			}
			if k.Usage, err = keyUsage(ctx, s); err != nil {
				return fmt.Errorf("hsm: reading usage of key %q: %w", k.Label, err)
			}
			if k.Label != "" {
				if k.Chain, err = findChain(ctx, k.Label); err != nil {
					return err
				}
			}
			out = append(out, k)
		}
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Label < out[j].Label })
	return out, err
}

// Key returns the key labelled label with its stored chain.
func (t *Token) Key(label string) (*Key, error) {
	var out *Key
	err := t.do(func(ctx *crypto11.Context, _ uint64) error {
		s, id, err := t.findKeyPair(ctx, label)
		if err != nil {
			return err
		}
		chain, err := findChain(ctx, label)
		if err != nil {
			return err
		}
		out = &Key{Label: label, ID: id, Type: KeyTypeOf(s.Public()), Public: s.Public(), Chain: chain}
		return nil
	})
	return out, err
}

// findKeyPair finds exactly one key pair by label and returns it with its CKA_ID.
func (t *Token) findKeyPair(ctx *crypto11.Context, label string) (crypto11.Signer, []byte, error) {
	found, err := ctx.FindKeyPairs(nil, []byte(label))
	if err != nil {
		return nil, nil, fmt.Errorf("hsm: looking up key %q: %w", label, explain(err))
	}
	switch len(found) {
	case 0:
		return nil, nil, t.keyNotFound(ctx, label)
	case 1:
	default:
		return nil, nil, fmt.Errorf("hsm: %d keys are labelled %q; delete the extra ones with the token's tools", len(found), label)
	}
	attr, err := ctx.GetAttribute(found[0], crypto11.CkaId)
	if err != nil {
		return nil, nil, fmt.Errorf("hsm: reading id of key %q: %w", label, explain(err))
	}
	var id []byte
	if attr != nil {
		id = attr.Value
	}
	return found[0], id, nil
}

func (t *Token) keyNotFound(ctx *crypto11.Context, label string) error {
	e := &KeyNotFoundError{Label: label, Token: t.Label()}
	if all, err := ctx.FindAllKeyPairs(); err == nil {
		for _, s := range all {
			if a, err := ctx.GetAttribute(s, crypto11.CkaLabel); err == nil && a != nil {
				e.Present = append(e.Present, string(a.Value))
			}
		}
	}
	sort.Strings(e.Present)
	return e
}

// DeleteKey destroys the key pair labelled label and the certificates stored with it.
func (t *Token) DeleteKey(label string) error {
	return t.do(func(ctx *crypto11.Context, _ uint64) error {
		s, id, err := t.findKeyPair(ctx, label)
		if err != nil {
			return err
		}
		if err := deleteChain(ctx, label, id); err != nil {
			return err
		}
		if err := s.Delete(); err != nil {
			return fmt.Errorf("hsm: deleting key %q: %w", label, explain(err))
		}
		return nil
	})
}

// Signer returns a crypto.Signer for the key labelled label. Signatures are
// made inside the token; the signer survives a reopen of the token.
//
// RSA keys accept *rsa.PSSOptions and plain crypto.Hash (PKCS #1 v1.5) for
// SHA-256, SHA-384 and SHA-512; ECDSA keys return ASN.1 DER signatures.
func (t *Token) Signer(label string) (crypto.Signer, error) {
	s := &signer{token: t, label: label}
	err := t.do(func(ctx *crypto11.Context, gen uint64) error {
		k, id, err := t.findKeyPair(ctx, label)
		if err != nil {
			return err
		}
		s.public, s.id = k.Public(), id
		s.cached.Store(&cachedKey{key: k, generation: gen})
		return nil
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

type signer struct {
	token  *Token
	label  string
	public crypto.PublicKey // what the signer was made for, and advertises
	id     []byte           // CKA_ID of that key
	cached atomic.Pointer[cachedKey]
}

type cachedKey struct {
	key        crypto.Signer
	generation uint64
}

var _ crypto.Signer = (*signer)(nil)

func (s *signer) Public() crypto.PublicKey { return s.public }

func (s *signer) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	var sig []byte
	err := s.token.do(func(ctx *crypto11.Context, gen uint64) error {
		c := s.cached.Load()
		if c.generation != gen {
			// Handles from before a reopen are meaningless to the new session.
			k, id, err := s.token.findKeyPair(ctx, s.label)
			if err != nil {
				return err
			}
			// The label may now name another key (deleted and generated
			// again): signing with it would not match what we advertise.
			if err := s.sameKey(k.Public(), id); err != nil {
				return err
			}
			c = &cachedKey{key: k, generation: gen}
			s.cached.Store(c)
		}
		var err error
		if sig, err = c.key.Sign(r, digest, pssAutoToExplicit(s.public, opts)); err != nil {
			// Named here, where it is the module's: the token's own errors
			// (outage, key not found or replaced) already say which key and why.
			return fmt.Errorf("hsm: signing with key %q: %w", s.label, explain(err))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return sig, nil
}

// sameKey checks a key found again under the signer's label against the one
// the signer was made for.
func (s *signer) sameKey(pub crypto.PublicKey, id []byte) error {
	eq, ok := s.public.(interface{ Equal(crypto.PublicKey) bool })
	switch {
	case !ok || !eq.Equal(pub):
		return &KeyChangedError{Label: s.label, Token: s.token.Label(), What: "public key differs"}
	case !bytes.Equal(s.id, id):
		return &KeyChangedError{Label: s.label, Token: s.token.Label(), What: "CKA_ID differs"}
	}
	return nil
}

// pssAutoToExplicit replaces rsa.PSSSaltLengthAuto, which crypto11 refuses,
// with the largest salt the key allows: what Go's own rsa package signs with.
func pssAutoToExplicit(pub crypto.PublicKey, opts crypto.SignerOpts) crypto.SignerOpts {
	pss, ok := opts.(*rsa.PSSOptions)
	rsaPub, isRSA := pub.(*rsa.PublicKey)
	if !ok || !isRSA || pss.SaltLength != rsa.PSSSaltLengthAuto {
		return opts
	}
	return &rsa.PSSOptions{Hash: pss.Hash, SaltLength: keytype.MaxPSSSaltLength(rsaPub, pss.Hash)}
}
