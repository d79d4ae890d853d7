#!/usr/bin/env bash
# Checks the Debian package on a throwaway machine: builds it (make deb) unless
# given a .deb, checks its contents, installs it with dpkg -i, runs the
# installed binary, man page and completion, verifies and rates the installed
# units with systemd-analyze, runs the agent the way the unit does (its user,
# groups, credential and shipped config; systemd is not PID 1 here), checks
# who can reach the socket, runs it socket-activated with the socket unit's
# settings (systemd-socket-activate), reinstalls over a local config change, then
# purges the package and checks that nothing of it is left.
#
# Needs root and: dpkg, systemd (systemd-analyze, systemd-sysusers,
# systemd-tmpfiles), man-db, softhsm2, curl, util-linux (setpriv).
# Usage: packaging/check-deb.sh [PATH.deb]
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXPOSURE=2.0
SERVICE=/usr/lib/systemd/system/hsmagent.service
SOCKETUNIT=/usr/lib/systemd/system/hsmagent.socket
CLIENT_USER=hsmagent-check-client

fail() { echo "check-deb: FAIL: $*" >&2; exit 1; }
step() { echo "== $*"; }

[ "$(id -u)" = 0 ] || fail "run as root (it installs and purges the package)"
for cmd in dpkg dpkg-deb systemd-analyze systemd-sysusers systemd-tmpfiles man setpriv curl softhsm2-util; do
	command -v "$cmd" >/dev/null || fail "missing command $cmd (apt-get install systemd man-db softhsm2 curl)"
done
if dpkg-query -W -f='${Status}' hsmagent 2>/dev/null | grep -q installed; then
	fail "hsmagent is installed already: this check installs and purges it, run it on a throwaway machine"
fi
[ ! -e /etc/hsmagent ] || fail "/etc/hsmagent exists already (a 'make install'?): run this on a clean machine"

deb=${1:-}
if [ -z "$deb" ]; then
	step "make deb"
	make deb
	deb=$(ls -t bin/hsmagent_*.deb | head -n1)
fi
[ -f "$deb" ] || fail "no package $deb"
echo "package: $deb"

work=$(mktemp -d /tmp/hsmagent-check.XXXXXX)
agent_pid=""
cleanup() {
	if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
		kill -TERM "$agent_pid" 2>/dev/null || true
		wait "$agent_pid" 2>/dev/null || true
	fi
	if getent passwd "$CLIENT_USER" >/dev/null; then userdel "$CLIENT_USER" || true; fi
	rm -rf "$work"
}
trap cleanup EXIT

