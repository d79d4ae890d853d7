package agent_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

// TestClientRefusesBadSignRequests signs through a real agent on a Unix
// socket. What the agent cannot honour (a salt that does not fit the wire or
// the key, a digest of the wrong length, a hash it does not offer) must fail
// in the client with an "agent:" error and never reach the agent, which
// audits every request it gets.
func TestClientRefusesBadSignRequests(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var audit bytes.Buffer
	sw := &syncWriter{w: &audit}
	audited := func() int {
		sw.mu.Lock()
		defer sw.mu.Unlock()
		return strings.Count(audit.String(), "msg=sign")
	}
	// Software keys: these tests are about what the client sends, not the HSM.
	store := server.NewMemoryStore()
	if err := store.Add("rsa", rsaKey, nil); err != nil {
		t.Fatal(err)
	}
	if err := store.Add("ec", ecKey, nil); err != nil {
		t.Fatal(err)
	}
	longLabel := strings.Repeat("l", 300) // a token may hold it; the agent takes 128 bytes at most
	if err := store.Add(longLabel, ecKey, nil); err != nil {
		t.Fatal(err)
	}
	a := agenttest.Start(t, store, server.Options{Audit: slog.New(slog.NewTextHandler(sw, nil))})
	c := dial(t, a.Socket)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rs, err := c.Signer(ctx, "rsa")
	if err != nil {
		t.Fatal(err)
	}
	ec, err := c.Signer(ctx, "ec")
	if err != nil {
		t.Fatal(err)
	}
	long, err := c.Signer(ctx, longLabel)
	if err != nil {
		t.Fatal(err)
	}
	d256 := sha256.Sum256([]byte("x"))
	d512 := sha512.Sum512([]byte("x"))
	maxSalt := 2048/8 - 2 - 32 // what the key allows with SHA-256

	tests := []struct {
		name   string
		signer crypto.Signer
		digest []byte
		opts   crypto.SignerOpts
		want   string // error text; "" for a signature
	}{
		{"salt above 2^32", rs, d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 1<<32 + 20}, "PSS salt length 4294967316 is outside 1..222"},
		{"salt above 2^31", rs, d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 1 << 31}, "PSS salt length 2147483648 is outside 1..222"},
		{"salt one above the key's maximum", rs, d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: maxSalt + 1}, "PSS salt length 223 is outside 1..222"},
		{"negative salt", rs, d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: -2}, "PSS salt length -2 is outside 1..222"},
		{"short digest", rs, d256[:31], crypto.SHA256, "digest is 31 bytes, SHA-256 needs 32"},
		{"digest of another hash", ec, d512[:], crypto.SHA256, "digest is 64 bytes, SHA-256 needs 32"},
		{"unsupported hash", ec, d256[:20], crypto.SHA1, "hash SHA-1 is not supported"},
		// 64 of them would make a message over the agent's size limit, which ends the stream.
		{"label longer than the agent takes", long, d256[:], crypto.SHA256, "key label of 300 bytes; the agent takes at most 128"},
		{"salt at the key's maximum", rs, d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: maxSalt}, ""},
		{"salt 20", rs, d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 20}, ""},
		{"salt auto", rs, d512[:], &rsa.PSSOptions{Hash: crypto.SHA512, SaltLength: rsa.PSSSaltLengthAuto}, ""},
		{"salt equals hash", rs, d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}, ""},
		{"ECDSA", ec, d256[:], crypto.SHA256, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := audited()
			sig, err := tt.signer.Sign(nil, tt.digest, tt.opts)
			// The agent audits a request before it answers it.
			requests := audited() - before
			if tt.want == "" {
				if err != nil {
					t.Fatalf("sign: %v", err)
				}
				if pss, ok := tt.opts.(*rsa.PSSOptions); ok {
					// Verify with the salt length the caller asked for, not auto-detected.
					want := pss.SaltLength
					if want == rsa.PSSSaltLengthAuto {
						want = 2048/8 - 2 - pss.Hash.Size()
					}
					if err := rsa.VerifyPSS(&rsaKey.PublicKey, pss.Hash, tt.digest, sig, &rsa.PSSOptions{SaltLength: want}); err != nil {
						t.Errorf("signature does not verify with salt length %d: %v", want, err)
					}
				}
				if requests != 1 {
					t.Errorf("the agent audited %d requests, want 1", requests)
				}
				return
			}
			if err == nil {
				t.Fatalf("signed (%d bytes); want an error with %q", len(sig), tt.want)
			}
			if !strings.HasPrefix(err.Error(), "agent: ") || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q, want one 'agent: ' line with %q", err, tt.want)
			}
			if requests != 0 {
				t.Errorf("the request reached the agent (%d audit records); the client should refuse it first", requests)
			}
		})
	}
}
