package main

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/agent/rotation"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
)

// A key rotation in three commands, clients untouched: 'keys rotate'
// makes the successor beside the key, 'csr --successor' its request,
// 'cert import --successor' stores its certificate and promotes it.

func keysRotateCommand() *cli.Command {
	return &cli.Command{
		Name:  "rotate",
		Usage: "generate the successor of a key, to be certified and promoted to its label",
		Description: `Generates a new key pair inside the token under LABEL/successor, which no client
signs with. Then 'hsmagent csr --key LABEL --successor' makes its CSR with the
current certificate's subject, and 'hsmagent cert import --key LABEL --successor
--cert new.crt' stores its certificate and promotes it: LABEL serves the new key
at once, and the key before stays under LABEL/retired-<UTC time> until deleted.`,
		Flags: append(append(tokenFlags(), adminFlags()...),
			&cli.StringFlag{Name: "label", Usage: "`LABEL` of the key to rotate (required, unless the URI names the object)"},
			&cli.StringFlag{Name: "type", Usage: "successor's key `TYPE` (default: the current key's)"},
			&cli.BoolFlag{Name: "replace", Usage: "destroy a pending successor and make a new one"},
		),
		Action: keysRotate,
	}
}

func keysRotate(c *cli.Context) error {
	label, err := adminLabel(c, "label")
	if err != nil {
		return err
	}
	if err := rotation.CheckRotatable(label); err != nil {
		return usageError{err}
	}
	if t := c.String("type"); t != "" {
		if _, err := hsm.ParseKeyType(t); err != nil {
			return usageError{err}
		}
	}
	client, socket, err := lifecycleAgent(c)
	if err != nil {
		return err
	}
	if client != nil {
		defer client.Close()
		ctx, cancel := adminContext(c)
		defer cancel()
		k, err := client.RotateKey(ctx, label, c.String("type"), c.Bool("replace"))
		if err != nil {
			return agentFailure(err)
		}
		return rotated(c, label, k.Public, "through the agent at "+socket)
	}
	return keysRotateDirect(c, label)
}

// keysRotateDirect is keys rotate on the token itself.
func keysRotateDirect(c *cli.Context, label string) error {
	succ := rotation.SuccessorLabel(label)
	sel, err := selectToken(c)
	if err != nil {
		return err
	}
	return withToken(sel, func(tok *hsm.Token) error {
		if _, err := tok.FinishPromotions(); err != nil {
			return err
		}
		cur, err := tok.Key(label)
		if err != nil {
			return err
		}
		kt := cur.Type
		if t := c.String("type"); t != "" {
			kt = hsm.KeyType(t)
		}
		if kt == "" {
			return usagef("key %q is of a type hsmagent does not generate; give the successor's with --type", label)
		}
		if _, err := tok.Key(succ); err == nil {
			if !c.Bool("replace") {
				return fmt.Errorf("key %q has a pending successor already; finish with 'hsmagent csr --key %s --successor' and 'hsmagent cert import --key %s --successor', or start again with --replace", label, label, label)
			}
			if err := tok.DeleteKey(succ); err != nil {
				return err
			}
		} else if !errors.Is(err, hsm.ErrKeyNotFound) {
			return err
		}
		k, err := tok.GenerateKey(succ, kt, nil)
		if err != nil {
			return err
		}
		return rotated(c, label, k.Public, "on token "+tok.Label())
	})
}

func rotated(c *cli.Context, label string, pub crypto.PublicKey, where string) error {
	fp, err := hsm.PublicKeyFingerprint(pub)
	if err != nil {
		return err
	}
	infof(c, "generated the %s successor of key %q as %q %s; %q still serves the current key", hsm.KeyTypeOf(pub), label, rotation.SuccessorLabel(label), where, label)
	infof(c, "public key SHA-256: %s", fp)
	infof(c, "next: hsmagent csr --key %s --successor --out successor.csr", label)
	return nil
}

// successorCSR is the successor's request when no subject flag is given:
// the current certificate's subject and names. A D1 CN names the key type,
// so a successor of another type needs the D1 flags instead.
func successorCSR(label string, cur *hsm.Key, succ crypto.PublicKey) (hsm.CSRRequest, error) {
	if len(cur.Chain) == 0 {
		return hsm.CSRRequest{}, usagef("key %q has no certificate to copy the subject from; give --profile d1 and its flags, or --subject", label)
	}
	if hsm.KeyTypeOf(cur.Public) != hsm.KeyTypeOf(succ) {
		return hsm.CSRRequest{}, usagef("the successor of key %q is %s, the key %s: its CN must name the new type; give --profile d1 and its flags, or --subject",
			label, hsm.KeyTypeOf(succ), hsm.KeyTypeOf(cur.Public))
	}
	leaf := cur.Chain[0]
	return hsm.CSRRequest{Subject: leaf.Subject, DNSNames: leaf.DNSNames, IPs: leaf.IPAddresses}, nil
}