step "package contents"
dpkg-deb -c "$deb" | awk '{print $1, $2, $NF}' | sed 's|\./|/|' >"$work/contents"
cat "$work/contents"
expect_file() { # path mode
	grep -qx -- "$2 root/root $1" "$work/contents" || fail "package lacks $1 with mode $2 root/root"
}
expect_file /usr/bin/hsmagent -rwxr-xr-x
expect_file /usr/lib/systemd/system/hsmagent.service -rw-r--r--
expect_file /usr/lib/systemd/system/hsmagent.socket -rw-r--r--
expect_file /usr/lib/sysusers.d/hsmagent.conf -rw-r--r--
expect_file /usr/lib/tmpfiles.d/hsmagent.conf -rw-r--r--
expect_file /etc/hsmagent/agent.yaml -rw-r-----
expect_file /usr/share/man/man1/hsmagent.1.gz -rw-r--r--
expect_file /usr/share/bash-completion/completions/hsmagent -rw-r--r--
expect_file /usr/share/zsh/vendor-completions/_hsmagent -rw-r--r--
expect_file /usr/share/fish/vendor_completions.d/hsmagent.fish -rw-r--r--
expect_file /usr/share/doc/hsmagent/examples/network-hsm.conf -rw-r--r--
expect_file /usr/share/doc/hsmagent/examples/vendor-device.conf -rw-r--r--
expect_file /usr/share/doc/hsmagent/README.md -rw-r--r--
# The README links to docs/*.md: every page must ship beside it (packaging/nfpm.yaml).
for doc in docs/*.md; do
	expect_file "/usr/share/doc/hsmagent/$doc" -rw-r--r--
done
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles >"$work/conffiles"
[ "$(cat "$work/conffiles")" = /etc/hsmagent/agent.yaml ] || fail "conffiles is not just /etc/hsmagent/agent.yaml: $(cat "$work/conffiles")"
[ "$(dpkg-deb -f "$deb" Package)" = hsmagent ] || fail "package name"
dpkg-deb -f "$deb" Recommends | grep -q softhsm2 || fail "Recommends lacks softhsm2"
cmp -s <(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./etc/hsmagent/agent.yaml) docs/agent.example.yaml ||
	fail "the conffile differs from docs/agent.example.yaml"

step "dpkg -i"
dpkg -i "$deb"
dpkg -L hsmagent | sort >"$work/files"
getent passwd hsmagent >/dev/null || fail "no user hsmagent"
getent group hsmagent >/dev/null || fail "no group hsmagent"
getent group hsmagent-clients >/dev/null || fail "no group hsmagent-clients"
[ "$(id -gn hsmagent)" = hsmagent ] || fail "user hsmagent's primary group is $(id -gn hsmagent)"
expect_stat() { # path "mode user group"
	local got
	got=$(stat -c '%a %U %G' "$1") || fail "$1 is missing"
	[ "$got" = "$2" ] || fail "$1 is '$got', want '$2'"
}
expect_stat /etc/hsmagent "750 root hsmagent"
expect_stat /etc/hsmagent/agent.yaml "640 root hsmagent"
expect_stat /run/hsmagent "2750 hsmagent hsmagent-clients"
expect_stat /var/log/hsmagent "750 hsmagent hsmagent"

step "installed binary, man page, completion"
hsmagent --version
hsmagent --version | grep -q '^hsmagent version ' || fail "hsmagent --version"
hsmagent --help >"$work/help"
grep -q 'serve' "$work/help" || fail "hsmagent --help does not list serve"
# Minimal images may exclude /usr/share/man from dpkg (path-exclude): then the
# page is checked as packaged.
manpage=/usr/share/man/man1/hsmagent.1.gz
if [ -e "$manpage" ]; then
	man -w hsmagent >/dev/null || fail "man hsmagent does not find the page"
else
	echo "note: $manpage not installed (dpkg path-exclude?): checking the packaged page"
	dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/share/man/man1/hsmagent.1.gz >"$work/hsmagent.1.gz"
	manpage=$work/hsmagent.1.gz
fi
MANWIDTH=80 man --warnings -l "$manpage" >"$work/man" 2>"$work/man.err"
[ ! -s "$work/man.err" ] || fail "man page warnings: $(cat "$work/man.err")"
grep -q '^NAME' "$work/man" && grep -Eq 'hsmagent +- +keys +in +an +HSM' "$work/man" || fail "man page lacks NAME"
grep -q '^FILES' "$work/man" || fail "man page lacks FILES"
bash -n /usr/share/bash-completion/completions/hsmagent
got=$(bash -c 'source /usr/share/bash-completion/completions/hsmagent
	COMP_WORDS=(hsmagent ke); COMP_CWORD=1; _hsmagent; echo "${COMPREPLY[*]}"')
[ "$got" = keys ] || fail "bash completion of 'hsmagent ke' gave '$got'"
if command -v zsh >/dev/null; then zsh -n /usr/share/zsh/vendor-completions/_hsmagent; fi
if command -v fish >/dev/null; then fish -n /usr/share/fish/vendor_completions.d/hsmagent.fish; fi

step "systemd-analyze verify"
systemd-analyze verify "$SERVICE" "$SOCKETUNIT" 2>&1 | tee "$work/verify"
[ ! -s "$work/verify" ] || fail "systemd-analyze verify is not clean"

step "systemd-analyze security --offline=yes $SERVICE"
# --threshold counts in tenths of the displayed exposure.
threshold=$(awk -v m="$MAX_EXPOSURE" 'BEGIN { printf "%d", m * 10 }')
if ! systemd-analyze security --offline=yes --threshold="$threshold" "$SERVICE" >"$work/security" 2>&1; then
	cat "$work/security"
	fail "systemd-analyze security rates $SERVICE above $MAX_EXPOSURE"
fi
grep -v '^✓' "$work/security" || true
exposure=$(sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p' "$work/security")
[ -n "$exposure" ] || fail "no overall exposure level in the report"
awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' || fail "exposure $exposure > $MAX_EXPOSURE"
echo "exposure $exposure <= $MAX_EXPOSURE"

step "the agent as the unit runs it: user hsmagent, group softhsm, credential hsmagent-pin, the shipped config"
# A throwaway SoftHSM token (SOFTHSM2_CONF), so the host's tokens are untouched.
chmod 0755 "$work"
mkdir -p "$work/tokens" "$work/creds"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" >"$work/softhsm2.conf"
chmod 0644 "$work/softhsm2.conf"
chown hsmagent:hsmagent "$work/tokens"
as_agent() { setpriv --reuid=hsmagent --regid=hsmagent --groups=softhsm --inh-caps=-all "$@"; }
as_agent env SOFTHSM2_CONF="$work/softhsm2.conf" softhsm2-util --init-token --free --label issuer \
	--so-pin 87654321 --pin 123456 >/dev/null
printf 123456 >"$work/creds/hsmagent-pin"
chown -R hsmagent:hsmagent "$work/creds"
chmod 0400 "$work/creds/hsmagent-pin"
chmod 0500 "$work/creds"
# The unit's ExecStart=, UMask= and LimitCORE=.
exec_start=$(sed -n 's/^ExecStart=//p' "$SERVICE")
[ "$exec_start" = "/usr/bin/hsmagent serve --config /etc/hsmagent/agent.yaml" ] || fail "unexpected ExecStart=$exec_start"
(
	umask 0077
	ulimit -c 0
	# shellcheck disable=SC2086 # ExecStart= is split into words as systemd does here
	exec setpriv --reuid=hsmagent --regid=hsmagent --groups=softhsm --inh-caps=-all --no-new-privs \
		env -i PATH=/usr/bin:/bin SOFTHSM2_CONF="$work/softhsm2.conf" CREDENTIALS_DIRECTORY="$work/creds" \
		$exec_start
) >"$work/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 50); do
	[ -S /run/hsmagent/agent.sock ] && break
	kill -0 "$agent_pid" 2>/dev/null || { cat "$work/agent.log"; fail "the agent exited at start"; }
	sleep 0.2
done
[ -S /run/hsmagent/agent.sock ] || { cat "$work/agent.log"; fail "no socket after 10 s"; }
cat "$work/agent.log"
grep -q '"msg":"agent serving"' "$work/agent.log" || fail "the agent did not log 'agent serving'"
expect_stat /run/hsmagent/agent.sock "660 hsmagent hsmagent-clients"
[ "$(stat -c '%a' /var/log/hsmagent/audit.jsonl)" = 600 ] || fail "audit log is not 0600"

# A member of hsmagent-clients reaches the socket (the gRPC server answers
# an HTTP/2 GET with 415); a user outside the group cannot connect.
useradd --system --no-create-home --shell /usr/sbin/nologin --groups hsmagent-clients "$CLIENT_USER"
code=$(setpriv --reuid="$CLIENT_USER" --regid="$CLIENT_USER" --init-groups \
	curl -sS --max-time 5 --http2-prior-knowledge --unix-socket /run/hsmagent/agent.sock -o /dev/null -w '%{http_code}' http://agent/) ||
	fail "a member of hsmagent-clients cannot connect to the socket"
[ "$code" = 415 ] || fail "unexpected answer $code from the agent"
rc=0
setpriv --reuid=nobody --regid=nogroup --clear-groups \
	curl -sS --max-time 5 --http2-prior-knowledge --unix-socket /run/hsmagent/agent.sock -o /dev/null http://agent/ 2>/dev/null || rc=$?
[ "$rc" = 7 ] || fail "user nobody, outside hsmagent-clients, could connect (curl status $rc)"

kill -TERM "$agent_pid"
rc=0
wait "$agent_pid" || rc=$?
agent_pid=""
[ "$rc" = 0 ] || { cat "$work/agent.log"; fail "the agent exited $rc on SIGTERM"; }
[ ! -e /run/hsmagent/agent.sock ] || fail "the socket is left after the agent stopped"

step "socket activation: hsmagent.socket's socket, passed to the agent (systemd-socket-activate stands in for systemd)"
unit_value() { sed -n "s/^$1=//p" "$SOCKETUNIT"; }
listen=$(unit_value ListenStream)
grep -Eq "^socket: $listen( |\$)" /etc/hsmagent/agent.yaml || fail "the socket unit's ListenStream=$listen is not the config's socket:"
grep -Eq "^socket_group: $(unit_value SocketGroup)( |\$)" /etc/hsmagent/agent.yaml || fail "the socket unit's SocketGroup= is not the config's socket_group:"
grep -Eq "^socket_mode: \"$(unit_value SocketMode)\"( |\$)" /etc/hsmagent/agent.yaml || fail "the socket unit's SocketMode= is not the config's socket_mode:"
# systemd-socket-activate execs the agent on the first connection with
# LISTEN_FDS=1 and LISTEN_PID set to its own pid, which the exec chain keeps.
(
	umask 0077
	ulimit -c 0
	# shellcheck disable=SC2016 # expanded by the inner sh, in the activated process
	exec systemd-socket-activate -l "$listen" sh -c 'exec setpriv --reuid=hsmagent --regid=hsmagent --groups=softhsm --inh-caps=-all --no-new-privs \
		env -i PATH=/usr/bin:/bin SOFTHSM2_CONF="$0" CREDENTIALS_DIRECTORY="$1" LISTEN_FDS="$LISTEN_FDS" LISTEN_PID="$LISTEN_PID" '"$exec_start" \
		"$work/softhsm2.conf" "$work/creds"
) >"$work/activated.log" 2>&1 &
agent_pid=$!
for _ in $(seq 50); do
	[ -S "$listen" ] && break
	sleep 0.1
done
[ -S "$listen" ] || { cat "$work/activated.log"; fail "systemd-socket-activate made no socket"; }
# What systemd does with SocketUser=, SocketGroup=, SocketMode=.
chown "$(unit_value SocketUser):$(unit_value SocketGroup)" "$listen"
chmod "$(unit_value SocketMode)" "$listen"
# The first connection starts the agent, and waits in the socket's queue until it serves.
code=$(setpriv --reuid="$CLIENT_USER" --regid="$CLIENT_USER" --init-groups \
	curl -sS --max-time 15 --http2-prior-knowledge --unix-socket "$listen" -o /dev/null -w '%{http_code}' http://agent/) ||
	{ cat "$work/activated.log"; fail "a member of hsmagent-clients cannot connect to the activated socket"; }
[ "$code" = 415 ] || fail "unexpected answer $code from the activated agent"
cat "$work/activated.log"
grep -q '"msg":"using the socket passed by systemd (socket activation)","socket":"'"$listen"'"' "$work/activated.log" ||
	fail "the agent did not take the socket passed to it"
kill -TERM "$agent_pid"
rc=0
wait "$agent_pid" || rc=$?
agent_pid=""
[ "$rc" = 0 ] || fail "the activated agent exited $rc on SIGTERM"
[ -S "$listen" ] || fail "the activated agent removed systemd's socket"
rm -f "$listen" # RemoveOnStop=yes
userdel "$CLIENT_USER"
rm -f /var/log/hsmagent/audit.jsonl

step "reinstall keeps a changed config; enabled units are disabled on removal"
echo "# changed by check-deb" >>/etc/hsmagent/agent.yaml
systemctl enable hsmagent.service hsmagent.socket
dpkg -i "$deb"
grep -q '^# changed by check-deb' /etc/hsmagent/agent.yaml || fail "dpkg -i replaced a changed conffile"
expect_stat /etc/hsmagent/agent.yaml "640 root hsmagent"

step "dpkg --purge"
echo secret >/etc/hsmagent/pin
dpkg --purge hsmagent
if dpkg-query -W -f='${Status}' hsmagent 2>/dev/null | grep -q installed; then fail "still installed"; fi
while read -r f; do
	if [ -e "$f" ] && [ ! -d "$f" ]; then fail "$f is left after purge"; fi
done <"$work/files"
for d in /etc/hsmagent /run/hsmagent /var/log/hsmagent; do
	[ ! -e "$d" ] || fail "$d is left after purge"
done
if find /etc/systemd/system -name 'hsmagent.*' | grep -q .; then
	fail "unit symlinks are left: $(find /etc/systemd/system -name 'hsmagent.*')"
fi
# The users and groups stay, as usual for Debian packages.
echo "check-deb: OK ($deb, exposure $exposure)"
