package agent

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"math"
	"math/big"
	"strings"
	"testing"

	"github.com/hsmagent/hsmagent/agent/agentpb"
)

// TestSignRequest checks what the client puts on the wire, and what it
// refuses to send, without an agent.
func TestSignRequest(t *testing.T) {
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	// Only the modulus size matters here: a public key without its private half will do.
	rsaPub := func(bits int) *rsa.PublicKey {
		n := new(big.Int).Lsh(big.NewInt(1), uint(bits-1))
		return &rsa.PublicKey{N: n.Or(n, big.NewInt(1)), E: 65537}
	}
	r2048, r4096, r512 := rsaPub(2048), rsaPub(4096), rsaPub(512)
	pss := func(h crypto.Hash, salt int) *rsa.PSSOptions { return &rsa.PSSOptions{Hash: h, SaltLength: salt} }
	digest := func(h crypto.Hash) []byte { return make([]byte, h.Size()) }

	tests := []struct {
		name    string
		pub     crypto.PublicKey
		digest  []byte
		opts    crypto.SignerOpts
		padding agentpb.Padding
		salt    int32
		err     string
	}{
		{name: "ECDSA", pub: &ec.PublicKey, digest: digest(crypto.SHA256), opts: crypto.SHA256},
		{name: "ECDSA SHA-384", pub: &ec.PublicKey, digest: digest(crypto.SHA384), opts: crypto.SHA384},
		{name: "PKCS #1 v1.5", pub: r2048, digest: digest(crypto.SHA512), opts: crypto.SHA512, padding: agentpb.Padding_PADDING_PKCS1V15},
		{name: "PSS equals hash", pub: r2048, digest: digest(crypto.SHA256), opts: pss(crypto.SHA256, rsa.PSSSaltLengthEqualsHash), padding: agentpb.Padding_PADDING_PSS, salt: 0},
		{name: "PSS auto", pub: r2048, digest: digest(crypto.SHA256), opts: pss(crypto.SHA256, rsa.PSSSaltLengthAuto), padding: agentpb.Padding_PADDING_PSS, salt: 222},
		{name: "PSS auto SHA-512 RSA-4096", pub: r4096, digest: digest(crypto.SHA512), opts: pss(crypto.SHA512, rsa.PSSSaltLengthAuto), padding: agentpb.Padding_PADDING_PSS, salt: 446},
		{name: "PSS salt 1", pub: r2048, digest: digest(crypto.SHA256), opts: pss(crypto.SHA256, 1), padding: agentpb.Padding_PADDING_PSS, salt: 1},
		{name: "PSS salt at maximum", pub: r2048, digest: digest(crypto.SHA256), opts: pss(crypto.SHA256, 222), padding: agentpb.Padding_PADDING_PSS, salt: 222},

		{name: "PSS salt above maximum", pub: r2048, digest: digest(crypto.SHA256), opts: pss(crypto.SHA256, 223), err: `agent: key "k": PSS salt length 223 is outside 1..222`},
		{name: "PSS salt above maximum for SHA-512", pub: r2048, digest: digest(crypto.SHA512), opts: pss(crypto.SHA512, 191), err: "PSS salt length 191 is outside 1..190"},
		{name: "PSS salt 2^32+20", pub: r2048, digest: digest(crypto.SHA256), opts: pss(crypto.SHA256, 1<<32+20), err: "PSS salt length 4294967316 is outside 1..222"},
		{name: "PSS salt 2^31", pub: r4096, digest: digest(crypto.SHA256), opts: pss(crypto.SHA256, math.MaxInt32+1), err: "PSS salt length 2147483648 is outside 1..478"},
		{name: "PSS salt -2", pub: r2048, digest: digest(crypto.SHA256), opts: pss(crypto.SHA256, -2), err: "PSS salt length -2 is outside 1..222"},
		{name: "PSS salt min int", pub: r2048, digest: digest(crypto.SHA256), opts: pss(crypto.SHA256, math.MinInt), err: "is outside 1..222"},
		{name: "PSS key too small for the hash", pub: r512, digest: digest(crypto.SHA512), opts: pss(crypto.SHA512, rsa.PSSSaltLengthAuto), err: `agent: key "k": a 512-bit RSA key is too small for PSS with SHA-512`},
		{name: "PSS without hash", pub: r2048, digest: digest(crypto.SHA256), opts: &rsa.PSSOptions{SaltLength: 20}, err: `agent: key "k": hash unknown hash value 0 is not supported`},
		{name: "digest too short", pub: &ec.PublicKey, digest: make([]byte, 31), opts: crypto.SHA256, err: `agent: key "k": digest is 31 bytes, SHA-256 needs 32`},
		{name: "digest too long", pub: r2048, digest: make([]byte, 64), opts: crypto.SHA384, err: "digest is 64 bytes, SHA-384 needs 48"},
		{name: "empty digest", pub: r2048, digest: nil, opts: crypto.SHA256, err: "digest is 0 bytes, SHA-256 needs 32"},
		{name: "SHA-1", pub: &ec.PublicKey, digest: make([]byte, 20), opts: crypto.SHA1, err: `agent: key "k": hash SHA-1 is not supported; use SHA-256, SHA-384 or SHA-512`},
		{name: "SHA3-256", pub: &ec.PublicKey, digest: make([]byte, 32), opts: crypto.SHA3_256, err: "hash SHA3-256 is not supported"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := signRequest("k", tt.pub, tt.digest, tt.opts)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) || !strings.HasPrefix(err.Error(), "agent: ") {
					t.Fatalf("error %v, want one containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if req.Key != "k" || len(req.Digest) != len(tt.digest) || req.Padding != tt.padding || req.PssSaltLength != tt.salt {
				t.Errorf("request key %q, %d-byte digest, padding %v, salt %d; want padding %v, salt %d",
					req.Key, len(req.Digest), req.Padding, req.PssSaltLength, tt.padding, tt.salt)
			}
		})
	}
}
