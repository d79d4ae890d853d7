package core

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"sort"
	"sync"

	"github.com/hsmagent/hsmagent/agent/keytype"
)

// MemoryStore is a KeyStore of software keys held in process memory. It is
// for tests of services that use the agent and for the agent's own tests:
// its keys are as safe as the process, which is to say not at all.
type MemoryStore struct {
	mu   sync.RWMutex
	keys map[string]*memoryKey
}

type memoryKey struct {
	signer crypto.Signer
	id     []byte
	chain  []*x509.Certificate
}

var _ KeyStore = (*MemoryStore)(nil)

// NewMemoryStore returns an empty store.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{keys: make(map[string]*memoryKey)}
}

// Generate creates a key of type kt under label and returns its public half.
func (m *MemoryStore) Generate(label string, kt keytype.Type) (crypto.PublicKey, error) {
	var (
		signer crypto.Signer
		err    error
	)
	switch {
	case kt.IsRSA():
		signer, err = rsa.GenerateKey(rand.Reader, kt.RSABits())
	case kt.Curve() != nil:
		signer, err = ecdsa.GenerateKey(kt.Curve(), rand.Reader)
	default:
		_, err = keytype.Parse(string(kt))
	}
	if err != nil {
		return nil, fmt.Errorf("agent: generating key %q: %w", label, err)
	}
	if err := m.Add(label, signer, nil); err != nil {
		return nil, err
	}
	return signer.Public(), nil
}

// Add stores signer under label with an optional chain (leaf first).
func (m *MemoryStore) Add(label string, signer crypto.Signer, chain []*x509.Certificate) error {
	if label == "" {
		return errors.New("agent: key label is empty")
	}
	if keytype.Of(signer.Public()) == "" {
		return fmt.Errorf("agent: key %q: %T keys are not supported", label, signer.Public())
	}
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return fmt.Errorf("agent: key %q: %w", label, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.keys[label]; ok {
		return fmt.Errorf("agent: a key labelled %q exists already", label)
	}
	m.keys[label] = &memoryKey{signer: signer, id: id, chain: chain}
	return nil
}

// SetChain replaces the certificate chain stored with the key labelled label.
func (m *MemoryStore) SetChain(label string, chain []*x509.Certificate) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.keys[label]
	if !ok {
		return fmt.Errorf("agent: key %q: %w", label, ErrKeyNotFound)
	}
	k.chain = append([]*x509.Certificate(nil), chain...)
	return nil
}

// Delete removes the key labelled label.
func (m *MemoryStore) Delete(label string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.keys[label]; !ok {
		return fmt.Errorf("agent: key %q: %w", label, ErrKeyNotFound)
	}
	delete(m.keys, label)
	return nil
}

// Keys implements KeyStore; the keys are sorted by label.
func (m *MemoryStore) Keys() ([]Key, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]Key, 0, len(m.keys))
	for label, k := range m.keys {
		out = append(out, Key{Label: label, ID: k.id, Public: k.signer.Public(), Chain: k.chain})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Label < out[j].Label })
	return out, nil
}

// Signer implements KeyStore.
func (m *MemoryStore) Signer(label string) (crypto.Signer, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	k, ok := m.keys[label]
	if !ok {
		return nil, fmt.Errorf("agent: key %q: %w", label, ErrKeyNotFound)
	}
	return k.signer, nil
}
