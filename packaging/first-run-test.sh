#!/usr/bin/env bash
# Runs the README's "First run on a fresh Debian host" verbatim: extracts the
# ```sh blocks under that heading and runs them in order in one shell, as
# root, from the repository's root. systemd is not PID 1 on CI machines, so
# each line marked "# systemd" is replaced by systemd_stand_in with its
# command: "systemctl enable --now hsmagent" runs the installed unit's
# ExecStart= under its User=, Group=, SupplementaryGroups=, UMask= and
# LimitCORE=, with the PIN as its credential; status shows it; stop stops it.
# Afterwards it removes what the guide made (token, user, package).
#
# Needs root on a throwaway machine without hsmagent installed.
# Usage: packaging/first-run-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

fail() { echo "first-run-test: FAIL: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (the guide installs a package and adds users)"
if dpkg-query -W -f='${Status}' hsmagent 2>/dev/null | grep -q installed; then
	fail "hsmagent is installed already: run this on a throwaway machine"
fi
! getent passwd payments >/dev/null || fail "user payments exists already: run this on a throwaway machine"

heading='## First run on a fresh Debian host'
grep -qxF "$heading" README.md || fail "README.md has no heading '$heading'"
test_dir=$(mktemp -d /tmp/hsmagent-first-run.XXXXXX)
guide=$test_dir/guide.sh
# The section runs from its heading to the next level-2 heading.
awk -v h="$heading" '
	$0 == h { in_section = 1; next }
	in_section && /^## / { exit }
	in_section && /^```sh$/ { in_block = 1; next }
	in_block && /^```$/ { in_block = 0; print ""; next }
	in_block && /# systemd$/ { sub(/[ \t]*# systemd$/, ""); print "systemd_stand_in " $0; stand_ins++; next }
	in_block { print }
	END { if (!stand_ins) exit 1 }
' README.md >"$guide" || fail "no '# systemd' line in the guide's sh blocks"
grep -q . "$guide" || fail "no sh blocks under '$heading'"
echo "== the guide's commands, as run (systemd_stand_in replaces the lines marked # systemd)"
cat -n "$guide"

service=/usr/lib/systemd/system/hsmagent.service
agent_pid=""
agent_log=$test_dir/agent.log
unit() { sed -n "s/^$1=//p" "$service" | tail -n1; }

# systemd_stand_in does what systemd would for the few systemctl commands
# the guide uses.
systemd_stand_in() {
	case "$*" in
	"systemctl enable --now hsmagent")
		local exec_start user group groups creds
		exec_start=$(unit ExecStart) user=$(unit User) group=$(unit Group) groups=$(unit SupplementaryGroups)
		[ "$(unit UMask)" = 0077 ] && [ "$(unit LimitCORE)" = 0 ] || fail "the unit's UMask= or LimitCORE= changed: update this stand-in"
		creds=$(mktemp -d /tmp/hsmagent-creds.XXXXXX)
		cp /etc/hsmagent/pin "$creds/hsmagent-pin" # LoadCredential=hsmagent-pin:/etc/hsmagent/pin
		chown -R "$user:$group" "$creds"
		chmod 0400 "$creds/hsmagent-pin"
		chmod 0500 "$creds"
		(
			umask 0077
			ulimit -c 0
			# shellcheck disable=SC2086 # ExecStart= is split into words as systemd does here
			exec setpriv --reuid="$user" --regid="$group" --groups="$groups" --inh-caps=-all --no-new-privs \
				env -i PATH=/usr/bin:/bin CREDENTIALS_DIRECTORY="$creds" $exec_start
		) >"$agent_log" 2>&1 &
		agent_pid=$!
		for _ in $(seq 100); do
			grep -q '"msg":"agent serving"' "$agent_log" && return 0
			kill -0 "$agent_pid" 2>/dev/null || { cat "$agent_log"; fail "the agent exited at start"; }
			sleep 0.1
		done
		cat "$agent_log"
		fail "the agent did not log 'agent serving' in 10 s"
		;;
	"systemctl status hsmagent")
		kill -0 "$agent_pid" || fail "the agent is not running"
		cat "$agent_log"
		;;
	"systemctl stop hsmagent")
		kill -TERM "$agent_pid" && wait "$agent_pid"
		agent_pid=""
		;;
	*) fail "no stand-in for '$*'" ;;
	esac
}

cleanup() {
	local rc=$?
	set +e
	for pid in $(jobs -p); do kill "$pid" 2>/dev/null; done
	[ -z "$agent_pid" ] || { kill -TERM "$agent_pid"; wait "$agent_pid"; }
	cd "$repo"
	if [ -e /etc/softhsm/softhsm2.conf ] && softhsm2-util --show-slots 2>/dev/null | grep -q 'Label: *issuer *$'; then
		softhsm2-util --delete-token --token issuer >/dev/null
	fi
	if getent passwd payments >/dev/null; then userdel payments; fi
	if dpkg-query -W -f='${Status}' hsmagent 2>/dev/null | grep -q installed; then dpkg --purge hsmagent >/dev/null; fi
	# The package keeps its audit log on purge; this one is the test's.
	rm -rf /var/log/hsmagent /root/hsmagent-so-pin /tmp/hsmagent-creds.* /run/hsmagent-creds.* "${work:-/nonexistent}" "$test_dir"
	if [ "$rc" = 0 ]; then echo "first-run-test: OK"; else echo "first-run-test: FAIL (exit $rc)" >&2; fi
	exit "$rc"
}
trap cleanup EXIT

