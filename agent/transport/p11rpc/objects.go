package p11rpc

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"fmt"
	"math/big"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
)

// object is one PKCS#11 object of a caller's view of the token.
type object struct {
	class uint64
	label string // the agent's key label: what C_Sign asks the core for
	attrs []Attribute
	key   *keyInfo // the key's facts, for the key objects
}

// keyInfo is what signing needs to know of a key.
type keyInfo struct {
	rsa     bool
	sigSize int    // bytes of a signature: the modulus, or r||s
	keyID   []byte // wire.KeyID: a handle signs with its key only
}

func (o *object) attr(t uint32) (Attribute, bool) {
	for _, a := range o.attrs {
		if a.Type == t {
			return a, true
		}
	}
	return Attribute{}, false
}

// sensitive are the attributes of a private key that exist but are never
// given out.
func sensitive(class uint64, t uint32) bool {
	if class != ckoPrivateKey {
		return false
	}
	switch t {
	case ckaValue, ckaPrivateExponent, ckaPrime1, ckaPrime2, ckaExponent1, ckaExponent2, ckaCoefficient:
		return true
	}
	return false
}

// matches reports whether o has every attribute of template with its value.
func (o *object) matches(template []Attribute) bool {
	for _, t := range template {
		if t.Unavailable || t.Nested != nil {
			return false
		}
		a, ok := o.attr(t.Type)
		if !ok || !bytes.Equal(a.Value, t.Value) {
			return false
		}
	}
	return true
}

// identity names an object across listings: the same identity keeps its
// handle on a connection, a key or certificate that changed gets another.
func (o *object) identity() string {
	h := sha256.New()
	fmt.Fprintf(h, "%d\x00%s\x00", o.class, o.label)
	for _, a := range o.attrs {
		if a.Type == ckaValue || a.Type == ckaPublicKeyInfo || a.Type == ckaID {
			h.Write(a.Value)
		}
	}
	return string(h.Sum(nil))
}

// objectsOf are the objects of one key of the caller's listing: its
// private and public key, its certificate and the certificates of its
// chain. A key whose public key the agent cannot read is left out.
func objectsOf(k *agentpb.Key) ([]*object, error) {
	pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("p11rpc: key %q: %w", k.Label, err)
	}
	common := func(class uint64) []Attribute {
		return []Attribute{ulongAttr(ckaClass, class), boolAttr(ckaToken, true), boolAttr(ckaPrivate, false),
			boolAttr(ckaModifiable, false), boolAttr(ckaCopyable, false), bytesAttr(ckaDestroyable, []byte{0}),
			bytesAttr(ckaLabel, []byte(k.Label)), bytesAttr(ckaID, k.Id)}
	}
	var subject []byte
	var leaf *x509.Certificate
	if len(k.CertificateChain) > 0 {
		if leaf, err = x509.ParseCertificate(k.CertificateChain[0]); err == nil {
			subject = leaf.RawSubject
		}
	}
	var keyAttrs []Attribute
	info := &keyInfo{keyID: wire.KeyID(k.PublicKey)}
	switch p := pub.(type) {
	case *ecdsa.PublicKey:
		params, point, err := ecAttrs(p)
		if err != nil {
			return nil, fmt.Errorf("p11rpc: key %q: %w", k.Label, err)
		}
		keyAttrs = []Attribute{ulongAttr(ckaKeyType, ckkEC), bytesAttr(ckaECParams, params), bytesAttr(ckaECPoint, point)}
		info.sigSize = 2 * ((p.Curve.Params().BitSize + 7) / 8)
	case *rsa.PublicKey:
		keyAttrs = []Attribute{ulongAttr(ckaKeyType, ckkRSA), bytesAttr(ckaModulus, p.N.Bytes()),
			ulongAttr(ckaModulusBits, uint64(p.N.BitLen())), bytesAttr(ckaPublicExponent, big.NewInt(int64(p.E)).Bytes())}
		info.rsa, info.sigSize = true, p.Size()
	default:
		return nil, fmt.Errorf("p11rpc: key %q: public key of type %T", k.Label, pub)
	}
	keyAttrs = append(keyAttrs, bytesAttr(ckaSubject, subject), bytesAttr(ckaPublicKeyInfo, k.PublicKey))

	priv := &object{class: ckoPrivateKey, label: k.Label, key: info}
	priv.attrs = append(append(common(ckoPrivateKey), keyAttrs...),
		boolAttr(ckaSign, true), boolAttr(ckaSignRecover, false), boolAttr(ckaDecrypt, false),
		boolAttr(ckaUnwrap, false), boolAttr(ckaDerive, false), boolAttr(ckaSensitive, true),
		boolAttr(ckaAlwaysSensitive, true), boolAttr(ckaExtractable, false), boolAttr(ckaNeverExtractable, true),
		boolAttr(ckaAlwaysAuthenticate, false), boolAttr(ckaWrapWithTrusted, false))
	pubObj := &object{class: ckoPublicKey, label: k.Label, key: info}
	pubObj.attrs = append(append(common(ckoPublicKey), keyAttrs...),
		boolAttr(ckaVerify, true), boolAttr(ckaVerifyRecover, false), boolAttr(ckaEncrypt, false),
		boolAttr(ckaWrap, false), boolAttr(ckaDerive, false), boolAttr(ckaTrusted, false))
	objs := []*object{priv, pubObj}
	for i, der := range k.CertificateChain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			continue // the core checked the chain; a certificate Go cannot read is not shown
		}
		o := &object{class: ckoCertificate, label: k.Label}
		o.attrs = common(ckoCertificate)
		category := uint64(1) // token user: the key's own certificate
		if i > 0 {
			// The chain's certificates are not the key's: another label and
			// no CKA_ID, so that no client pairs them with the key.
			o.attrs[6] = bytesAttr(ckaLabel, fmt.Appendf(nil, "%s chain %d", k.Label, i))
			o.attrs[7] = bytesAttr(ckaID, nil)
			category = 2 // authority
		}
		serial, _ := asn1.Marshal(c.SerialNumber)
		o.attrs = append(o.attrs, ulongAttr(ckaCertificateType, ckcX509), ulongAttr(ckaCertificateCategory, category),
			boolAttr(ckaTrusted, false), bytesAttr(ckaValue, der), bytesAttr(ckaSubject, c.RawSubject),
			bytesAttr(ckaIssuer, c.RawIssuer), bytesAttr(ckaSerialNumber, serial),
			bytesAttr(ckaPublicKeyInfo, c.RawSubjectPublicKeyInfo))
		objs = append(objs, o)
	}
	return objs, nil
}

// ecAttrs are CKA_EC_PARAMS (the curve's OID) and CKA_EC_POINT (the
// uncompressed point in an OCTET STRING) of p.
func ecAttrs(p *ecdsa.PublicKey) (params, point []byte, err error) {
	var oid asn1.ObjectIdentifier
	switch p.Curve {
	case elliptic.P256():
		oid = asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}
	case elliptic.P384():
		oid = asn1.ObjectIdentifier{1, 3, 132, 0, 34}
	case elliptic.P521():
		oid = asn1.ObjectIdentifier{1, 3, 132, 0, 35}
	default:
		return nil, nil, fmt.Errorf("curve %s", p.Curve.Params().Name)
	}
	if params, err = asn1.Marshal(oid); err != nil {
		return nil, nil, err
	}
	raw, err := p.Bytes()
	if err != nil {
		return nil, nil, err
	}
	point, err = asn1.Marshal(raw)
	return params, point, err
}
