package main

import (
	"crypto"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"net"
	"strings"

	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
)

func csrCommand() *cli.Command {
	return &cli.Command{
		Name:  "csr",
		Usage: "make a certificate signing request signed inside the token",
		Description: `With --profile d1, the CSR Thales D1 expects for mTLS client certificates (one per
environment): subject C, ST, L, O, OU, CN with CN from --cn-template, SHA-256 signature.
Confirm the final CN pattern with the Thales Delivery Team before sending.

Without a profile, a generic CSR with --subject and optional SANs, e.g. for the
server certificate D1 connects to.`,
		Flags: append(append(tokenFlags(), adminFlags()...),
			&cli.StringFlag{Name: "key", Usage: "key `LABEL` (required, unless the URI names the object)"},
			&cli.StringFlag{Name: "profile", Usage: "`PROFILE`: d1 for a Thales D1 client CSR"},
			&cli.StringFlag{Name: "issuer-id", Usage: "D1 issuer identifier `ID` given by Thales"},
			&cli.StringFlag{Name: "env", Usage: "D1 environment `ENV`: PPR or PRD"},
			&cli.StringFlag{Name: "country", Usage: "subject C: two-letter `CODE`"},
			&cli.StringFlag{Name: "state", Usage: "subject ST: `STATE` or region"},
			&cli.StringFlag{Name: "locality", Usage: "subject L: `CITY`"},
			&cli.StringFlag{Name: "org", Usage: "subject O: `ORGANIZATION`"},
			&cli.StringFlag{Name: "org-unit", Usage: "subject OU: `UNIT`"},
			&cli.StringFlag{Name: "cn-template", Usage: "CN `TEMPLATE` with {keyType}, {issuerId}, {env}", Value: d1.DefaultCNTemplate},
			&cli.StringFlag{Name: "subject", Usage: "generic subject `DN`, e.g. 'CN=api.example.com,O=Example,C=FR' or, as OpenSSL and this command print it, '/C=FR/O=Example/CN=api.example.com'"},
			&cli.StringSliceFlag{Name: "dns", Usage: "DNS subjectAltName `NAME` (repeatable)"},
			&cli.StringSliceFlag{Name: "ip", Usage: "IP subjectAltName `ADDR` (repeatable)"},
			&cli.BoolFlag{Name: "successor", Usage: "the CSR of the key's pending successor ('keys rotate'); without subject flags, the current certificate's subject and names"},
			outFlag,
		),
		Action: csrAction,
	}
}

func csrAction(c *cli.Context) error {
	label, err := adminLabel(c, "key")
	if err != nil {
		return err
	}
	fromLeaf := c.Bool("successor") && c.String("profile") == "" && !c.IsSet("subject")
	req, d1req, err := csrInput(c, label, fromLeaf)
	if err != nil {
		return err
	}
	if c.Bool("successor") {
		return csrSuccessor(c, label, d1req, req, fromLeaf)
	}
	client, _, err := lifecycleAgent(c)
	if err != nil {
		return err
	}
	if client != nil {
		defer client.Close()
		k, err := agentKey(c, client, label)
		if err != nil {
			return err
		}
		if err := d1Final(label, k.Public, d1req, &req); err != nil {
			return err
		}
		der, err := agentCSR(c, client, label, k.Public, req)
		if err != nil {
			return err
		}
		return writeCSR(c, label, k.Public, der, req)
	}
	sel, err := selectToken(c)
	if err != nil {
		return err
	}
	return withToken(sel, func(tok *hsm.Token) error {
		signer, err := tok.Signer(label)
		if err != nil {
			return err
		}
		if err := d1Final(label, signer.Public(), d1req, &req); err != nil {
			return err
		}
		der, err := hsm.CreateCSR(signer, req)
		if err != nil {
			return err
		}
		return writeCSR(c, label, signer.Public(), der, req)
	})
}

// csrInput reads the request's flags: a generic request or a D1 one, or
// none when a successor's CSR copies the current certificate (fromLeaf).
func csrInput(c *cli.Context, label string, fromLeaf bool) (req hsm.CSRRequest, d1req *d1.SubjectRequest, err error) {
	switch profile := c.String("profile"); {
	case fromLeaf && (c.IsSet("dns") || c.IsSet("ip")):
		err = usagef("--dns and --ip need --subject; without it the successor's CSR copies the current certificate's names")
	case fromLeaf:
	case profile == "d1" || profile == "D1":
		d1req, err = d1Subject(c, label)
	case profile == "":
		req, err = genericCSR(c)
	default:
		err = usagef("unknown --profile %q; the only profile is d1", c.String("profile"))
	}
	return req, d1req, err
}

