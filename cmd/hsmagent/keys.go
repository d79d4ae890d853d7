package main

import (
	"encoding/hex"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/rotation"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
)

func keysCommand() *cli.Command {
	return &cli.Command{
		Name:  "keys",
		Usage: "generate, list, rotate and delete key pairs inside the token",
		Subcommands: []*cli.Command{
			{
				Name:  "generate",
				Usage: "generate a key pair inside the token (sensitive, never extractable, sign-only)",
				Flags: append(append(tokenFlags(), adminFlags()...),
					&cli.StringFlag{Name: "label", Usage: "key `LABEL`, e.g. d1-ppr-mtls (required, unless the URI names the object)"},
					&cli.StringFlag{Name: "type", Usage: "`TYPE`: ecdsa-p256 or rsa-4096 for D1; also ecdsa-p384, rsa-2048, rsa-3072", Value: "ecdsa-p256"},
					&cli.StringFlag{Name: "id", Usage: "CKA_ID as `HEX` (default: 8 random bytes; with --direct only)"},
					jsonFlag,
				),
				Action: keysGenerate,
			},
			{
				Name:   "list",
				Usage:  "list key pairs with their certificates",
				Flags:  append(tokenFlags(), jsonFlag),
				Action: keysList,
			},
			{
				Name:  "delete",
				Usage: "delete a key pair and its certificates",
				Flags: append(append(tokenFlags(), adminFlags()...),
					&cli.StringFlag{Name: "label", Usage: "key `LABEL` (required, unless the URI names the object)"},
					&cli.BoolFlag{Name: "yes", Usage: "confirm: the key is destroyed for good"},
				),
				Action: keysDelete,
			},
			keysRotateCommand(),
		},
	}
}

func keysGenerate(c *cli.Context) error {
	label, err := adminLabel(c, "label")
	if err != nil {
		return err
	}
	// Only a rotation makes a successor's or a retired key's label: a key
	// generated under one would sign under the label it names.
	if base, kind := rotation.Parse(label); kind != rotation.Current {
		return usagef("--label %q is the label of a %s key of %q, which only a rotation makes; to rotate the key: hsmagent keys rotate --label %s", label, kind, base, base)
	}
	kt, err := hsm.ParseKeyType(c.String("type"))
	if err != nil {
		return usageError{err}
	}
	var id []byte
	if s := c.String("id"); s != "" {
		if id, err = hex.DecodeString(strings.TrimPrefix(s, "0x")); err != nil || len(id) == 0 {
			return usagef("--id %q is not hexadecimal", s)
		}
	}
	client, socket, err := lifecycleAgent(c)
	if err != nil {
		return err
	}
	if client != nil {
		defer client.Close()
		if id != nil {
			return usagef("--id is for --direct only: the agent gives each key a random id")
		}
		return keysGenerateByAgent(c, client, socket, label, kt)
	}
	sel, err := selectToken(c)
	if err != nil {
		return err
	}
	return withToken(sel, func(tok *hsm.Token) error {
		if kt == hsm.RSA4096 {
			infof(c, "generating %s key %q inside the token (RSA 4096 can take a few seconds)...", kt, label)
		}
		k, err := tok.GenerateKey(label, kt, id)
		if err != nil {
			return err
		}
		fp, err := hsm.PublicKeyFingerprint(k.Public)
		if err != nil {
			return err
		}
		if c.Bool("json") {
			return writeJSON(c, keyJSON(k))
		}
		infof(c, "generated %s key %q (id %x) on token %q", k.Type, k.Label, k.ID, tok.Label())
		infof(c, "public key SHA-256: %s", fp)
		return nil
	})
}

// keysGenerateByAgent has the agent generate the key in its token.
func keysGenerateByAgent(c *cli.Context, client *agent.Client, socket, label string, kt hsm.KeyType) error {
	if kt == hsm.RSA4096 {
		infof(c, "generating %s key %q inside the token (RSA 4096 can take a few seconds)...", kt, label)
	}
	ctx, cancel := adminContext(c)
	defer cancel()
	k, err := client.GenerateKey(ctx, label, string(kt))
	if err != nil {
		return agentFailure(err)
	}
	// The agent's token checked the key's attributes as it made it: a key
	// that is not sign-only and never extractable is deleted and refused.
	hk := &hsm.Key{Label: k.Label, ID: k.ID, Type: hsm.KeyTypeOf(k.Public), Public: k.Public, Chain: k.Chain, Usage: hsm.Usage{Sign: true, Sensitive: true, AlwaysSensitive: true, NeverExtractable: true}}
	if c.Bool("json") {
		return writeJSON(c, keyJSON(hk))
	}
	fp, err := hsm.PublicKeyFingerprint(k.Public)
	if err != nil {
		return err
	}
	infof(c, "generated %s key %q (id %x) through the agent at %s; it serves it now", hk.Type, k.Label, k.ID, socket)
	infof(c, "public key SHA-256: %s", fp)
	return nil
}

