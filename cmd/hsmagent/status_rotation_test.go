package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
)

// status describes a token whose labels nest a rotation's suffixes (made
// outside the agent, e.g. with pkcs11-tool, or before keys generate
// refused them) without a panic: each key is listed once, beside the key
// it belongs to when that one is listed as a key.
func TestStatusNestedRotationLabels(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var keys []agent.Key
	for _, label := range []string{"a", "a/successor", "a/successor/successor", "a/successor/retired-20261203T000000Z",
		"a/retired-20261202T000000Z", "a/retired-20261202T000000Z/retired-20261203T000000Z"} {
		keys = append(keys, agent.Key{Label: label, Public: key.Public()})
	}
	v := statusReport(keys, time.Now())
	seen := 0
	for _, kv := range v.Keys {
		seen++
		if kv.Successor != nil {
			seen++
		}
		seen += len(kv.Retired)
	}
	if seen != len(keys) {
		t.Errorf("status shows %d of %d keys: %+v", seen, len(keys), v.Keys)
	}
}
