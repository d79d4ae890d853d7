package main

import (
	"strings"

	"github.com/urfave/cli/v2"
)

// examples are shown under "Examples:" in each command's help (and so in
// the man page), keyed by the command's path below hsmagent. They live in
// one place so that TestEveryCommandHasExamples can hold every command to it.
var examples = map[string][]string{
	"tokens":        {"hsmagent tokens", "hsmagent tokens --module /usr/lib/softhsm/libsofthsm2.so --json"},
	"keys":          {"hsmagent keys list --token issuer --pin-file /etc/hsmagent/pin"},
	"keys generate": {"hsmagent keys generate --token issuer --label d1-ppr-mtls --type ecdsa-p256"},
	"keys list":     {"hsmagent keys list --token issuer", "hsmagent keys list --uri 'pkcs11:token=issuer' --json"},
	"keys delete":   {"hsmagent keys delete --token issuer --label old-key --yes"},
	"keys rotate":   {"hsmagent keys rotate --label d1-ppr-mtls", "hsmagent keys rotate --label d1-ppr-mtls --type rsa-4096 --replace"},
	"csr": {"hsmagent csr --token issuer --key d1-ppr-mtls --profile d1 --issuer-id 12345 --env PPR --country FR --state Ile-de-France --locality Paris --org 'Example Bank' --org-unit Cards --out d1-ppr.csr",
		"hsmagent csr --token issuer --key web --subject 'CN=api.example.com,O=Example,C=FR' --dns api.example.com",
		"hsmagent csr --key d1-ppr-mtls --successor --out d1-ppr-next.csr"},
	"cert": {"hsmagent cert show --token issuer --key d1-ppr-mtls"},
	"cert import": {"hsmagent cert import --token issuer --key d1-ppr-mtls --cert d1-ppr.pem --chain thales-ca.pem",
		"hsmagent cert import --key d1-ppr-mtls --successor --cert d1-ppr-next.pem"},
	"cert show":   {"hsmagent cert show --token issuer --key d1-ppr-mtls --json"},
	"cert export": {"hsmagent cert export --token issuer --key d1-ppr-mtls --out d1-ppr-chain.pem"},
	"serve": {"hsmagent serve --config /etc/hsmagent/agent.yaml",
		"HSMAGENT_PIN_FILE=/etc/hsmagent/pin hsmagent serve --token issuer --socket /run/hsmagent/agent.sock"},
	"doctor": {"hsmagent doctor --config /etc/hsmagent/agent.yaml",
		"hsmagent doctor --config /etc/hsmagent/agent.yaml --online --json | jq '.[] | select(.status != \"pass\")'"},
	"bench":            {"hsmagent bench --token issuer --key d1-ppr-mtls --duration 10s --concurrency 16"},
	"proxy":            {"hsmagent proxy client --config /etc/hsmagent/agent.yaml --env PPR"},
	"proxy client":     {"hsmagent proxy client --socket /run/hsmagent/agent.sock --key d1-ppr-mtls --listen 127.0.0.1:8080 --target https://api.d1-stg.thalescloud.io"},
	"proxy server":     {"hsmagent proxy server --config /etc/hsmagent/agent.yaml --env PRD --listen :443 --backend http://127.0.0.1:9000"},
	"d1":               {"hsmagent d1 token --config /etc/hsmagent/agent.yaml --env PPR"},
	"d1 token":         {"hsmagent d1 token --socket /run/hsmagent/agent.sock --jwt-key d1-ppr-jwt --kid KID --issuer-id 12345 --token-url https://api.d1-stg.thalescloud.io/authz/v1/oauth2/token"},
	"jwt":              {"hsmagent jwt sign --socket /run/hsmagent/agent.sock --key d1-ppr-jwt --kid KID --claims claims.json"},
	"jwt sign":         {"echo '{\"sub\":\"12345\"}' | hsmagent jwt sign --key d1-ppr-jwt --kid KID --claims -"},
	"audit":            {"hsmagent audit verify --public-key audit-key.pem /var/log/hsmagent/audit.jsonl.1 /var/log/hsmagent/audit.jsonl"},
	"audit verify":     {"hsmagent audit verify --cert audit-key.crt audit.jsonl.2 audit.jsonl.1 audit.jsonl"},
	"audit public-key": {"hsmagent audit public-key --token issuer --key audit-signing > audit-key.pem"},
	"completion":       {"hsmagent completion bash > /etc/bash_completion.d/hsmagent"},
	"man":              {"hsmagent man | man -l -"},
}

// withExamples appends each command's examples to its description.
func withExamples(cmds []*cli.Command, prefix string) []*cli.Command {
	for _, c := range cmds {
		path := strings.TrimSpace(prefix + " " + c.Name)
		if ex := examples[path]; len(ex) > 0 && !strings.Contains(c.Description, "Examples:") {
			text := "Examples:\n  " + strings.Join(ex, "\n  ")
			if c.Description != "" {
				text = strings.TrimRight(c.Description, "\n") + "\n\n" + text
			}
			c.Description = text
		}
		withExamples(c.Subcommands, path)
	}
	return cmds
}