// csrSuccessor makes the CSR of label's successor, signed by the successor;
// req is used unless fromLeaf, when it comes from the current certificate.
func csrSuccessor(c *cli.Context, label string, d1req *d1.SubjectRequest, req hsm.CSRRequest, fromLeaf bool) error {
	if err := rotation.CheckRotatable(label); err != nil {
		return usageError{err}
	}
	succ := rotation.SuccessorLabel(label)
	client, _, err := lifecycleAgent(c)
	if err != nil {
		return err
	}
	if client != nil {
		defer client.Close()
		cur, err := agentKey(c, client, label)
		if err != nil {
			return err
		}
		s, err := agentKey(c, client, succ)
		if err != nil {
			return fmt.Errorf("key %q has no pending successor; make one with 'hsmagent keys rotate --label %s'", label, label)
		}
		if fromLeaf {
			req, err = successorCSR(label, &hsm.Key{Public: cur.Public, Chain: cur.Chain}, s.Public)
		} else {
			err = d1Final(label, s.Public, d1req, &req)
		}
		if err != nil {
			return err
		}
		der, err := agentCSR(c, client, succ, s.Public, req)
		if err != nil {
			return err
		}
		return writeCSR(c, succ, s.Public, der, req)
	}
	sel, err := selectToken(c)
	if err != nil {
		return err
	}
	return withToken(sel, func(tok *hsm.Token) error {
		cur, err := tok.Key(label)
		if err != nil {
			return err
		}
		signer, err := tok.Signer(succ)
		if errors.Is(err, hsm.ErrKeyNotFound) {
			return fmt.Errorf("key %q has no pending successor; make one with 'hsmagent keys rotate --label %s'", label, label)
		}
		if err != nil {
			return err
		}
		if fromLeaf {
			req, err = successorCSR(label, cur, signer.Public())
		} else {
			err = d1Final(label, signer.Public(), d1req, &req)
		}
		if err != nil {
			return err
		}
		der, err := hsm.CreateCSR(signer, req)
		if err != nil {
			return err
		}
		return writeCSR(c, succ, signer.Public(), der, req)
	})
}

// certImportSuccessor stores the certificate of label's successor and
// promotes it.
func certImportSuccessor(c *cli.Context, label string, certs []*x509.Certificate) error {
	if err := rotation.CheckRotatable(label); err != nil {
		return usageError{err}
	}
	client, socket, err := lifecycleAgent(c)
	if err != nil {
		return err
	}
	if client != nil {
		defer client.Close()
		ctx, cancel := adminContext(c)
		defer cancel()
		k, retired, err := client.PromoteKey(ctx, label, certs, c.String("chain") != "")
		if err != nil {
			return agentFailure(err)
		}
		if kept := len(k.Chain) - len(certs); kept > 0 {
			infof(c, "kept the %d chain certificate(s) stored with key %q: they still link to the new certificate", kept, label)
		}
		return promoted(c, label, k.Chain, retired, "through the agent at "+socket+"; it serves it now")
	}
	sel, err := selectToken(c)
	if err != nil {
		return err
	}
	return withToken(sel, func(tok *hsm.Token) error {
		if _, err := tok.FinishPromotions(); err != nil {
			return err
		}
		cur, err := tok.Key(label)
		if err != nil {
			return err
		}
		succ := rotation.SuccessorLabel(label)
		s, err := tok.Key(succ)
		if errors.Is(err, hsm.ErrKeyNotFound) {
			return fmt.Errorf("key %q has no pending successor; make one with 'hsmagent keys rotate --label %s'", label, label)
		}
		if err != nil {
			return err
		}
		// A leaf alone keeps the current key's chain when it links.
		chain, err := directChain(c, certs, &hsm.Key{Label: label, Public: s.Public, Chain: cur.Chain},
			fmt.Sprintf("the successor of key %q", label))
		if err != nil {
			return err
		}
		if err := tok.ImportChain(succ, chain); err != nil {
			return err
		}
		retired, err := tok.Promote(label)
		if err != nil {
			return err
		}
		return promoted(c, label, chain, retired, "on token "+tok.Label()+"; a running agent serves it after a reload (SIGHUP)")
	})
}

func promoted(c *cli.Context, label string, chain []*x509.Certificate, retired, where string) error {
	if len(chain) == 0 {
		return fmt.Errorf("key %q was promoted but has no certificate", label)
	}
	leaf := chain[0]
	if w := d1.CheckImportEnv(leaf.Subject.CommonName, label); w != "" {
		warnf(c, "%s", w)
	}
	fp, err := hsm.PublicKeyFingerprint(leaf.PublicKey)
	if err != nil {
		return err
	}
	infof(c, "promoted the successor of key %q (certificate serial %s, valid until %s, %d chain certificate(s)) %s",
		label, leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.DateOnly), len(chain)-1, where)
	infof(c, "public key SHA-256: %s", fp)
	infof(c, "the key before is %q; delete it once no one needs it: hsmagent keys delete --label %s --yes", retired, retired)
	return nil
}

// rotationState is a key's rotation: a pending successor, retired keys.
type rotationState struct {
	Successor bool     `json:"successor,omitempty"`
	Retired   []string `json:"retired,omitempty"`
}

// rotations groups labels by the key they belong to; current keys with
// neither successor nor retired keys are left out.
func rotations(labels []string) map[string]*rotationState {
	out := map[string]*rotationState{}
	for _, l := range labels {
		base, kind := rotation.Parse(l)
		if kind == rotation.Current {
			continue
		}
		r := out[base]
		if r == nil {
			r = &rotationState{}
			out[base] = r
		}
		if kind == rotation.Successor {
			r.Successor = true
		} else {
			r.Retired = append(r.Retired, l)
		}
	}
	return out
}