// d1Final completes a D1 request with the key's real type, which its CN
// names and which is known only once the key is found.
func d1Final(label string, pub crypto.PublicKey, d1req *d1.SubjectRequest, req *hsm.CSRRequest) error {
	if d1req == nil {
		return nil
	}
	var err error
	if d1req.KeyType, err = d1.CNKeyType(pub); err != nil {
		return fmt.Errorf("key %q: %w", label, err)
	}
	if req.Subject, err = d1req.Subject(); err != nil {
		return fmt.Errorf("key %q: %w", label, err)
	}
	return nil
}

// d1Subject reads the D1 profile's flags (D1-C3, D1-C4) and checks them
// before the token is opened, with an ECDSA key type for now.
func d1Subject(c *cli.Context, label string) (*d1.SubjectRequest, error) {
	if c.IsSet("subject") || c.IsSet("dns") || c.IsSet("ip") {
		return nil, usagef("--profile d1 builds the subject itself; drop --subject, --dns and --ip")
	}
	// Name the flag a user forgot, not the field of the subject it fills.
	for _, f := range []string{"issuer-id", "env", "country", "state", "locality", "org", "org-unit"} {
		if strings.TrimSpace(c.String(f)) == "" {
			return nil, usagef("missing --%s: the D1 profile needs --issuer-id, --env, --country, --state, --locality, --org and --org-unit", f)
		}
	}
	env, err := d1.ParseEnv(c.String("env"))
	if err != nil {
		return nil, usageError{err}
	}
	if e, ok := d1.EnvOfLabel(label); ok && e != env {
		return nil, usagef("key %q looks like a %s key but --env is %s; D1 needs a separate key per environment (D1-G2)", label, e, env)
	}
	r := &d1.SubjectRequest{
		IssuerID: c.String("issuer-id"), Env: env,
		Country: c.String("country"), State: c.String("state"), Locality: c.String("locality"),
		Organization: c.String("org"), OrgUnit: c.String("org-unit"), CNTemplate: c.String("cn-template"),
		KeyType: d1.KeyTypeECDSA, // replaced by the key's real type once the token is open
	}
	if _, err := r.Subject(); err != nil {
		return nil, usageError{err}
	}
	return r, nil
}

// genericCSR reads --subject and the SANs.
func genericCSR(c *cli.Context) (hsm.CSRRequest, error) {
	var req hsm.CSRRequest
	if c.String("subject") == "" {
		return req, usagef("give --profile d1 (with --issuer-id, --env, --country, --state, --locality, --org, --org-unit) or --subject DN")
	}
	var err error
	if req.Subject, err = hsm.ParseSubject(c.String("subject")); err != nil {
		return req, usageError{err}
	}
	req.DNSNames = c.StringSlice("dns")
	for _, s := range c.StringSlice("ip") {
		ip := net.ParseIP(s)
		if ip == nil {
			return req, usagef("--ip %q is not an IP address", s)
		}
		req.IPs = append(req.IPs, ip)
	}
	return req, nil
}

// writeCSR writes the signed request as PEM, after a summary.
func writeCSR(c *cli.Context, label string, pub crypto.PublicKey, der []byte, req hsm.CSRRequest) error {
	fp, err := hsm.PublicKeyFingerprint(pub)
	if err != nil {
		return err
	}
	infof(c, "subject: %s", subjectInOrder(req.Subject))
	infof(c, "key: %q (%s), public key SHA-256: %s", label, hsm.KeyTypeOf(pub), fp)
	if err := writeOutput(c, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})); err != nil {
		return err
	}
	if out := c.String("out"); out != "" {
		infof(c, "wrote %s", out)
	}
	return nil
}

// subjectInOrder prints a subject in encoding order (C first), the way
// OpenSSL shows it, so the operator can compare it with D1's expectations.
func subjectInOrder(n pkix.Name) string {
	var s string
	for _, rdn := range n.ToRDNSequence() {
		for _, atv := range rdn {
			short := map[string]string{"2.5.4.6": "C", "2.5.4.8": "ST", "2.5.4.7": "L", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.3": "CN", "2.5.4.5": "serialNumber", "2.5.4.9": "street", "2.5.4.17": "postalCode"}[atv.Type.String()]
			if short == "" {
				short = atv.Type.String()
			}
			s += fmt.Sprintf("/%s=%v", short, atv.Value)
		}
	}
	return s
}
