package main

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"github.com/hsmagent/hsmagent/agent/auditchain"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
)

func auditCommand() *cli.Command {
	return &cli.Command{
		Name:  "audit",
		Usage: "check the audit trail's chain and signed checkpoints",
		Subcommands: []*cli.Command{
			{
				Name:      "verify",
				Usage:     "check audit files (the oldest rotated one first): chain, checkpoints; exit 1 if broken",
				ArgsUsage: "FILE...",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "public-key", Usage: "the audit signing key's public key, PEM `FILE` (hsmagent audit public-key)"},
					&cli.StringFlag{Name: "cert", Usage: "or its certificate, PEM or DER `FILE`"},
				},
				Action: auditVerify,
			},
			{
				Name:   "public-key",
				Usage:  "print the public key of the audit signing key, PEM, for 'audit verify' elsewhere",
				Flags:  append(tokenFlags(), &cli.StringFlag{Name: "key", Usage: "key `LABEL` (the agent's audit_signing_key)", Required: true}),
				Action: auditPublicKey,
			},
		},
	}
}

func auditVerify(c *cli.Context) error {
	if c.NArg() == 0 {
		return usagef("audit verify: give the audit files, the oldest first (audit.jsonl.2 audit.jsonl.1 audit.jsonl)")
	}
	pub, err := verifyKey(c.String("public-key"), c.String("cert"))
	if err != nil {
		return err
	}
	r, err := auditchain.Verify(c.Args().Slice(), pub)
	var b *auditchain.Break
	switch {
	case errors.As(err, &b):
		return fmt.Errorf("audit verify: BROKEN at %v", b)
	case err != nil:
		return fmt.Errorf("audit verify: %w", err)
	case r.Records == 0:
		return fmt.Errorf("audit verify: no records in %d file(s)", r.Files)
	case r.Checkpoints == 0:
		return fmt.Errorf("audit verify: %d records chained, but no signed checkpoint: set audit_signing_key, or give the files with the agent's checkpoints", r.Records)
	}
	note := ""
	if r.MidChain {
		note = "; the first record follows one not given (an older file)"
	}
	if r.Starts > 1 {
		note += fmt.Sprintf("; %d chains start on an empty file (agent restarts after a rotation)", r.Starts-1)
	}
	infof(c, "audit verify: OK: %d records in %d file(s), chain intact, %d checkpoints verified; %d record%s after the last signed record, the last checkpoint included (a truncation or edit there would not show)%s",
		r.Records, r.Files, r.Checkpoints, r.Uncovered, plural(r.Uncovered), note)
	return nil
}

// verifyKey reads the checkpoints' key from a PEM public key or a
// certificate.
func verifyKey(pubFile, certFile string) (crypto.PublicKey, error) {
	switch {
	case (pubFile == "") == (certFile == ""):
		return nil, usagef("audit verify: give the audit signing key: --public-key FILE or --cert FILE")
	case pubFile != "":
		b, err := os.ReadFile(pubFile)
		if err != nil {
			return nil, fmt.Errorf("--public-key: %w", err)
		}
		blk, _ := pem.Decode(b)
		if blk == nil || blk.Type != "PUBLIC KEY" {
			return nil, fmt.Errorf("--public-key %q: no PEM PUBLIC KEY in it (hsmagent audit public-key --key LABEL prints one)", pubFile)
		}
		pub, err := x509.ParsePKIXPublicKey(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("--public-key %q: %w", pubFile, err)
		}
		return pub, nil
	}
	b, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("--cert: %w", err)
	}
	if blk, _ := pem.Decode(b); blk != nil {
		b = blk.Bytes
	}
	cert, err := x509.ParseCertificate(b)
	if err != nil {
		return nil, fmt.Errorf("--cert %q: not a PEM or DER certificate: %w", certFile, err)
	}
	return cert.PublicKey, nil
}

func auditPublicKey(c *cli.Context) error {
	sel, err := selectToken(c)
	if err != nil {
		return err
	}
	return withToken(sel, func(tok *hsm.Token) error {
		k, err := tok.Key(c.String("key"))
		if err != nil {
			return err
		}
		der, err := x509.MarshalPKIXPublicKey(k.Public)
		if err != nil {
			return err
		}
		return pem.Encode(c.App.Writer, &pem.Block{Type: "PUBLIC KEY", Bytes: der})
	})
}
