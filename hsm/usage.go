package hsm

import (
	"fmt"
	"strings"

	"github.com/ThalesGroup/crypto11"
)

// Usage is what the private half of a key pair allows and how it is
// protected, as the token reports it. An attribute the token does not report
// reads as false.
type Usage struct {
	Sign        bool `json:"sign"`
	SignRecover bool `json:"signRecover"`
	Decrypt     bool `json:"decrypt"`
	Unwrap      bool `json:"unwrap"`
	Derive      bool `json:"derive"`

	Sensitive        bool `json:"sensitive"`
	Extractable      bool `json:"extractable"`
	AlwaysSensitive  bool `json:"alwaysSensitive"`
	NeverExtractable bool `json:"neverExtractable"`
}

// usageAttrs are the attributes a Usage is read from.
var usageAttrs = []crypto11.AttributeType{
	crypto11.CkaSign, crypto11.CkaSignRecover, crypto11.CkaDecrypt, crypto11.CkaUnwrap, crypto11.CkaDerive,
	crypto11.CkaSensitive, crypto11.CkaExtractable, crypto11.CkaAlwaysSensitive, crypto11.CkaNeverExtractable,
}

func usageFrom(f map[crypto11.AttributeType]bool) Usage {
	return Usage{
		Sign:             f[crypto11.CkaSign],
		SignRecover:      f[crypto11.CkaSignRecover],
		Decrypt:          f[crypto11.CkaDecrypt],
		Unwrap:           f[crypto11.CkaUnwrap],
		Derive:           f[crypto11.CkaDerive],
		Sensitive:        f[crypto11.CkaSensitive],
		Extractable:      f[crypto11.CkaExtractable],
		AlwaysSensitive:  f[crypto11.CkaAlwaysSensitive],
		NeverExtractable: f[crypto11.CkaNeverExtractable],
	}
}

// operations lists what the key may be used for, signing first.
func (u Usage) operations() []string {
	var ops []string
	for _, op := range []struct {
		name string
		on   bool
	}{{"sign", u.Sign}, {"sign-recover", u.SignRecover}, {"decrypt", u.Decrypt}, {"unwrap", u.Unwrap}, {"derive", u.Derive}} {
		if op.on {
			ops = append(ops, op.name)
		}
	}
	return ops
}

// String lists the allowed operations, e.g. "sign" or "sign,decrypt,unwrap";
// "none" when the key allows none.
func (u Usage) String() string {
	ops := u.operations()
	if len(ops) == 0 {
		return "none"
	}
	return strings.Join(ops, ",")
}

// SignOnly reports whether the key may sign and do nothing else.
func (u Usage) SignOnly() bool {
	return u.Sign && !u.SignRecover && !u.Decrypt && !u.Unwrap && !u.Derive
}

// Problems lists what departs from the policy GenerateKey applies: each
// operation besides signing, then a private value that is or once was
// readable ("not sensitive", "extractable", "once not sensitive", "once
// extractable"). Empty for a key hsmagent generated.
func (u Usage) Problems() []string {
	var out []string
	for _, op := range u.operations() {
		if op != "sign" {
			out = append(out, op)
		}
	}
	switch {
	case !u.Sensitive:
		out = append(out, "not sensitive")
	case !u.AlwaysSensitive:
		out = append(out, "once not sensitive")
	}
	switch {
	case u.Extractable:
		out = append(out, "extractable")
	case !u.NeverExtractable:
		out = append(out, "once extractable")
	}
	return out
}

// KeyUsage reads what the key labelled label allows, from the token.
func (t *Token) KeyUsage(label string) (Usage, error) {
	var out Usage
	err := t.do(func(ctx *crypto11.Context, _ uint64) error {
		s, _, err := t.findKeyPair(ctx, label)
		if err != nil {
			return err
		}
		if out, err = keyUsage(ctx, s); err != nil {
			return fmt.Errorf("hsm: reading usage of key %q: %w", label, err)
		}
		return nil
	})
	return out, err
}

func keyUsage(ctx *crypto11.Context, key crypto11.Signer) (Usage, error) {
	f, err := readFlags(ctx, key, false, usageAttrs)
	if err != nil {
		return Usage{}, explain(err)
	}
	return usageFrom(f), nil
}
