// Package keytype names the key algorithms hsmagent generates and serves
// (ECDSA P-256/P-384, RSA 2048/3072/4096) and holds the facts about them that
// both ends of the socket and the HSM need. It has no cgo and no backend types.
package keytype

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"fmt"
	"slices"
	"strings"
)

// Type names a key algorithm and size as the CLI and the config spell it.
type Type string

// The supported key types.
const (
	ECDSAP256 Type = "ecdsa-p256"
	ECDSAP384 Type = "ecdsa-p384"
	RSA2048   Type = "rsa-2048"
	RSA3072   Type = "rsa-3072"
	RSA4096   Type = "rsa-4096"
)

// All lists the supported key types, strongest-preferred first.
var All = []Type{ECDSAP256, ECDSAP384, RSA2048, RSA3072, RSA4096}

// Parse checks s (in any case) against the supported key types.
func Parse(s string) (Type, error) {
	kt := Type(strings.ToLower(s))
	if slices.Contains(All, kt) {
		return kt, nil
	}
	names := make([]string, len(All))
	for i, k := range All {
		names[i] = string(k)
	}
	return "", fmt.Errorf("keytype: unsupported key type %q; use one of %s", s, strings.Join(names, ", "))
}

// Of names the type of a public key, or "" for a key hsmagent does not support.
func Of(pub crypto.PublicKey) Type {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return ECDSAP256
		case elliptic.P384():
			return ECDSAP384
		}
	case *rsa.PublicKey:
		switch k.N.BitLen() {
		case 2048:
			return RSA2048
		case 3072:
			return RSA3072
		case 4096:
			return RSA4096
		}
	}
	return ""
}

// IsRSA reports whether t is one of the RSA types.
func (t Type) IsRSA() bool { return strings.HasPrefix(string(t), "rsa-") }

// RSABits is the modulus size of an RSA type, 0 for the others.
func (t Type) RSABits() int {
	switch t {
	case RSA2048:
		return 2048
	case RSA3072:
		return 3072
	case RSA4096:
		return 4096
	}
	return 0
}

// Curve is the curve of an ECDSA type, nil for the others.
func (t Type) Curve() elliptic.Curve {
	switch t {
	case ECDSAP256:
		return elliptic.P256()
	case ECDSAP384:
		return elliptic.P384()
	}
	return nil
}

// MaxPSSSaltLength is the largest RSA-PSS salt a key of this size can carry
// with hash h: what Go's rsa package uses for rsa.PSSSaltLengthAuto.
func MaxPSSSaltLength(pub *rsa.PublicKey, h crypto.Hash) int {
	return (pub.N.BitLen()-1+7)/8 - 2 - h.Size()
}
