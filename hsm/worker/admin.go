package worker

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"time"

	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/agent/keytype"
)

// adminGrace is how much longer than KillAfter an Admin request may take
// before the worker counts as stuck: an RSA 4096 key takes seconds to
// generate on a fast token, far longer on a slow one.
const adminGrace = 2 * time.Minute

// adminRequest is the body of msgGenerate, msgDelete, msgSetChain and msgPromote.
type adminRequest struct {
	Label   string   `json:"label"`
	KeyType string   `json:"key_type,omitempty"`
	Chain   [][]byte `json:"chain,omitempty"` // DER, leaf first
}

var _ core.RotationStore = (*Store)(nil)

// Promote implements core.RotationStore in the worker.
func (s *Store) Promote(label string) (string, error) {
	a, err := s.admin(msgPromote, adminRequest{Label: label})
	if err != nil {
		return "", err
	}
	return string(a.body), nil
}

// Generate implements core.AdminStore in the worker.
func (s *Store) Generate(label string, kt keytype.Type) (crypto.PublicKey, error) {
	a, err := s.admin(msgGenerate, adminRequest{Label: label, KeyType: string(kt)})
	if err != nil {
		return nil, err
	}
	pub, err := x509.ParsePKIXPublicKey(a.body)
	if err != nil {
		return nil, fmt.Errorf("hsm: the HSM worker's new key %q: %w", label, err)
	}
	s.setListed(label, pub)
	return pub, nil
}

// Delete implements core.AdminStore in the worker.
func (s *Store) Delete(label string) error {
	_, err := s.admin(msgDelete, adminRequest{Label: label})
	if err == nil {
		s.setListed(label, nil)
	}
	return err
}

// setListed makes Signer know a key made or destroyed here before the
// next listing does.
func (s *Store) setListed(label string, pub crypto.PublicKey) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if pub == nil {
		delete(s.keys, label)
		return
	}
	if s.keys == nil {
		s.keys = map[string]crypto.PublicKey{}
	}
	s.keys[label] = pub
}

// SetChain implements core.AdminStore in the worker.
func (s *Store) SetChain(label string, chain []*x509.Certificate) error {
	req := adminRequest{Label: label}
	for _, c := range chain {
		req.Chain = append(req.Chain, c.Raw)
	}
	_, err := s.admin(msgSetChain, req)
	return err
}

func (s *Store) admin(typ byte, req adminRequest) (answer, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return answer{}, err
	}
	a, err := s.callGrace(func(b []byte, id uint64) []byte { return append(appendHeader(b, typ, id), body...) }, adminGrace)
	if err != nil {
		return answer{}, err
	}
	if a.status != statusOK {
		return answer{}, answerError(a, req.Label)
	}
	return a, nil
}

// admin answers an Admin request in the worker, with the store's own
// error (its message and kind) when it fails.
func (s *served) admin(typ byte, id uint64, body []byte) {
	fail := func(err error) { s.w.answer(typ, id, errorStatus(err), []byte(err.Error())) }
	store, ok := s.store.(core.AdminStore)
	if !ok {
		fail(fmt.Errorf("worker: this token's store cannot be changed"))
		return
	}
	var req adminRequest
	if err := json.Unmarshal(body, &req); err != nil {
		fail(fmt.Errorf("%w: %v", errMalformed, err))
		return
	}
	var out []byte
	var keep string // a signer cache entry the change leaves usable
	switch typ {
	case msgPromote:
		rs, ok := store.(core.RotationStore)
		if !ok {
			fail(fmt.Errorf("worker: this token's store cannot rotate keys"))
			return
		}
		// The current key's handle is made warm and kept: a signature asked
		// of it before the agent reloads finishes on it, not on the successor.
		if cur, err := store.Signer(req.Label); err == nil {
			fp := Fingerprint(cur.Public())
			keep = req.Label + "\x00" + string(fp[:])
			s.mu.Lock()
			if s.signers[keep] == nil {
				s.signers[keep] = cur
			}
			s.mu.Unlock()
		}
		retired, err := rs.Promote(req.Label)
		if err != nil {
			fail(err)
			return
		}
		out = []byte(retired)
	case msgGenerate:
		kt, err := keytype.Parse(req.KeyType)
		if err != nil {
			fail(err)
			return
		}
		pub, err := store.Generate(req.Label, kt)
		if err == nil {
			out, err = x509.MarshalPKIXPublicKey(pub)
		}
		if err != nil {
			fail(err)
			return
		}
	case msgDelete:
		if err := store.Delete(req.Label); err != nil {
			fail(err)
			return
		}
	case msgSetChain:
		chain := make([]*x509.Certificate, 0, len(req.Chain))
		for _, der := range req.Chain {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				fail(fmt.Errorf("worker: certificate of key %q: %w", req.Label, err))
				return
			}
			chain = append(chain, c)
		}
		if err := store.SetChain(req.Label, chain); err != nil {
			fail(err)
			return
		}
	}
	s.mu.Lock()
	for k := range s.signers { // a key gone or replaced: its warm handle must not sign
		if k != keep {
			delete(s.signers, k)
		}
	}
	s.mu.Unlock()
	s.w.answer(typ, id, statusOK, out)
}