type keyView struct {
	Label       string     `json:"label"`
	ID          string     `json:"id"`
	Type        string     `json:"type"`
	PublicKey   string     `json:"publicKeySha256"`
	HasCert     bool       `json:"hasCertificate"`
	Subject     string     `json:"subject,omitempty"`
	Issuer      string     `json:"issuer,omitempty"`
	NotAfter    *time.Time `json:"notAfter,omitempty"`
	ChainLength int        `json:"chainLength"`
	// Usage is what the private key allows ("sign" for a key made by
	// hsmagent); Problems lists what departs from hsmagent's key policy.
	Usage    string   `json:"usage"`
	SignOnly bool     `json:"signOnly"`
	Problems []string `json:"problems,omitempty"`
}

func keyJSON(k *hsm.Key) keyView {
	v := keyView{Label: k.Label, ID: hex.EncodeToString(k.ID), Type: string(k.Type), ChainLength: len(k.Chain),
		Usage: k.Usage.String(), SignOnly: k.Usage.SignOnly(), Problems: k.Usage.Problems()}
	if v.Type == "" {
		v.Type = "other"
	}
	v.PublicKey, _ = hsm.PublicKeyFingerprint(k.Public)
	if len(k.Chain) > 0 {
		leaf := k.Chain[0]
		na := leaf.NotAfter.UTC()
		v.HasCert, v.Subject, v.Issuer, v.NotAfter = true, leaf.Subject.String(), leaf.Issuer.String(), &na
	}
	return v
}

func keysList(c *cli.Context) error {
	sel, err := selectToken(c)
	if err != nil {
		return err
	}
	return withToken(sel, func(tok *hsm.Token) error {
		keys, err := tok.Keys()
		if err != nil {
			return err
		}
		views := make([]keyView, 0, len(keys))
		for _, k := range keys {
			v := keyJSON(k)
			if len(v.Problems) > 0 {
				// Made by another tool or an older hsmagent: a token cannot
				// narrow a key's usage for good, so the fix is a new key.
				warnf(c, "key %q is not a sign-only, non-extractable key (%s); replace it: 'hsmagent keys generate' a new key, get it a certificate, then 'hsmagent keys delete --label %q --yes'",
					v.Label, strings.Join(v.Problems, ", "), v.Label)
			}
			views = append(views, v)
		}
		if c.Bool("json") {
			return writeJSON(c, views)
		}
		if len(views) == 0 {
			infof(c, "token %q holds no key pair; create one with 'hsmagent keys generate'", tok.Label())
			return nil
		}
		tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "LABEL\tTYPE\tUSAGE\tID\tCERTIFICATE\tNOT AFTER")
		for _, v := range views {
			cert, notAfter := "-", "-"
			if v.HasCert {
				cert = v.Subject
				notAfter = v.NotAfter.Format(time.DateOnly)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", v.Label, v.Type, v.Usage, v.ID, cert, notAfter)
		}
		return tw.Flush()
	})
}

func keysDelete(c *cli.Context) error {
	label, err := adminLabel(c, "label")
	if err != nil {
		return err
	}
	if !c.Bool("yes") {
		return usagef("deleting key %q destroys it for good; add --yes to confirm", label)
	}
	client, socket, err := lifecycleAgent(c)
	if err != nil {
		return err
	}
	if client != nil {
		defer client.Close()
		ctx, cancel := adminContext(c)
		defer cancel()
		if err := client.DeleteKey(ctx, label); err != nil {
			return agentFailure(err)
		}
		infof(c, "deleted key %q and its certificates through the agent at %s", label, socket)
		return nil
	}
	sel, err := selectToken(c)
	if err != nil {
		return err
	}
	return withToken(sel, func(tok *hsm.Token) error {
		if err := tok.DeleteKey(label); err != nil {
			return err
		}
		infof(c, "deleted key %q and its certificates from token %q", label, tok.Label())
		return nil
	})
}