echo "== running the guide"
start=$SECONDS
# As in an interactive shell: "cmd 2>&1 | grep ..." is the grep's status.
set +o pipefail
set -x
# shellcheck disable=SC1090 # the guide, extracted above
source "$guide"
set +x
echo "== the guide ran in $((SECONDS - start)) s"

# The agent by hand, as docs/operations.md shows for a host without systemd:
# its "# systemd" lines (stopping the unit) run here through the stand-in,
# the rest in the background until the agent serves; then status as root
# must list the guide's key, and SIGTERM must leave no credential behind.
by_heading='## Running the agent by hand on the packaged host'
grep -qxF "$by_heading" "$repo/docs/operations.md" || fail "docs/operations.md has no heading '$by_heading'"
by_hand=$test_dir/by-hand.sh
by_hand_log=$test_dir/by-hand.log
awk -v h="$by_heading" -v stand_ins="$test_dir/by-hand-systemd.sh" '
	$0 == h { in_section = 1; next }
	in_section && /^## / { exit }
	in_section && /^```sh$/ { in_block = 1; next }
	in_block && /^```$/ { in_block = 0; next }
	in_block && /# systemd$/ { sub(/[ \t]*# systemd$/, ""); print "systemd_stand_in " $0 >stand_ins; next }
	in_block { print }
' "$repo/docs/operations.md" >"$by_hand"
grep -q 'hsmagent serve' "$by_hand" || fail "no hsmagent serve in the sh block under '$by_heading'"
echo "== running the agent by hand"
cat -n "$test_dir/by-hand-systemd.sh" "$by_hand"
# shellcheck disable=SC1091 # made above
source "$test_dir/by-hand-systemd.sh"
[ -z "$agent_pid" ] || fail "the unit's agent still runs"
# While no agent runs, the D1 runbook's direct operation as root (the PIN
# file is root's): SoftHSM writes the new key's files as root, and the
# command must give them back to hsmagent, the token's owner, and say so.
HSMAGENT_TOKEN=issuer HSMAGENT_PIN_FILE=/etc/hsmagent/pin hsmagent keys generate --label d1-prd-mtls --type ecdsa-p256 \
	2>"$test_dir/generate.err" || { cat "$test_dir/generate.err"; fail "keys generate as root"; }
grep -q 'gave them to hsmagent:' "$test_dir/generate.err" || { cat "$test_dir/generate.err"; fail "keys generate as root did not say it gave SoftHSM's files back"; }
left=$(find /var/lib/softhsm/tokens -mindepth 2 -type f ! -user hsmagent)
[ -z "$left" ] || fail "files in the token that hsmagent does not own: $left"
bash -eu "$by_hand" >"$by_hand_log" 2>&1 &
by_hand_pid=$!
for _ in $(seq 100); do
	grep -q 'agent serving' "$by_hand_log" && break
	kill -0 "$by_hand_pid" 2>/dev/null || { cat "$by_hand_log"; fail "the agent run by hand exited at start"; }
	sleep 0.1
done
grep -q 'agent serving' "$by_hand_log" || { cat "$by_hand_log"; fail "the agent run by hand did not serve in 10 s"; }
hsmagent status --socket /run/hsmagent/agent.sock >"$test_dir/status" || true
grep -q '^d1-ppr-mtls ' "$test_dir/status" && grep -q '^d1-prd-mtls ' "$test_dir/status" ||
	{ cat "$test_dir/status"; fail "status does not list both keys from the agent run by hand"; }
# doctor as root compares the token with what the agent serves: they agree.
hsmagent doctor --config /etc/hsmagent/agent.yaml --pin-file /etc/hsmagent/pin --json >"$test_dir/doctor.json" 2>"$test_dir/doctor.err" || true # its PRD key has no certificate: exit 1
for check in served ownership; do
	grep -A2 "\"check\": \"$check\"" "$test_dir/doctor.json" | grep -q '"status": "pass"' ||
		{ cat "$test_dir/doctor.json"; fail "doctor's $check line does not pass"; }
done
serve_pid=$(pgrep -P "$by_hand_pid" -x hsmagent) || fail "no hsmagent process under the by-hand shell"
kill -TERM "$serve_pid"
wait "$by_hand_pid" || { cat "$by_hand_log"; fail "the by-hand block exited non-zero after SIGTERM"; }
! compgen -G '/run/hsmagent-creds.*' >/dev/null || fail "the by-hand block left its credential directory"
echo "== the agent ran by hand as hsmagent, with the PIN as its credential"
