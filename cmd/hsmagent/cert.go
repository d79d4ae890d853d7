package main

import (
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
)

func certCommand() *cli.Command {
	return &cli.Command{
		Name:  "cert",
		Usage: "import, show and export the certificate chain stored with a key",
		Subcommands: []*cli.Command{
			{
				Name:  "import",
				Usage: "store a certificate (and its chain) with a key, replacing the old one",
				Flags: append(append(tokenFlags(), adminFlags()...),
					&cli.StringFlag{Name: "key", Usage: "key `LABEL` (required, unless the URI names the object)"},
					&cli.StringFlag{Name: "cert", Usage: "PEM `FILE` with the certificate, may hold the chain too (required)"},
					&cli.StringFlag{Name: "chain", Usage: "PEM `FILE` with the intermediate certificates"},
					&cli.BoolFlag{Name: "successor", Usage: "the certificate of the key's pending successor ('keys rotate'): store it and promote the successor to the key's label"},
				),
				Action: certImport,
			},
			{
				Name:   "show",
				Usage:  "show the stored certificate chain",
				Flags:  append(tokenFlags(), &cli.StringFlag{Name: "key", Usage: "key `LABEL` (required, unless the URI names the object)"}, jsonFlag),
				Action: certShow,
			},
			{
				Name:   "export",
				Usage:  "print the stored chain as PEM",
				Flags:  append(tokenFlags(), &cli.StringFlag{Name: "key", Usage: "key `LABEL` (required, unless the URI names the object)"}, outFlag),
				Action: certExport,
			},
		},
	}
}

func readCertFile(flag, path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, usagef("--%s: %v", flag, err)
	}
	return hsm.ParseCertificates(path, data)
}

// importInput is the key label and the certificates of cert import.
func importInput(c *cli.Context) (string, []*x509.Certificate, error) {
	label, err := adminLabel(c, "key")
	if err != nil {
		return "", nil, err
	}
	certs, err := importedCerts(c)
	return label, certs, err
}

// importedCerts reads --cert and --chain, in that order.
func importedCerts(c *cli.Context) ([]*x509.Certificate, error) {
	if c.String("cert") == "" {
		return nil, usagef("missing --cert FILE")
	}
	certs, err := readCertFile("cert", c.String("cert"))
	if err != nil {
		return nil, err
	}
	if p := c.String("chain"); p != "" {
		more, err := readCertFile("chain", p)
		if err != nil {
			return nil, err
		}
		certs = append(certs, more...)
	}
	return certs, nil
}

// directChain orders certs (a leaf and its chain) for key, as imported on
// the token itself: the leaf must be key's (whose is names it in the error),
// a leaf alone keeps key's stored chain when it links, and the chain's
// warnings are printed.
func directChain(c *cli.Context, certs []*x509.Certificate, key *hsm.Key, whose string) ([]*x509.Certificate, error) {
	chain, err := hsm.SortChain(key.Public, certs)
	if errors.Is(err, hsm.ErrNoMatchingCertificate) {
		return nil, fmt.Errorf("certificate %q does not belong to %s: its public key differs", certs[0].Subject, whose)
	}
	if err != nil {
		return nil, err
	}
	if chain, err = keptChain(c, chain, key); err != nil {
		return nil, err
	}
	warnings, err := hsm.ChainWarnings(chain, time.Now())
	if err != nil {
		return nil, err
	}
	for _, w := range warnings {
		warnf(c, "%s", w)
	}
	return chain, nil
}

func certImport(c *cli.Context) error {
	label, certs, err := importInput(c)
	if err != nil {
		return err
	}
	if c.Bool("successor") {
		return certImportSuccessor(c, label, certs)
	}
	client, socket, err := lifecycleAgent(c)
	if err != nil {
		return err
	}
	if client != nil {
		defer client.Close()
		return certImportByAgent(c, client, socket, label, certs)
	}
	sel, err := selectToken(c)
	if err != nil {
		return err
	}
	return withToken(sel, func(tok *hsm.Token) error {
		key, err := tok.Key(label)
		if err != nil {
			return err
		}
		chain, err := directChain(c, certs, key, fmt.Sprintf("key %q", label))
		if err != nil {
			return err
		}
		leaf := chain[0]
		if w := d1.CheckImportEnv(leaf.Subject.CommonName, label); w != "" {
			warnf(c, "%s", w)
		}
		if len(key.Chain) > 0 && key.Chain[0].Issuer.String() != leaf.Issuer.String() {
			warnf(c, "the issuer changes from %q to %q; announce CA changes to Thales in advance (D1-S5)",
				key.Chain[0].Issuer, leaf.Issuer)
		}
		if err := tok.ImportChain(label, chain); err != nil {
			return err
		}
		infof(c, "imported %q (serial %s, valid until %s) and %d chain certificate(s) for key %q",
			leaf.Subject, leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.DateOnly), len(chain)-1, label)
		return nil
	})
}

