// Package hsmstore serves a PKCS#11 token (an *hsm.Token) as the agent's
// server.KeyStore. It is the one place where the agent meets the hsm
// package, so the agent's server builds and tests without cgo.
package hsmstore

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/hsm"
)

// Store is a token seen as a server.KeyStore. Generate, SetChain and Delete
// make it a storetest.Store as well.
type Store struct {
	Token *hsm.Token
}

var (
	_ server.KeyStore   = (*Store)(nil)
	_ server.AdminStore = (*Store)(nil) // the Admin service changes the token through it
)

// New returns the store for an open token; closing the token is the caller's job.
func New(tok *hsm.Token) *Store { return &Store{Token: tok} }

// TokenLabel is the token's label, which the Admin service reports.
func (s *Store) TokenLabel() string { return s.Token.Label() }

// Keys implements server.KeyStore.
// A promotion that a crash stopped halfway is finished first (and logged
// by the token), so that the label serves one whole key.
func (s *Store) Keys() ([]server.Key, error) {
	if _, err := s.Token.FinishPromotions(); err != nil {
		return nil, err
	}
	keys, err := s.Token.Keys()
	if err != nil {
		return nil, err
	}
	out := make([]server.Key, 0, len(keys))
	for _, k := range keys {
		out = append(out, server.Key{Label: k.Label, ID: k.ID, Public: k.Public, Chain: k.Chain})
	}
	return out, nil
}

// Signer implements server.KeyStore.
func (s *Store) Signer(label string) (crypto.Signer, error) {
	signer, err := s.Token.Signer(label)
	return signer, notFound(err)
}

// Generate creates a key pair on the token with hsmagent's key policy.
func (s *Store) Generate(label string, kt keytype.Type) (crypto.PublicKey, error) {
	k, err := s.Token.GenerateKey(label, kt, nil)
	if err != nil {
		return nil, err
	}
	return k.Public, nil
}

// SetChain stores a certificate chain with the key, replacing any earlier one.
func (s *Store) SetChain(label string, chain []*x509.Certificate) error {
	return notFound(s.Token.ImportChain(label, chain))
}

// Promote makes the successor of the key labelled label that key (see
// hsm.Token.Promote) and returns the label of the key before.
func (s *Store) Promote(label string) (string, error) {
	return s.Token.Promote(label)
}

// Delete destroys the key pair and its certificates.
func (s *Store) Delete(label string) error {
	return notFound(s.Token.DeleteKey(label))
}

// notFound makes the token's missing-key error match server.ErrKeyNotFound
// too, keeping its message (which names the keys present).
func notFound(err error) error {
	if errors.Is(err, hsm.ErrKeyNotFound) {
		return fmt.Errorf("%w%.0w", err, server.ErrKeyNotFound)
	}
	return err
}
