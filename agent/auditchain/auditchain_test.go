package auditchain_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/auditchain"
)

// trail writes lines as the agent does: each with the hash of the one
// before, a checkpoint after every fourth record signed with key.
func trail(t *testing.T, key crypto.Signer, n int) [][]byte {
	t.Helper()
	var lines [][]byte
	prev := ""
	for i := 1; i <= n; i++ {
		at := time.Date(2026, 12, 2, 10, 0, i, 0, time.UTC)
		rec := map[string]any{"time": at, "msg": "sign", "seq": i, "prev": prev, "key": "k"}
		if i%5 == 0 { // a checkpoint of the record before
			var last map[string]any
			json.Unmarshal(lines[len(lines)-1], &last)
			seq := uint64(last["seq"].(float64))
			sig, err := key.Sign(rand.Reader, auditchain.CheckpointDigest(prev, seq), crypto.SHA256)
			if err != nil {
				t.Fatal(err)
			}
			rec = map[string]any{"time": at, "msg": auditchain.CheckpointMsg, "seq": i, "prev": prev, "covers_seq": seq,
				"covers": prev, "sig": base64.StdEncoding.EncodeToString(sig)}
		}
		b, _ := json.Marshal(rec)
		b = append(b, '\n')
		lines = append(lines, b)
		prev = auditchain.LineHash(b)
	}
	return lines
}

func write(t *testing.T, lines [][]byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	if err := os.WriteFile(path, bytes.Join(lines, nil), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestVerify(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	good := trail(t, key, 12) // checkpoints at lines 5 and 10
	for _, tc := range []struct {
		name     string
		tamper   func([][]byte) [][]byte
		pub      crypto.PublicKey
		badLine  int    // 0: verifies
		why      string // in the break
		covered  int    // records after the last checkpoint
		midChain bool
	}{
		// The checkpoint at line 10 covers the records up to line 9.
		{name: "intact", tamper: func(l [][]byte) [][]byte { return l }, covered: 3},
		{name: "edited", tamper: func(l [][]byte) [][]byte {
			l[2] = bytes.Replace(l[2], []byte(`"key":"k"`), []byte(`"key":"x"`), 1)
			return l
		}, badLine: 4, why: "prev is not the hash"}, // the line after the edit
		{name: "deleted", tamper: func(l [][]byte) [][]byte { return append(l[:3:3], l[4:]...) }, badLine: 4, why: "prev is not the hash"},
		{name: "inserted", tamper: func(l [][]byte) [][]byte {
			return append(l[:3:3], append([][]byte{[]byte(`{"msg":"sign","seq":99,"prev":"` + auditchain.LineHash(l[2]) + `"}` + "\n")}, l[3:]...)...)
		}, badLine: 5, why: "prev is not the hash"},
		{name: "reordered", tamper: func(l [][]byte) [][]byte { l[6], l[7] = l[7], l[6]; return l }, badLine: 7, why: "prev is not the hash"},
		{name: "another key", tamper: func(l [][]byte) [][]byte { return l }, pub: &other.PublicKey, badLine: 5, why: "signature does not verify"},
		{name: "cut short", tamper: func(l [][]byte) [][]byte { l[11] = l[11][:len(l[11])-4]; return l }, badLine: 12, why: "cut short"},
		{name: "tail removed past the last checkpoint", tamper: func(l [][]byte) [][]byte { return l[:11] }, covered: 2},
		{name: "older file missing", tamper: func(l [][]byte) [][]byte { return l[5:] }, covered: 3, midChain: true},
		{name: "not JSON", tamper: func(l [][]byte) [][]byte { l[1] = []byte("hello\n"); return l }, badLine: 2, why: "not a JSON record"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lines := tc.tamper(append([][]byte(nil), good...))
			pub := tc.pub
			if pub == nil {
				pub = &key.PublicKey
			}
			r, err := auditchain.Verify([]string{write(t, lines)}, pub)
			var b *auditchain.Break
			if tc.badLine == 0 {
				if err != nil || r.Uncovered != tc.covered || r.MidChain != tc.midChain {
					t.Fatalf("Verify: %+v, %v; want no break, %d uncovered, mid-chain %v", r, err, tc.covered, tc.midChain)
				}
				return
			}
			if !errors.As(err, &b) || b.Line != tc.badLine || !strings.Contains(b.Why, tc.why) {
				t.Fatalf("Verify: %v; want a break at line %d: %s", err, tc.badLine, tc.why)
			}
		})
	}
}

// TestVerifyAcrossFiles: the chain runs on from one rotated file into the
// next, and a checkpoint in the newer file covers the older one.
func TestVerifyAcrossFiles(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	lines := trail(t, key, 12)
	older, newer := write(t, lines[:7]), write(t, lines[7:])
	r, err := auditchain.Verify([]string{older, newer}, &key.PublicKey)
	if err != nil || r.Files != 2 || r.Records != 12 || r.Checkpoints != 2 {
		t.Fatalf("Verify: %+v, %v", r, err)
	}
	if _, err := auditchain.Verify([]string{newer, older}, &key.PublicKey); err == nil {
		t.Error("files in the wrong order verified")
	}
}
