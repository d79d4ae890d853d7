#!/usr/bin/env bash
# make demo: the D1 onboarding path on a throwaway SoftHSM token.
# A key is generated inside the token, a D1 CSR is signed there, a local test
# CA (standing in for Thales) signs it with OpenSSL, and the certificate is
# imported next to the key.
set -euo pipefail
bin=$(realpath "${1:-bin/hsmagent}")
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d -t hsmagent-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "throwaway SoftHSM token in $work"
eval "$("$here/softhsm-token.sh" "$work/hsm" demo-token)"
"$bin" tokens

step "generate an ECDSA P-256 key inside the token (sensitive, never extractable)"
"$bin" keys generate --label d1-ppr-mtls --type ecdsa-p256

step "D1 client CSR for PreProd, signed inside the token"
"$bin" csr --key d1-ppr-mtls --profile d1 --issuer-id DEMOISSUER --env PPR \
	--country FR --state "Ile-de-France" --locality Paris \
	--org "Demo Bank" --org-unit "Card Issuing" --out "$work/d1-ppr.csr"
openssl req -in "$work/d1-ppr.csr" -noout -verify -subject

step "a local test CA (standing in for Thales) signs the CSR"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
	-subj "/O=Demo/CN=Demo Thales Client CA" -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl x509 -req -in "$work/d1-ppr.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
	-days 90 -out "$work/d1-ppr.crt" 2>/dev/null

step "import the certificate and its chain next to the key"
"$bin" cert import --key d1-ppr-mtls --cert "$work/d1-ppr.crt" --chain "$work/ca.crt"
"$bin" cert show --key d1-ppr-mtls
"$bin" keys list

step "done: the private key never left the token"
