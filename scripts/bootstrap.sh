#!/usr/bin/env bash
# Everything a fresh machine needs before the daemon or the tests can run:
# node modules, the build, a Docker engine, the sandbox image. Idempotent;
# each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'sandboxd setup: %s\n' "$*" >&2; }

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing node modules (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
fi

say "building (tsc + shim bundle)"
npm run --silent build

bash scripts/ensure-docker.sh

node scripts/build-image.mjs
