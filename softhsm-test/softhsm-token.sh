#!/usr/bin/env bash
# Creates a throwaway SoftHSM token for manual use and prints the variables
# that point hsmagent at it:
#
#   eval "$(softhsm-test/softhsm-token.sh [DIR] [LABEL])"
#
# DIR (default: a new temporary directory) gets softhsm2.conf, tokens/ and
# user.pin (mode 0600). Never use such a token for real keys: its PINs are
# random but stored next to it.
set -euo pipefail
dir=${1:-$(mktemp -d -t hsmagent-softhsm.XXXXXX)}
label=${2:-hsmagent-demo}
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
cat >"$dir/softhsm2.conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
umask 077
pin=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
so_pin=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
printf '%s\n' "$pin" >"$dir/user.pin"
SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free --label "$label" \
	--so-pin "$so_pin" --pin "$pin" >/dev/null
echo "export SOFTHSM2_CONF='$dir/softhsm2.conf'"
echo "export HSMAGENT_TOKEN='$label'"
echo "export HSMAGENT_PIN_FILE='$dir/user.pin'"
