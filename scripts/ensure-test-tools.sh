#!/usr/bin/env bash
# Programs the test suite runs for real besides Docker and PostgreSQL:
# redis-server (Redis through the tunnel's command filter) and Debian's
# chromium (the operator console's end-to-end test drives it headless with
# playwright-core, which never downloads a browser of its own). As root on an apt
# system, installs what is missing; otherwise says what to install and exits 1.
# Idempotent and silent when nothing needs doing.
set -euo pipefail

say() { echo "ensure-test-tools: $*" >&2; }

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  say "the tests need: ${missing[*]} (Debian: apt-get install ${missing[*]}); install them and retry."
  exit 1
fi
say "installing ${missing[*]}"
DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
# policy-rc.d 101: install the package without starting its system service
# (the tests start their own server on a free port)
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && created=1
fi
trap '[ "$created" -eq 1 ] && rm -f "$policy"' EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
