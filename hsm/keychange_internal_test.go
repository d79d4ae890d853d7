package hsm

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"strings"
	"testing"
)

// TestSignerSameKey: a key found again under the signer's label is accepted
// only if both its public key and its CKA_ID are the ones the signer was made for.
func TestSignerSameKey(t *testing.T) {
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	mine, other := newKey(), newKey()
	s := &signer{token: &Token{cfg: Config{TokenLabel: "tok"}}, label: "tls", public: mine.Public(), id: []byte{1, 2}}
	tests := []struct {
		name string
		pub  *ecdsa.PublicKey
		id   []byte
		want string // "" for no error
	}{
		{"same key", &mine.PublicKey, []byte{1, 2}, ""},
		{"same key, copied", &ecdsa.PublicKey{Curve: elliptic.P256(), X: mine.X, Y: mine.Y}, []byte{1, 2}, ""},
		{"new key, same id", &other.PublicKey, []byte{1, 2}, "public key differs"},
		{"new key, new id", &other.PublicKey, []byte{3}, "public key differs"},
		{"same key, new id", &mine.PublicKey, []byte{3}, "CKA_ID differs"},
		{"same key, no id", &mine.PublicKey, nil, "CKA_ID differs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.sameKey(tt.pub, tt.id)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrKeyChanged) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want ErrKeyChanged saying %q", err, tt.want)
			}
			var kc interface{ KeyChanged() bool }
			if !errors.As(err, &kc) || !kc.KeyChanged() {
				t.Error("error does not implement KeyChanged() true (the agent's contract)")
			}
			if want := `hsm: the key labelled "tls" was replaced on token "tok"`; !strings.HasPrefix(err.Error(), want) {
				t.Errorf("message %q does not start with %q", err, want)
			}
		})
	}
}
