// Package wire converts between Go's crypto types and the hsmagent.v1 messages,
// for both ends of the socket.
package wire

import (
	"crypto"
	"crypto/sha256"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/keytype"
)

// MaxMessageSize caps every message on the socket in both directions. The
// largest is a key list: a few keys with chains of a few certificates.
const MaxMessageSize = 1 << 20

// MaxLabel caps a key label in a request (and so in the agent's logs).
const MaxLabel = 128

// MaxBatch caps the signatures of one SignStream message, in either
// direction: the agent refuses a larger request message whole.
const MaxBatch = 64

// MaxRequestSize caps what a client may send in one message: a batch of
// MaxBatch sign requests, each a label of at most 128 bytes, a digest of at
// most 64 and a key_id (15680 bytes with every field at its longest).
const MaxRequestSize = 16 << 10

// Hash maps a Go hash to the wire; ok is false for hashes the agent refuses.
func Hash(h crypto.Hash) (agentpb.Hash, bool) {
	switch h {
	case crypto.SHA256:
		return agentpb.Hash_HASH_SHA256, true
	case crypto.SHA384:
		return agentpb.Hash_HASH_SHA384, true
	case crypto.SHA512:
		return agentpb.Hash_HASH_SHA512, true
	}
	return agentpb.Hash_HASH_UNSPECIFIED, false
}

// GoHash maps a wire hash to Go; ok is false for unknown values.
func GoHash(h agentpb.Hash) (crypto.Hash, bool) {
	switch h {
	case agentpb.Hash_HASH_SHA256:
		return crypto.SHA256, true
	case agentpb.Hash_HASH_SHA384:
		return crypto.SHA384, true
	case agentpb.Hash_HASH_SHA512:
		return crypto.SHA512, true
	}
	return 0, false
}

// algorithms maps the key types to the wire.
var algorithms = map[keytype.Type]agentpb.Algorithm{
	keytype.ECDSAP256: agentpb.Algorithm_ALGORITHM_ECDSA_P256,
	keytype.ECDSAP384: agentpb.Algorithm_ALGORITHM_ECDSA_P384,
	keytype.RSA2048:   agentpb.Algorithm_ALGORITHM_RSA_2048,
	keytype.RSA3072:   agentpb.Algorithm_ALGORITHM_RSA_3072,
	keytype.RSA4096:   agentpb.Algorithm_ALGORITHM_RSA_4096,
}

// Algorithm names a public key's algorithm on the wire (UNSPECIFIED for an
// unsupported key).
func Algorithm(pub crypto.PublicKey) agentpb.Algorithm {
	return algorithms[keytype.Of(pub)]
}

// KeyIDSize is the length of a SignRequest's key_id.
const KeyIDSize = 8

// KeyID is the key_id of a SignRequest for the key whose DER
// SubjectPublicKeyInfo is spki: enough to tell a label's keys apart.
func KeyID(spki []byte) []byte {
	sum := sha256.Sum256(spki)
	return sum[:KeyIDSize]
}
