package d1

import (
	"crypto"
	"errors"
	"io"
	"testing"
	"time"
)

// TestBearerFieldError: every JWTBearer that cannot make an assertion D1
// accepts says so with a *BearerFieldError naming the field, before signing.
func TestBearerFieldError(t *testing.T) {
	good := JWTBearer{Signer: newP256(t), KeyID: "kid-1", IssuerID: "ABCDEFGHIJ", TokenURL: "https://d1.example/authz/v1/oauth2/token"}
	tests := []struct {
		field  string
		change func(*JWTBearer)
	}{
		{"Signer", func(j *JWTBearer) { j.Signer = nil }},
		{"Signer", func(j *JWTBearer) { j.Signer = rsaSigner{} }},
		{"KeyID", func(j *JWTBearer) { j.KeyID = "" }},
		{"TokenURL", func(j *JWTBearer) { j.TokenURL = "" }},
		{"TokenURL", func(j *JWTBearer) { j.TokenURL = "d1.example/token" }},
		{"Lifetime", func(j *JWTBearer) { j.Lifetime = 16 * time.Minute }},
		{"IssuerID", func(j *JWTBearer) { j.IssuerID = "" }},
		{"IssuerID", func(j *JWTBearer) { j.IssuerID = "a b" }},
	}
	if _, err := good.Assertion(); err != nil {
		t.Fatalf("good bearer: %v", err)
	}
	for _, tt := range tests {
		j := good
		tt.change(&j)
		_, err := j.Assertion()
		var fe *BearerFieldError
		if !errors.As(err, &fe) || fe.Field != tt.field || fe.Error() != fe.Err.Error() {
			t.Errorf("%s: %v (%T)", tt.field, err, err)
		}
	}
}

// rsaSigner is an RSA key's public half behind a crypto.Signer that never signs.
type rsaSigner struct{}

func (rsaSigner) Public() crypto.PublicKey { return rsa4096 }
func (rsaSigner) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, errors.New("not for signing")
}