// certImportByAgent has the agent order, check and store the
// certificates; the warnings are this command's, from what it stored.
func certImportByAgent(c *cli.Context, client *agent.Client, socket, label string, certs []*x509.Certificate) error {
	ctx, cancel := adminContext(c)
	defer cancel()
	got, err := client.ImportCertificate(ctx, label, certs, c.String("chain") != "")
	if err != nil {
		return agentFailure(err)
	}
	chain := got.Key.Chain
	if len(chain) == 0 {
		return fmt.Errorf("the agent stored no certificate for key %q", label)
	}
	if got.KeptChain > 0 {
		infof(c, "kept the %d chain certificate(s) stored with key %q: they still link to the new certificate", got.KeptChain, label)
	}
	warnings, err := hsm.ChainWarnings(chain, time.Now())
	if err != nil {
		return err
	}
	for _, w := range warnings {
		warnf(c, "%s", w)
	}
	leaf := chain[0]
	if w := d1.CheckImportEnv(leaf.Subject.CommonName, label); w != "" {
		warnf(c, "%s", w)
	}
	if len(got.Previous) > 0 && got.Previous[0].Issuer.String() != leaf.Issuer.String() {
		warnf(c, "the issuer changes from %q to %q; announce CA changes to Thales in advance (D1-S5)", got.Previous[0].Issuer, leaf.Issuer)
	}
	infof(c, "imported %q (serial %s, valid until %s) and %d chain certificate(s) for key %q through the agent at %s; it serves them now",
		leaf.Subject, leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.DateOnly), len(chain)-1, label, socket)
	return nil
}

// keptChain is chain, or, for a lone leaf given without --chain, the leaf
// with the chain stored before it, if that still links to it: a renewal
// from the same CA keeps its intermediates. A stored chain that does not
// link is never dropped in silence.
func keptChain(c *cli.Context, chain []*x509.Certificate, key *hsm.Key) ([]*x509.Certificate, error) {
	if len(chain) > 1 || c.String("chain") != "" || len(key.Chain) < 2 {
		return chain, nil
	}
	kept, err := hsm.SortChain(key.Public, append([]*x509.Certificate{chain[0]}, key.Chain[1:]...))
	if err != nil {
		return nil, fmt.Errorf("the %d chain certificate(s) stored with key %q do not link to the new certificate (issued by %q); give its chain with --chain FILE",
			len(key.Chain)-1, key.Label, chain[0].Issuer)
	}
	infof(c, "kept the %d chain certificate(s) stored with key %q: they still link to the new certificate", len(kept)-1, key.Label)
	return kept, nil
}

type certView struct {
	Subject     string    `json:"subject"`
	Issuer      string    `json:"issuer"`
	Serial      string    `json:"serial"`
	NotBefore   time.Time `json:"notBefore"`
	NotAfter    time.Time `json:"notAfter"`
	DaysLeft    int       `json:"daysLeft"`
	Fingerprint string    `json:"sha256Fingerprint"`
	DNSNames    []string  `json:"dnsNames,omitempty"`
}

func storedChain(c *cli.Context) ([]*x509.Certificate, error) {
	sel, err := selectToken(c)
	if err != nil {
		return nil, err
	}
	label, err := keyLabel(c, "key", sel)
	if err != nil {
		return nil, err
	}
	var chain []*x509.Certificate
	err = withToken(sel, func(tok *hsm.Token) error {
		chain, err = tok.Chain(label)
		return err
	})
	return chain, err
}

func certShow(c *cli.Context) error {
	chain, err := storedChain(c)
	if err != nil {
		return err
	}
	now := time.Now()
	views := make([]certView, 0, len(chain))
	for _, cert := range chain {
		views = append(views, certView{
			Subject: cert.Subject.String(), Issuer: cert.Issuer.String(), Serial: cert.SerialNumber.Text(16),
			NotBefore: cert.NotBefore.UTC(), NotAfter: cert.NotAfter.UTC(),
			DaysLeft:    int(cert.NotAfter.Sub(now).Hours() / 24),
			Fingerprint: hsm.Fingerprint(cert.Raw), DNSNames: cert.DNSNames,
		})
	}
	if c.Bool("json") {
		return writeJSON(c, views)
	}
	w := c.App.Writer
	for i, v := range views {
		if i > 0 {
			fmt.Fprintln(w)
		}
		role := "leaf"
		if i > 0 {
			role = fmt.Sprintf("chain %d", i)
		}
		fmt.Fprintf(w, "%s\n  subject:     %s\n  issuer:      %s\n  serial:      %s\n  valid:       %s to %s (%d days left)\n  sha256:      %s\n",
			role, v.Subject, v.Issuer, v.Serial, v.NotBefore.Format(time.RFC3339), v.NotAfter.Format(time.RFC3339), v.DaysLeft, v.Fingerprint)
		if len(v.DNSNames) > 0 {
			fmt.Fprintf(w, "  dns names:   %v\n", v.DNSNames)
		}
	}
	return nil
}

func certExport(c *cli.Context) error {
	chain, err := storedChain(c)
	if err != nil {
		return err
	}
	return writeOutput(c, hsm.EncodeCertificatesPEM(chain))
}
