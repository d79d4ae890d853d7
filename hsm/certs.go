package hsm

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/ThalesGroup/crypto11"
)

// maxChain bounds how many chain certificates are looked up for one key.
const maxChain = 16

// ImportChain stores chain (leaf first) with the key labelled label, replacing
// any chain stored before. The leaf gets the key's CKA_ID and label, so other
// PKCS#11 tools pair it with the key; the rest are stored as "<label>/chain/N".
//
// ImportChain refuses a leaf whose public key is not the key's: callers check
// validity and chain order (see CheckChain) before.
func (t *Token) ImportChain(label string, chain []*x509.Certificate) error {
	if len(chain) == 0 {
		return errors.New("hsm: no certificate to import")
	}
	if len(chain) > maxChain {
		return fmt.Errorf("hsm: chain of %d certificates is longer than %d", len(chain), maxChain)
	}
	return t.do(func(ctx *crypto11.Context, _ uint64) error {
		s, id, err := t.findKeyPair(ctx, label)
		if err != nil {
			return err
		}
		if !publicKeysEqual(s.Public(), chain[0].PublicKey) {
			return fmt.Errorf("hsm: certificate %q does not belong to key %q: its public key differs", chain[0].Subject, label)
		}
		if err := deleteChain(ctx, label, id); err != nil {
			return err
		}
		for i, cert := range chain {
			tmpl := crypto11.NewAttributeSet()
			if i == 0 {
				tmpl, err = crypto11.NewAttributeSetWithIDAndLabel(id, []byte(label))
			} else {
				err = tmpl.Set(crypto11.CkaLabel, chainLabel(label, i))
			}
			if err != nil {
				return fmt.Errorf("hsm: certificate template: %w", err)
			}
			if err := ctx.ImportCertificateWithAttributes(tmpl, cert); err != nil {
				return fmt.Errorf("hsm: storing certificate %d of the chain for key %q: %w", i, label, explain(err))
			}
		}
		return nil
	})
}

// Chain returns the certificate chain stored with the key, leaf first.
func (t *Token) Chain(label string) ([]*x509.Certificate, error) {
	k, err := t.Key(label)
	if err != nil {
		return nil, err
	}
	if len(k.Chain) == 0 {
		return nil, fmt.Errorf("hsm: key %q: %w; import one with 'hsmagent cert import'", label, ErrCertificateNotFound)
	}
	return k.Chain, nil
}

func findChain(ctx *crypto11.Context, label string) ([]*x509.Certificate, error) {
	leaf, err := ctx.FindCertificate(nil, []byte(label), nil)
	if err != nil {
		return nil, fmt.Errorf("hsm: reading certificate of key %q: %w", label, explain(err))
	}
	if leaf == nil {
		return nil, nil
	}
	chain := []*x509.Certificate{leaf}
	for i := 1; i <= maxChain; i++ {
		c, err := ctx.FindCertificate(nil, chainLabel(label, i), nil)
		if err != nil {
			return nil, fmt.Errorf("hsm: reading chain certificate %d of key %q: %w", i, label, explain(err))
		}
		if c == nil {
			break
		}
		chain = append(chain, c)
	}
	return chain, nil
}

func deleteChain(ctx *crypto11.Context, label string, id []byte) error {
	// crypto11 deletes one matching object per call; loop until none is left.
	del := func(id, lbl []byte) error {
		for range maxChain * 2 {
			c, err := ctx.FindCertificate(id, lbl, nil)
			if err != nil || c == nil {
				return err
			}
			if err := ctx.DeleteCertificate(id, lbl, nil); err != nil {
				return err
			}
		}
		return nil
	}
	var err error
	if len(id) > 0 {
		err = del(id, nil)
	}
	if err == nil {
		err = del(nil, []byte(label))
	}
	for i := 1; err == nil && i <= maxChain; i++ {
		err = del(nil, chainLabel(label, i))
	}
	if err != nil {
		return fmt.Errorf("hsm: removing old certificates of key %q: %w", label, explain(err))
	}
	return nil
}

func publicKeysEqual(a, b any) bool {
	ka, err1 := x509.MarshalPKIXPublicKey(a)
	kb, err2 := x509.MarshalPKIXPublicKey(b)
	return err1 == nil && err2 == nil && bytes.Equal(ka, kb)
}
