#!/usr/bin/env bash
# Everything a fresh machine needs before the daemon or the tests can run:
# node modules, the build, a Docker engine, the sandbox image. Idempotent;
# each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'sandboxd setup: %s\n' "$*" >&2; }

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing node modules (npm ci)"
  # npm 11 can reject a lock it wrote itself when a dependency (rollup) lists
  # optional packages for other platforms (npm/cli#4828); `npm install` then
  # installs from the same lock, adding only the missing platform entries.
  if ! npm ci --no-audit --no-fund --loglevel=error; then
    say "npm ci refused the lock file; installing with npm install from the same lock"
    npm install --no-audit --no-fund --loglevel=error
  fi
fi

# The build runs when an input is newer than the last build's stamp (or there
# is none), so a second `npm start` goes straight to the daemon.
stamp=dist/.build-stamp
if [ ! -f "$stamp" ] || [ -n "$(find src native/exec/src native/exec/Cargo.toml scripts/bundle.mjs scripts/build-native.mjs tsconfig.json package.json package-lock.json -newer "$stamp" -print -quit)" ]; then
  say "building (tsc, the bundles, the native exec client)"
  npm run --silent build
  touch "$stamp"
fi

bash scripts/ensure-docker.sh

node scripts/build-image.mjs
