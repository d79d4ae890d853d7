package worker

import (
	"bytes"
	"crypto"
	"crypto/rsa"
	"testing"
)

// FuzzParseSign: any sign request body the worker reads is refused or
// decoded into a request that encodes back to the same bytes.
func FuzzParseSign(f *testing.F) {
	for _, r := range []*signRequest{
		{Label: "ec", Hash: crypto.SHA256, Digest: make([]byte, 32)},
		{Label: "rsa", Hash: crypto.SHA512, PSS: true, SaltLength: rsa.PSSSaltLengthEqualsHash, Digest: make([]byte, 64)},
	} {
		f.Add(appendSign(nil, 1, r)[header:])
	}
	f.Add([]byte{})
	f.Add([]byte{255})
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := parseSign(body)
		if err != nil {
			return
		}
		if len(r.Digest) != r.Hash.Size() {
			t.Fatalf("decoded a %d-byte digest for %v", len(r.Digest), r.Hash)
		}
		if again := appendSign(nil, 1, r)[header:]; !bytes.Equal(again, body) {
			t.Fatalf("%x decodes to %+v, which encodes to %x", body, r, again)
		}
	})
}

// TestReadFrameBounds: a length past maxMessage or short of a header is
// refused before anything is allocated for it.
func TestReadFrameBounds(t *testing.T) {
	for _, n := range []uint32{0, header - 1, maxMessage + 1, 1<<32 - 1} {
		b := []byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
		if _, err := readFrame(bytes.NewReader(b), nil); err == nil {
			t.Errorf("a frame of %d bytes was not refused", n)
		}
	}
}
