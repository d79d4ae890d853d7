package core

import (
	"crypto"
	"crypto/x509"
	"errors"
)

// KeyStore is what the agent serves: key pairs named by label, each with a
// crypto.Signer whose private half stays in the store. The contract names no
// backend: the PKCS#11 token (package hsm/hsmstore) and the in-memory
// MemoryStore satisfy it, and the suite in agent/server/storetest checks any
// implementation. Implementations must be safe for concurrent use.
type KeyStore interface {
	// Keys lists the key pairs with their certificate chains, in any order.
	Keys() ([]Key, error)
	// Signer returns a signer for the key labelled label; an unknown label
	// gives an error that matches ErrKeyNotFound. The signer's Public is the
	// key Keys lists under that label. RSA signers accept crypto.Hash (PKCS #1
	// v1.5) and *rsa.PSSOptions; ECDSA signers return ASN.1 DER signatures.
	//
	// A Sign error that implements Unavailable() bool returning true (found
	// with errors.As) means the backend is down, not that the request failed:
	// the agent answers Unavailable with the error's text, audits the request
	// as hsm-down and logs it at debug level only, trusting the store to log
	// the outage itself (package hsm logs its start and end once each). Any
	// other Sign error is answered Internal, audited hsm-error, and logged at
	// most once a second.
	//
	// A signer signs only with the key its Public names. When the label comes
	// to name another key pair (deleted and generated again while the agent
	// runs), a signer obtained before either keeps signing with its own key
	// (the MemoryStore's, which holds the key itself) or refuses with an error
	// that implements KeyChangedError (the PKCS#11 token's, which finds keys
	// by label); it never signs with the new key. On such an error the agent
	// refuses the request and reloads its keys.
	Signer(label string) (crypto.Signer, error)
}

// KeyChangedError is the signer error that means the key under its label was
// replaced in the store: KeyChanged returns true. It is an interface so that
// a backend (package hsm) need not import the agent, nor the agent the backend.
type KeyChangedError interface {
	error
	KeyChanged() bool
}

// Key is a key pair as a KeyStore lists it.
type Key struct {
	Label  string
	ID     []byte // the backend's key id (CKA_ID for a PKCS#11 token); may be empty
	Public crypto.PublicKey
	// Chain is the stored certificate chain, leaf first; empty without a certificate.
	Chain []*x509.Certificate
}

// ErrKeyNotFound is matched (errors.Is) by a KeyStore's error for an unknown label.
var ErrKeyNotFound = errors.New("key not found")
