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
# Bold only on a terminal, and never with NO_COLOR.
if [ -t 2 ] && [ -z "${NO_COLOR:-}" ]; then
	step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
else
	step() { printf '\n== %s\n' "$*" >&2; }
fi

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

step "a second key for the issuer's own server, which D1 calls (outbound)"
"$bin" keys generate --label demo-server --type ecdsa-p256
"$bin" csr --key demo-server --subject "CN=localhost,O=Demo Bank,C=FR" --dns localhost --out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\n' >"$work/san.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
	-days 90 -extfile "$work/san.ext" -out "$work/issuer-server.crt" 2>/dev/null
"$bin" cert import --key demo-server --cert "$work/issuer-server.crt" --chain "$work/ca.crt"

step "start the agent on a throwaway socket (it alone knows the PIN)"
"$bin" serve --socket "$work/run/agent.sock" --log-level warn &
agent_pid=$!
server_pid=
cleanup() {
	kill "$agent_pid" $server_pid 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$work/run/agent.sock" ] && break; sleep 0.1; done
echo "agent pid $agent_pid listening on $work/run/agent.sock" >&2

step "a local mTLS test server (openssl s_server -Verify) trusting the test CA"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
	-keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\n' >"$work/server.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
	-days 1 -extfile "$work/server.ext" -out "$work/server.crt" 2>/dev/null
# Four ports in a row that no one listens on, below the kernel's ephemeral
# range: the outgoing connections of other programs (tests running beside
# the demo) take their ports from that range and could take ours first.
free_ports() {
	local lo base p ok
	read -r lo _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || lo=32768
	[ "$lo" -gt 11000 ] || lo=40000 # an ephemeral range from the bottom: any port may race
	for _ in $(seq 50); do
		base=$(( 10000 + RANDOM % (lo - 10010) )) ok=1
		for p in $base $((base + 1)) $((base + 2)) $((base + 3)); do
			if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then ok=0; break; fi
		done
		[ "$ok" = 1 ] && { echo "$base"; return 0; }
	done
	echo "demo: no four free TCP ports in a row below $lo on 127.0.0.1" >&2
	return 1
}
port=$(free_ports)
openssl s_server -quiet -accept "127.0.0.1:$port" -cert "$work/server.crt" -key "$work/server.key" \
	-CAfile "$work/ca.crt" -Verify 1 -verify_return_error -www >/dev/null 2>&1 &
server_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

step "an mTLS request whose client key is used through the agent"
"$(dirname "$bin")/mtls-get" --socket "$work/run/agent.sock" --key d1-ppr-mtls --ca "$work/ca.crt" "https://localhost:$port/"

step "rotate the D1 client key through the agent: no PIN, no agent restart, no client change"
# The operator's commands reach the running agent, which alone opens the
# token: the PIN leaves their environment.
as_operator() { env -u HSMAGENT_PIN_FILE HSMAGENT_SOCKET="$work/run/agent.sock" "$bin" "$@"; }
as_operator keys rotate --label d1-ppr-mtls
as_operator csr --key d1-ppr-mtls --successor --out "$work/d1-ppr-next.csr"
openssl x509 -req -in "$work/d1-ppr-next.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
	-days 90 -out "$work/d1-ppr-next.crt" 2>/dev/null
as_operator cert import --key d1-ppr-mtls --successor --cert "$work/d1-ppr-next.crt"
as_operator status
echo "a new mTLS handshake: the new certificate and key, accepted by openssl s_server -Verify" >&2
"$(dirname "$bin")/mtls-get" --socket "$work/run/agent.sock" --key d1-ppr-mtls --ca "$work/ca.crt" "https://localhost:$port/"

step "a short benchmark: in-process vs through the agent, same key"
"$bin" bench --key d1-ppr-mtls --socket "$work/run/agent.sock" --duration 1s

step "the D1 proxy pair on loopback: backend -> proxy client -> mTLS -> proxy server -> backend"
# The issuer's backend calls the client proxy in plain HTTP; the client proxy
# calls "D1" (here: the issuer's own server proxy) with mTLS and the D1 client key
# in the agent; the server proxy checks the caller against the client CA and
# hands the request to a plain-HTTP backend with the caller's identity in headers.
backend_port=$(( port + 1 )); server_port=$(( port + 2 )); client_port=$(( port + 3 ))
"$(dirname "$bin")/echo-backend" "127.0.0.1:$backend_port" & backend_pid=$!
"$bin" proxy server --socket "$work/run/agent.sock" --listen "127.0.0.1:$server_port" \
	--backend "http://127.0.0.1:$backend_port" --key demo-server --client-ca "$work/ca.crt" 2>"$work/proxy-server.log" & pserver_pid=$!
"$bin" proxy client --socket "$work/run/agent.sock" --listen "127.0.0.1:$client_port" \
	--target "https://localhost:$server_port" --key d1-ppr-mtls --server-ca "$work/ca.crt" 2>"$work/proxy-client.log" & pclient_pid=$!
server_pid="$server_pid $backend_pid $pserver_pid $pclient_pid"
for p in $server_port $client_port; do
	for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
done
curl -sS "http://127.0.0.1:$client_port/d1/notify"
echo "proxy client log:" >&2; tail -n 1 "$work/proxy-client.log" >&2
echo "proxy server log:" >&2; tail -n 1 "$work/proxy-server.log" >&2

kill -TERM $agent_pid; wait $agent_pid
step "done: the agent stopped cleanly and the private key never left the token"
