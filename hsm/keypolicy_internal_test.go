package hsm

import (
	"maps"
	"slices"
	"testing"

	"github.com/ThalesGroup/crypto11"
)

// TestPolicyViolations feeds the read-back check what a token might report:
// GenerateKey deletes and refuses a key for which it lists anything.
func TestPolicyViolations(t *testing.T) {
	signOnly := map[crypto11.AttributeType]bool{
		crypto11.CkaSensitive: true, crypto11.CkaAlwaysSensitive: true, crypto11.CkaExtractable: false,
		crypto11.CkaNeverExtractable: true, crypto11.CkaPrivate: true, crypto11.CkaSign: true,
		crypto11.CkaDecrypt: false, crypto11.CkaUnwrap: false, crypto11.CkaDerive: false, crypto11.CkaSignRecover: false,
	}
	with := func(changes map[crypto11.AttributeType]bool, drop ...crypto11.AttributeType) map[crypto11.AttributeType]bool {
		m := maps.Clone(signOnly)
		maps.Copy(m, changes)
		for _, a := range drop {
			delete(m, a)
		}
		return m
	}
	verifyOnly := map[crypto11.AttributeType]bool{crypto11.CkaVerify: true, crypto11.CkaEncrypt: false, crypto11.CkaWrap: false}
	tests := []struct {
		name      string
		priv, pub map[crypto11.AttributeType]bool
		want      []string
	}{
		{"sign-only", signOnly, verifyOnly, nil},
		{"token without sign-recover", with(nil, crypto11.CkaSignRecover), verifyOnly, nil},
		{"SoftHSM's ECDSA defaults",
			with(map[crypto11.AttributeType]bool{crypto11.CkaDecrypt: true, crypto11.CkaUnwrap: true, crypto11.CkaSignRecover: true}),
			map[crypto11.AttributeType]bool{crypto11.CkaVerify: true, crypto11.CkaEncrypt: true, crypto11.CkaWrap: true},
			[]string{"CKA_DECRYPT should be false", "CKA_SIGN_RECOVER should be false", "CKA_UNWRAP should be false",
				"public key CKA_ENCRYPT should be false", "public key CKA_WRAP should be false"}},
		{"derive", with(map[crypto11.AttributeType]bool{crypto11.CkaDerive: true}), verifyOnly, []string{"CKA_DERIVE should be false"}},
		{"decrypt not reported", with(nil, crypto11.CkaDecrypt), verifyOnly, []string{"CKA_DECRYPT is not reported (should be false)"}},
		{"extractable", with(map[crypto11.AttributeType]bool{crypto11.CkaExtractable: true, crypto11.CkaNeverExtractable: false}), verifyOnly,
			[]string{"CKA_EXTRACTABLE should be false", "CKA_NEVER_EXTRACTABLE should be true"}},
		{"cannot sign", with(map[crypto11.AttributeType]bool{crypto11.CkaSign: false}), verifyOnly, []string{"CKA_SIGN should be true"}},
		{"public key cannot verify", signOnly, map[crypto11.AttributeType]bool{crypto11.CkaEncrypt: false, crypto11.CkaWrap: false},
			[]string{"public key CKA_VERIFY is not reported (should be true)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := append(policyViolations("", keyPolicy, tt.priv), policyViolations("public key ", publicKeyPolicy, tt.pub)...)
			slices.Sort(got)
			if !slices.Equal(got, tt.want) {
				t.Errorf("violations %q, want %q", got, tt.want)
			}
		})
	}
}
